"""A throwaway Plone 6.2 site serving the example add-on, for test_plone.

``PloneInstance`` writes a Zope instance home into a temporary directory
(a zope.conf with a FileStorage and the add-on's DSN in its
``<environment>`` section, a site.zcml that loads Plone the way a Plone
instance does, and a PasteDeploy zope.ini for waitress), creates a Plone
site in it with a ``zconsole`` script (``plone.distribution``'s API with
the "classic" distribution, then the add-on installed with ``plone.api``),
and serves it with Zope's own ``runwsgi`` in a process of its own.
``PLONE_LAYER`` runs one such site, with a private PostgreSQL server of its
own beside it.

Nothing here is imported from Plone: the test process talks to the site
over HTTP only, so it needs no Plone installed to report that Plone is
missing.
"""
import base64
import importlib.util
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

from tests.zopehelpers import HTTPResult
from tests.zopehelpers import free_port

#: The environment variable the add-on's ZCML reads its DSN from.
DSN_ENV = 'ZPGPOOL_PLONE_DSN'

#: The Plone site's id, and the Zope manager the tests log in as.
SITE_ID = 'Plone'
ADMIN = ('admin', 'zpgpool-secret')

#: The Document the site-creation script adds once the add-on is
#: installed.
SCRIPT_DOCUMENT = 'made-by-script'

#: The packages a Plone test needs in the Python running the tests, and
#: what installs each.
REQUIRED = (
    ('Products.CMFPlone', 'Plone 6.2: scripts/test-plone installs it'),
    ('plone.distribution', 'Plone 6.2: scripts/test-plone installs it'),
    ('plone.api', 'Plone 6.2: scripts/test-plone installs it'),
    ('zpgpool_plone', 'the example add-on: pip install -e'
                      ' examples/zpgpool_plone (scripts/test-plone does)'),
)

# The DSN is written here, not passed in the server's environment: the
# site is created by a zconsole script and served by runwsgi, and both
# must find it in zope.conf (the tests start both without it).
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
  {dsn_env} {dsn}
  CHAMELEON_CACHE $INSTANCE/var/cache
</environment>

# The publisher's retries of ConflictError and other TransientErrors:
# raised from Zope's default of 3 for SERIALIZABLE work.  Retry n waits a
# random time of up to 2**(n-1) seconds first.
max-conflict-retries {retries}
"""

# What a Plone instance's site.zcml holds (Plone's own packages are
# loaded as Zope products; Products.CMFPlone then loads the add-ons
# through their autoinclude entry points), plus the add-on's test-only
# views.
SITE_ZCML = """\
<configure
    xmlns="http://namespaces.zope.org/zope"
    xmlns:meta="http://namespaces.zope.org/meta"
    xmlns:five="http://namespaces.zope.org/five">
  <include package="Zope2.App" />
  <include package="Products.Five" />
  <meta:redefinePermission from="zope2.Public" to="zope.Public" />
  <five:loadProducts file="meta.zcml" />
  <five:loadProducts />
  <five:loadProductsOverrides />
  <securityPolicy component="AccessControl.security.SecurityPolicy" />
  <include package="zpgpool_plone" file="testing.zcml" />
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

# Run with ``zconsole run etc/zope.conf`` (``app`` is the Zope
# application, as the system user): the Zope manager the tests log in as,
# the Plone site from plone.distribution's "classic" distribution with its
# example content (added before the add-on is installed, so the add-on's
# subscriber must leave it alone), the add-on installed, and then one
# Document (which the subscriber must mirror).
CREATE_SITE = """\
import sys

import transaction
from plone import api
from plone.distribution.api import site as site_api
from zope.component.hooks import setSite

# zconsole leaves its own arguments in front of the script's.
site_id, user, password = sys.argv[-3:]
SCRIPT_DOCUMENT = '{script_document}'
app.acl_users._doAddUser(user, password, ['Manager'], [])
transaction.commit()
site = site_api.create(app, 'classic', {
    'site_id': site_id, 'title': 'zpgpool test site',
    'setup_content': True})
setSite(site)
with api.env.adopt_roles(['Manager']):
    if not api.addon.install('zpgpool_plone'):
        raise SystemExit('installing zpgpool_plone failed')
    transaction.commit()
    # Content added by a script, in a site with the add-on installed.
    api.content.create(container=site, type='Document',
                       id=SCRIPT_DOCUMENT, title='Made by a script',
                       safe_id=False)
transaction.commit()
print('created the Plone site %s with zpgpool_plone installed' % site_id)
"""

# Starts Zope's runwsgi and zconsole (the console scripts of the same
# names) with the Python running the tests, whatever is on PATH.
_RUNWSGI = 'import sys; from Zope2.Startup.serve import main; sys.exit(main())'
_ZCONSOLE = 'import sys; from Zope2.utilities.zconsole import main; main(sys.argv)'


def missing_packages():
    """The required packages this Python cannot import, with what
    installs each."""
    missing = []
    for name, how in REQUIRED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:     # its parent package is missing
            found = False
        if not found:
            missing.append('%s (%s)' % (name, how))
    return missing


class PloneInstance:
    """A Zope instance home with a Plone site, in a temporary directory,
    served by waitress through ``runwsgi`` in a subprocess."""

    def __init__(self, dsn, threads=4, retries=4):
        self.dsn = dsn
        self.threads = threads
        self.retries = retries
        self.home = None
        self.port = None
        self.process = None
        self.output = None
        self.starts = 0

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self.port

    @property
    def site_url(self):
        return '%s/%s' % (self.url, SITE_ID)

    def path(self, *parts):
        return os.path.join(self.home, *parts)

    def make_home(self):
        self.home = tempfile.mkdtemp(prefix='zpgpool-plone-')
        for folder in ('etc', 'var', 'var/log', 'var/cache'):
            os.makedirs(self.path(folder), exist_ok=True)
        self.write('etc/zope.conf', ZOPE_CONF.format(
            home=self.home, dsn_env=DSN_ENV, dsn=self.dsn,
            retries=self.retries))
        self.write('etc/site.zcml', SITE_ZCML)
        self.write('create_site.py', CREATE_SITE.replace(
            '{script_document}', SCRIPT_DOCUMENT))
        self.port = free_port()
        self.write_ini()

    def write(self, name, text):
        with open(self.path(name), 'w', encoding='utf-8') as f:
            f.write(text)

    def write_ini(self):
        self.write('etc/zope.ini', ZOPE_INI.format(
            home=self.home, port=self.port, threads=self.threads))

    def environ(self):
        # The DSN must come from zope.conf, not from the test's
        # environment.
        env = dict(os.environ)
        env.pop(DSN_ENV, None)
        return env

    def create_site(self, timeout=600):
        """Create the Plone site and install the add-on, with a zconsole
        script; return the seconds it took."""
        if self.home is None:
            self.make_home()
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, '-c', _ZCONSOLE, 'run',
             self.path('etc', 'zope.conf'), self.path('create_site.py'),
             SITE_ID, *ADMIN],
            cwd=self.home, env=self.environ(), capture_output=True,
            text=True, timeout=timeout)
        with open(self.path('var', 'log', 'create_site.log'), 'w') as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(
                'creating the Plone site failed (exit status %s):\n%s'
                % (proc.returncode, (proc.stdout + proc.stderr)[-6000:]))
        return time.monotonic() - start

    def start(self, timeout=180):
        """Start the server and wait until the add-on's views answer; return
        the seconds it took.  When another program took the port meanwhile,
        try another one."""
        start = time.monotonic()
        for attempt in range(3):
            if self._start(timeout):
                self.starts += 1
                return time.monotonic() - start
            self.port = free_port()
            self.write_ini()
        raise RuntimeError('Zope found no free port:\n%s' % self.log_tail())

    def _start(self, timeout):
        log = self.path('var', 'log', 'runwsgi.log')
        self.output = open(log, 'ab')
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
                    if 'Address already in use' in f.read():
                        return False
                raise RuntimeError('Zope exited with %s at start:\n%s' % (
                    returncode, self.log_tail()))
            try:
                if self.get('@@zpgpool-stats', timeout=5).ok:
                    return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('Plone did not answer within %ss:\n%s'
                                   % (timeout, self.log_tail()))
            time.sleep(0.2)

    def restart(self):
        """Stop the server and start it again on the same instance home
        and port."""
        self.stop()
        self.start()

    def log_tail(self, lines=40):
        text = ''
        for name in ('create_site.log', 'runwsgi.log', 'event.log'):
            try:
                with open(self.path('var', 'log', name), encoding='utf-8',
                          errors='replace') as f:
                    text += '--- %s\n' % name
                    text += ''.join(f.readlines()[-lines:])
            except OSError:
                pass
        return text

    def event_log(self):
        try:
            with open(self.path('var', 'log', 'event.log'), encoding='utf-8',
                      errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def request(self, method, view, auth=True, token=None, timeout=60,
                **params):
        """Send ``method /Plone/view`` with *params* (in the query string
        for GET, as a form body otherwise) and return an ``HTTPResult``;
        HTTP error statuses are results, not exceptions.  *auth* logs in
        as the Zope manager (basic auth); *token* goes in the
        ``X-CSRF-TOKEN`` header."""
        url = '%s/%s' % (self.site_url, view)
        data = None
        if params:
            encoded = urllib.parse.urlencode(params)
            if method == 'GET':
                url += '?' + encoded
            else:
                data = encoded.encode('ascii')
        req = urllib.request.Request(url, data=data, method=method)
        if auth:
            req.add_header('Authorization', 'Basic ' + base64.b64encode(
                ('%s:%s' % ADMIN).encode('utf-8')).decode('ascii'))
        if token is not None:
            req.add_header('X-CSRF-TOKEN', token)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as response:
                return HTTPResult(response.status,
                                  response.read().decode('utf-8'))
        except urllib.error.HTTPError as e:
            with e:
                return HTTPResult(e.code,
                                  e.read().decode('utf-8', 'replace'))

    def get(self, view, **params):
        return self.request('GET', view, **params)

    def post(self, view, **params):
        return self.request('POST', view, **params)

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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Answer a redirect as it is: the tests look at Plone's 302s (to the
    login form, to @@confirm-action) rather than follow them."""

    def redirect_request(self, *args, **kwargs):
        return None


class PloneLayer:
    """A Plone 6.2 site with zpgpool_plone installed, served over HTTP,
    beside a private PostgreSQL server (which tests may stop and start
    again).

    While set up, ``plone`` is the ``PloneInstance``, ``server`` the
    ``PostgresServer``, ``dsn`` the DSN of the add-on's database and
    ``timings`` how long creating the site and starting Zope took and
    ``initial_stats`` the pools' stats before any request used them.
    """

    threads = 4

    def __init__(self, name, postgres):
        self.__name__ = name
        self.__module__ = __name__
        self.__bases__ = (postgres,)
        self.postgres = postgres
        self.plone = None
        self.timings = {}

    @property
    def server(self):
        return self.postgres.server

    def setUp(self):
        missing = missing_packages()
        if missing:
            # A missing Plone is a failure, never a skip: scripts/test-plone
            # is what installs it.
            raise RuntimeError(
                'test_plone needs Plone and the example add-on in the Python'
                ' running the tests (%s); missing: %s.  Run scripts/test-plone,'
                ' which makes a virtualenv with both.'
                % (sys.executable, '; '.join(missing)))
        self.dsn = self.postgres.new_database('zpgpool_plone')
        self.plone = PloneInstance(self.dsn, threads=self.threads)
        try:
            self.timings['create site'] = self.plone.create_site()
            self.timings['start Zope'] = self.plone.start()
            # The pools as Zope started them, before any request used one.
            self.initial_stats = self.plone.get('@@zpgpool-stats').json
        except BaseException:
            self.plone.cleanup()
            self.plone = None
            raise

    def tearDown(self):
        if self.plone is not None:
            self.plone.cleanup()
        self.plone = None

    def testSetUp(self):
        # An earlier test may have left the server stopped.
        if not self.server.is_running():
            self.server.start()


#: A private PostgreSQL server for the Plone site: its tests restart it.
PLONE_POSTGRES_LAYER = PostgresLayer('PLONE_POSTGRES_LAYER', private=True)

#: The Plone site serving zpgpool_plone, over PLONE_POSTGRES_LAYER.
PLONE_LAYER = PloneLayer('PLONE_LAYER', PLONE_POSTGRES_LAYER)
