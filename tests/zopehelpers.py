"""A throwaway Zope 6 WSGI site serving the example product, for test_zope.

``ZopeInstance`` writes an instance home into a temporary directory (the
files ``mkwsgiinstance`` would write, cut to what the test needs: a
zope.conf with a FileStorage, a site.zcml that loads zpgpool_example, and a
PasteDeploy zope.ini for waitress) and serves it with Zope's own
``runwsgi`` in a process of its own, so that Zope's global state (its
configuration, the ZODB, the component registry) stays out of the test
process.  ``ZOPE_LAYER`` runs one such site, with a private PostgreSQL
server of its own beside it.

The instance and the layer are also the base of the ZSQL site
(tests/zsqlhelpers.py) and of the Plone site (tests/plonehelpers.py), and
``zope_conf()`` writes test_cli's zope.conf files too.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from zpgpool.testing import PostgresLayer

from tests.poolhelpers import closed_port
from tests.support import python_env

#: The environment variable the example's ZCML reads its DSN from.
DSN_ENV = 'ZPGPOOL_EXAMPLE_DSN'

# The <environment> section's comment is there on purpose: test_cli reads
# these files with zpgpool's own parser, which must pass over comments.
ZOPE_CONF = """\
%define INSTANCE {home}
instancehome $INSTANCE

<zodb_db main>
    <filestorage>
      path $INSTANCE/var/Data.fs
    </filestorage>
    mount-point /
</zodb_db>

<environment>
  # Variables the Zope process finds in os.environ.
{environment}</environment>
"""

# Appended when a test sets the publisher's retries of ConflictError and
# other TransientErrors.
RETRIES = """
# Zope's default is 3; retry n waits a random time of up to 2**(n-1)
# seconds first.
max-conflict-retries {retries}
"""

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="Zope2.App" />
  <include package="zpgpool_example" />
</configure>
"""

ZOPE_INI = """\
[app:zope]
use = egg:Zope#main
zope_conf = %(here)s/zope.conf

[server:main]
use = egg:waitress#main
host = 127.0.0.1
port = {port}
threads = {threads}

[pipeline:main]
pipeline =
    egg:Zope#httpexceptions
    zope

[loggers]
keys = root

[handlers]
keys = eventlog

[formatters]
keys = generic

[formatter_generic]
format = %(asctime)s %(levelname)s [%(name)s][%(threadName)s] %(message)s

[logger_root]
level = INFO
handlers = eventlog

[handler_eventlog]
class = FileHandler
args = (r'{home}/var/log/event.log', 'a')
level = INFO
formatter = generic
"""

# Start Zope's runwsgi and zconsole (the console scripts of the same
# names) with the Python running the tests, whatever is on PATH.
_RUNWSGI = 'import sys; from Zope2.Startup.serve import main; sys.exit(main())'
_ZCONSOLE = 'from Zope2.utilities.zconsole import main; main()'


def zope_conf(home, environment, retries=None):
    """The text of a zope.conf as mkwsgiinstance writes one, for the
    instance home *home*: a FileStorage in its var folder, an
    ``<environment>`` section that sets the mapping *environment*, and
    the publisher's *retries* unless None (Zope's default)."""
    text = ZOPE_CONF.format(home=home, environment=''.join(
        '  %s %s\n' % item for item in environment.items()))
    if retries is not None:
        text += RETRIES.format(retries=retries)
    return text


class HTTPResult:
    """The status and decoded JSON body (or text) of one request."""

    def __init__(self, status, body):
        self.status = status
        self.text = body
        try:
            self.json = json.loads(body)
        except ValueError:
            self.json = None

    @property
    def ok(self):
        return self.status == 200

    def __repr__(self):
        return '<HTTPResult %s %.200r>' % (self.status, self.text)


def fetch(request, timeout=60, opener=None):
    """Open *request* (a URL or a ``urllib.request.Request``) with
    *opener* (default: urllib's) and return an ``HTTPResult``; HTTP error
    statuses are results, not exceptions."""
    open_url = urllib.request.urlopen if opener is None else opener.open
    try:
        with open_url(request, timeout=timeout) as response:
            return HTTPResult(response.status,
                              response.read().decode('utf-8'))
    except urllib.error.HTTPError as e:
        with e:
            return HTTPResult(e.code, e.read().decode('utf-8', 'replace'))


class ZopeInstance:
    """A Zope 6 instance home in a temporary directory, served by waitress
    through ``runwsgi`` in a subprocess.

    This one loads the example product; subclasses load other ZCML
    (``site_zcml``) and wait for another view (``ready_view``)."""

    site_zcml = SITE_ZCML
    #: The view that answers 200 once the site is up.
    ready_view = '@@example-stats'
    #: The files in var/log that ``log_tail`` shows.
    logs = ('runwsgi.log', 'event.log')
    #: How long ``start`` waits for ``ready_view`` by default, in seconds.
    start_timeout = 90
    home_prefix = 'zpgpool-zope-'
    #: More environment variables for the Zope process.
    extra_environ = {}

    def __init__(self, dsn, threads=4, retries=3):
        self.dsn = dsn
        self.threads = threads
        self.retries = retries
        self.home = None
        self.port = None
        self.process = None
        self.output = None

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self.port

    def path(self, *parts):
        return os.path.join(self.home, *parts)

    def conf_environment(self):
        """What zope.conf's ``<environment>`` section sets."""
        return {'CHAMELEON_CACHE': '$INSTANCE/var/cache'}

    def make_home(self):
        self.home = tempfile.mkdtemp(prefix=self.home_prefix)
        for folder in ('etc', 'var', 'var/log', 'var/cache'):
            os.makedirs(self.path(folder), exist_ok=True)
        self.write('etc/zope.conf', zope_conf(
            self.home, self.conf_environment(), self.retries))
        self.write('etc/site.zcml', self.site_zcml)
        self.port = closed_port()
        self.write_ini()

    def write(self, name, text):
        with open(self.path(name), 'w', encoding='utf-8') as f:
            f.write(text)

    def write_ini(self):
        self.write('etc/zope.ini', ZOPE_INI.format(
            home=self.home, port=self.port, threads=self.threads))

    def environ(self):
        """The environment the Zope process runs with: this process's
        import path (see tests/support.py), the example's DSN and
        ``extra_environ``."""
        return python_env(**{DSN_ENV: self.dsn}, **self.extra_environ)

    def start(self, timeout=None):
        """Start the server and wait until ``ready_view`` answers; return
        the seconds it took.  When another program took the port
        meanwhile, try another one."""
        if self.home is None:
            self.make_home()
        start = time.monotonic()
        for attempt in range(3):
            if self._start(timeout or self.start_timeout):
                return time.monotonic() - start
            self.port = closed_port()
            self.write_ini()
        raise RuntimeError('Zope found no free port:\n%s' % self.log_tail())

    def _start(self, timeout):
        log = self.path('var', 'log', 'runwsgi.log')
        # Appended to, so that a restart keeps what the last run said.
        self.output = open(log, 'ab')
        offset = self.output.tell()
        self.process = subprocess.Popen(
            [sys.executable, '-c', _RUNWSGI, self.path('etc', 'zope.ini')],
            cwd=self.home, env=self.environ(), stdout=self.output,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                returncode = self.process.returncode
                self.stop()
                with open(log, encoding='utf-8', errors='replace') as f:
                    f.seek(offset)
                    if 'Address already in use' in f.read():
                        return False
                raise RuntimeError('Zope exited with %s at start:\n%s' % (
                    returncode, self.log_tail()))
            try:
                if self.get(self.ready_view, timeout=5).ok:
                    return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('Zope did not answer within %ss:\n%s'
                                   % (timeout, self.log_tail()))
            time.sleep(0.1)

    def restart(self):
        """Stop the server and start it again on the same instance home
        and port."""
        self.stop()
        self.start()

    def log_tail(self, lines=40):
        text = ''
        for name in self.logs:
            try:
                with open(self.path('var', 'log', name), encoding='utf-8',
                          errors='replace') as f:
                    text += '--- %s\n' % name
                    text += ''.join(f.readlines()[-lines:])
            except OSError:
                pass
        return text

    def get(self, view, timeout=60, **params):
        """GET ``/view?params`` and return an ``HTTPResult``; HTTP error
        statuses are results, not exceptions."""
        url = '%s/%s' % (self.url, view)
        if params:
            url += '?' + urllib.parse.urlencode(params)
        return fetch(url, timeout)

    def run_zconsole(self, script, *args, timeout=120):
        """Run the file *script* of the instance home with ``zconsole
        run`` (``app`` is the Zope application there), passing *args*;
        keep its output in var/log/SCRIPT.log and return its stdout.  The
        server must be stopped: the FileStorage is locked while it runs."""
        done = subprocess.run(
            [sys.executable, '-c', _ZCONSOLE, 'run',
             self.path('etc', 'zope.conf'), self.path(script), *args],
            cwd=self.home, env=self.environ(), capture_output=True,
            text=True, timeout=timeout)
        output = done.stdout + done.stderr
        log = os.path.splitext(os.path.basename(script))[0] + '.log'
        self.write(os.path.join('var', 'log', log), output)
        if done.returncode != 0:
            raise RuntimeError('zconsole run %s failed (exit status %s):\n%s'
                               % (script, done.returncode, output[-6000:]))
        return done.stdout

    def stop(self):
        """Stop the server (SIGINT, as Ctrl-C would)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.process.kill()
                self.process.wait(30)
        self.process = None
        if self.output is not None:
            self.output.close()
            self.output = None

    def cleanup(self):
        self.stop()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


class ZopeLayer:
    """A Zope 6 site serving zpgpool_example over HTTP, beside a private
    PostgreSQL server (which tests may stop and start again).

    While set up, ``zope`` is the ``ZopeInstance``, ``server`` the
    ``PostgresServer`` and ``dsn`` the DSN of the example's database.
    Subclasses serve other sites: they override ``database``,
    ``check_installed``, ``make_instance`` and ``make_site``.
    """

    threads = 4
    #: The name of the site's database on the server.
    database = 'zpgpool_zope'

    def __init__(self, name, postgres, module=None):
        self.__name__ = name
        # zope.testrunner finds a layer again by its module and name.
        self.__module__ = module or __name__
        self.__bases__ = (postgres,)
        self.postgres = postgres
        self.zope = None

    @property
    def server(self):
        return self.postgres.server

    def check_installed(self):
        """Fail, saying what to install, when the site cannot run here."""
        if importlib.util.find_spec('zpgpool_example') is None:
            raise RuntimeError(
                'The example Zope product is not installed: pip install -e'
                ' examples/zpgpool_example (scripts/test does).')

    def make_instance(self):
        """The instance the layer serves, on the database ``dsn``."""
        return ZopeInstance(self.dsn, threads=self.threads)

    def make_site(self):
        """Start ``zope`` and make what the tests need in its site."""
        self.zope.start()
        result = self.zope.get('@@example-setup')
        if not result.ok:
            raise RuntimeError('@@example-setup failed: %r\n%s'
                               % (result, self.zope.log_tail()))

    def setUp(self):
        self.check_installed()
        self.dsn = self.postgres.new_database(self.database)
        self.zope = self.make_instance()
        try:
            self.make_site()
        except BaseException:
            self.zope.cleanup()
            self.zope = None
            raise

    def tearDown(self):
        if self.zope is not None:
            self.zope.cleanup()
        self.zope = None

    def testSetUp(self):
        # An earlier test may have left the server stopped.
        if not self.server.is_running():
            self.server.start()


#: A private PostgreSQL server for the Zope site: its tests restart it.
ZOPE_POSTGRES_LAYER = PostgresLayer('ZOPE_POSTGRES_LAYER', private=True)

#: The Zope site serving zpgpool_example, over ZOPE_POSTGRES_LAYER.
ZOPE_LAYER = ZopeLayer('ZOPE_LAYER', ZOPE_POSTGRES_LAYER, module=__name__)
