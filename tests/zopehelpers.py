"""A throwaway Zope 6 WSGI site serving the example product, for test_zope.

``ZopeInstance`` writes an instance home into a temporary directory (the
files ``mkwsgiinstance`` would write, cut to what the test needs: a
zope.conf with a FileStorage, a site.zcml that loads zpgpool_example, and a
PasteDeploy zope.ini for waitress) and serves it with Zope's own
``runwsgi`` in a process of its own, so that Zope's global state (its
configuration, the ZODB, the component registry) stays out of the test
process.  ``ZOPE_LAYER`` runs one such site, with a private PostgreSQL
server of its own beside it.
"""
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from zpgpool.testing import PostgresLayer

from tests.support import python_env

#: The environment variable the example's ZCML reads its DSN from.
DSN_ENV = 'ZPGPOOL_EXAMPLE_DSN'

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
  CHAMELEON_CACHE $INSTANCE/var/cache
</environment>

# The publisher's retries of ConflictError and other TransientErrors
# (Zope's default is 3).
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

# Starts Zope's runwsgi (the console script of the same name) with the
# Python running the tests, whatever is on PATH.
_RUNWSGI = 'import sys; from Zope2.Startup.serve import main; sys.exit(main())'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


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


class ZopeInstance:
    """A Zope 6 instance home in a temporary directory, served by waitress
    through ``runwsgi`` in a subprocess."""

    #: More environment variables for the Zope process.
    extra_environ = {}

    def __init__(self, dsn, threads=4, retries=3):
        self.dsn = dsn
        self.threads = threads
        self.retries = retries
        self.home = None
        self.port = None
        self.process = None

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self.port

    def make_home(self):
        self.home = tempfile.mkdtemp(prefix='zpgpool-zope-')
        for folder in ('etc', 'var', 'var/log', 'var/cache'):
            os.makedirs(os.path.join(self.home, folder), exist_ok=True)
        self.write('etc/zope.conf', ZOPE_CONF.format(home=self.home,
                                                     retries=self.retries))
        self.write('etc/site.zcml', SITE_ZCML)
        self.port = free_port()
        self.write_ini()

    def write(self, name, text):
        with open(os.path.join(self.home, name), 'w', encoding='utf-8') as f:
            f.write(text)

    def write_ini(self):
        self.write('etc/zope.ini', ZOPE_INI.format(
            home=self.home, port=self.port, threads=self.threads))

    def start(self, timeout=90):
        """Start the server and wait until the example's views answer.

        When another program took the port meanwhile, try another one.
        """
        if self.home is None:
            self.make_home()
        for attempt in range(3):
            if self._start(timeout):
                return
            self.port = free_port()
            self.write_ini()
        raise RuntimeError('Zope found no free port:\n%s' % self.log_tail())

    def environ(self):
        """The environment the Zope process runs with: this process's
        import path (see tests/support.py), the example's DSN and
        ``extra_environ``."""
        return python_env(**{DSN_ENV: self.dsn}, **self.extra_environ)

    def _start(self, timeout):
        log = os.path.join(self.home, 'var', 'log', 'runwsgi.log')
        self.output = open(log, 'wb')
        self.process = subprocess.Popen(
            [sys.executable, '-c', _RUNWSGI,
             os.path.join(self.home, 'etc', 'zope.ini')],
            cwd=self.home, env=self.environ(), stdout=self.output,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                returncode = self.process.returncode
                self.stop()
                with open(log, encoding='utf-8', errors='replace') as f:
                    if 'Address already in use' in f.read():
                        return False
                raise RuntimeError('Zope exited with %s at start:\n%s' % (
                    returncode, self.log_tail()))
            try:
                if self.get('@@example-stats', timeout=5).ok:
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
        for name in ('runwsgi.log', 'event.log'):
            path = os.path.join(self.home, 'var', 'log', name)
            try:
                with open(path, encoding='utf-8', errors='replace') as f:
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
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return HTTPResult(response.status,
                                  response.read().decode('utf-8'))
        except urllib.error.HTTPError as e:
            with e:
                return HTTPResult(e.code,
                                  e.read().decode('utf-8', 'replace'))

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
        if getattr(self, 'output', None) is not None:
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
    """

    threads = 4

    def __init__(self, name, postgres):
        self.__name__ = name
        self.__module__ = __name__
        self.__bases__ = (postgres,)
        self.postgres = postgres
        self.zope = None

    @property
    def server(self):
        return self.postgres.server

    def setUp(self):
        if importlib.util.find_spec('zpgpool_example') is None:
            raise RuntimeError(
                'The example Zope product is not installed: pip install -e'
                ' examples/zpgpool_example (scripts/test does).')
        self.dsn = self.postgres.new_database('zpgpool_zope')
        self.zope = ZopeInstance(self.dsn, threads=self.threads)
        try:
            self.zope.start()
            result = self.zope.get('@@example-setup')
            if not result.ok:
                raise RuntimeError('@@example-setup failed: %r\n%s'
                                   % (result, self.zope.log_tail()))
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
ZOPE_LAYER = ZopeLayer('ZOPE_LAYER', ZOPE_POSTGRES_LAYER)
