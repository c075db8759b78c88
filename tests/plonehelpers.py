"""A throwaway Plone 6.2 site serving the example add-on, for test_plone.

``PloneInstance``, the ``ZopeInstance`` of tests/zopehelpers.py, writes a
Zope instance home into a temporary directory (a zope.conf with a
FileStorage and the add-on's DSN in its ``<environment>`` section, a
site.zcml that loads Plone the way a Plone instance does, and a
PasteDeploy zope.ini for waitress), creates a Plone
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
import sys
import time
import urllib.parse
import urllib.request

from zpgpool.testing import PostgresLayer

from tests.zopehelpers import ZopeInstance
from tests.zopehelpers import ZopeLayer
from tests.zopehelpers import fetch

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


class PloneInstance(ZopeInstance):
    """A Zope instance home with a Plone site, in a temporary directory,
    served by waitress through ``runwsgi`` in a subprocess."""

    site_zcml = SITE_ZCML
    ready_view = '@@zpgpool-stats'
    logs = ('create_site.log',) + ZopeInstance.logs
    start_timeout = 180
    home_prefix = 'zpgpool-plone-'

    # One retry more than Zope's default of 3, for SERIALIZABLE work
    # (SerializableTests).
    def __init__(self, dsn, threads=4, retries=4):
        super().__init__(dsn, threads, retries)

    @property
    def site_url(self):
        return '%s/%s' % (self.url, SITE_ID)

    # The DSN is written in zope.conf, not passed in the server's
    # environment: the site is created by a zconsole script and served by
    # runwsgi, and both must find it there (the tests start both without
    # it).
    def conf_environment(self):
        return {DSN_ENV: self.dsn, **super().conf_environment()}

    def environ(self):
        env = dict(os.environ)
        env.pop(DSN_ENV, None)
        return env

    def make_home(self):
        super().make_home()
        self.write('create_site.py', CREATE_SITE.replace(
            '{script_document}', SCRIPT_DOCUMENT))

    def create_site(self, timeout=600):
        """Create the Plone site and install the add-on, with a zconsole
        script; return the seconds it took."""
        if self.home is None:
            self.make_home()
        start = time.monotonic()
        self.run_zconsole('create_site.py', SITE_ID, *ADMIN, timeout=timeout)
        return time.monotonic() - start

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
        return fetch(req, timeout, urllib.request.build_opener(_NoRedirect))

    def get(self, view, **params):
        return self.request('GET', view, **params)

    def post(self, view, **params):
        return self.request('POST', view, **params)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Answer a redirect as it is: the tests look at Plone's 302s (to the
    login form, to @@confirm-action) rather than follow them."""

    def redirect_request(self, *args, **kwargs):
        return None


class PloneLayer(ZopeLayer):
    """A Plone 6.2 site with zpgpool_plone installed, served over HTTP,
    beside a private PostgreSQL server (which tests may stop and start
    again).

    While set up, ``zope`` is the ``PloneInstance``, ``server`` the
    ``PostgresServer``, ``dsn`` the DSN of the add-on's database and
    ``timings`` how long creating the site and starting Zope took and
    ``initial_stats`` the pools' stats before any request used them.
    """

    database = 'zpgpool_plone'

    def __init__(self, name, postgres, module=None):
        super().__init__(name, postgres, module)
        self.timings = {}

    def check_installed(self):
        missing = missing_packages()
        if missing:
            # A missing Plone is a failure, never a skip: scripts/test-plone
            # is what installs it.
            raise RuntimeError(
                'test_plone needs Plone and the example add-on in the Python'
                ' running the tests (%s); missing: %s.  Run scripts/test-plone,'
                ' which makes a virtualenv with both.'
                % (sys.executable, '; '.join(missing)))

    def make_instance(self):
        return PloneInstance(self.dsn, threads=self.threads)

    def make_site(self):
        self.timings['create site'] = self.zope.create_site()
        self.timings['start Zope'] = self.zope.start()
        # The pools as Zope started them, before any request used one.
        self.initial_stats = self.zope.get('@@zpgpool-stats').json


#: A private PostgreSQL server for the Plone site: its tests restart it.
PLONE_POSTGRES_LAYER = PostgresLayer('PLONE_POSTGRES_LAYER', private=True)

#: The Plone site serving zpgpool_plone, over PLONE_POSTGRES_LAYER.
PLONE_LAYER = PloneLayer('PLONE_LAYER', PLONE_POSTGRES_LAYER,
                         module=__name__)
