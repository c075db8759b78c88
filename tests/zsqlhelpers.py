"""A Zope 6 site with ZSQL Methods on zpgpool's database adapter, for
test_zsqlda.

``ZSQL_LAYER`` runs a ``ZSQLInstance``: the ``ZopeInstance`` of
tests/zopehelpers.py (runwsgi in a subprocess, over a private PostgreSQL
server) whose site.zcml also loads ``zpgpool.zope`` and the test view
below, and whose ``inituser`` file makes a manager.  The site's objects
are made over HTTP, through the ZMI's own factories, as that manager
(``SiteBuilder``), in folders of one site:

``/site``
    the ZSQL Methods and the pages (Page Templates) that call them; they
    find the connection ``db`` by acquisition, from the folder they are
    called in:
``/site/named``
    ``db`` on the pool "example" declared in ZCML (one-phase);
``/site/own``
    ``db`` with a pool of its own, from ``env:ZPGPOOL_EXAMPLE_DSN``;
``/site/twopc``, ``/site/serial``
    ``db`` on the pools "example2pc" and "exampleserial";
``/site/legacy``
    ``db``, a Products.ZPsycopgDA connection to the same database.
"""
import base64
import html
import json
import os
import urllib.parse
import urllib.request

import psycopg2

from tests.zopehelpers import DSN_ENV
from tests.zopehelpers import ZOPE_POSTGRES_LAYER
from tests.zopehelpers import ZopeInstance
from tests.zopehelpers import ZopeLayer
from tests.zopehelpers import fetch

MANAGER = ('admin', 'zsql-secret')

HERE = os.path.dirname(os.path.abspath(__file__))

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:browser="http://namespaces.zope.org/browser">
  <include package="Zope2.App" />
  <include package="zpgpool_example" />
  <include package="zpgpool.zope" />
  <browser:page
      for="OFS.interfaces.IFolder"
      name="zsql-shared"
      class="tests.zsqlhelpers.SharedTransaction"
      permission="zope2.Public"
      />
</configure>
"""

SCHEMA = """\
CREATE TABLE zsql_item (
    id serial PRIMARY KEY,
    kind text NOT NULL,
    name varchar(20) NOT NULL,
    price numeric(6, 2),
    qty integer,
    big bigint,
    ratio double precision,
    flag boolean,
    born date,
    seen timestamp,
    note text
);
CREATE TABLE zsql_counter (name text PRIMARY KEY, n integer NOT NULL);
CREATE TABLE zsql_vote (
    token text,
    CONSTRAINT zsql_vote_token UNIQUE (token) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO zsql_item (kind, name, price, qty, big, ratio, flag, born,
                       seen, note) VALUES
    ('fruit', 'apple', 1.50, 3, 10000000000, 0.25, true, '2024-01-02',
     '2024-01-02 03:04:05', 'crisp'),
    ('fruit', 'pear', 2.25, 0, NULL, NULL, false, '1999-12-31',
     '2000-01-01 00:00:00', NULL),
    ('nut', 'almond', 9.99, 100, 1, 1.5, NULL, NULL, NULL, 'o''clock');
"""

#: id -> (arguments, template) of the ZSQL Methods in /site.
ZSQL_METHODS = {
    'zsql_list': ('kind', """\
SELECT name, price, qty, big, ratio, flag, born, seen, note
  FROM zsql_item
 WHERE kind = <dtml-sqlvar kind type="string">
 ORDER BY name"""),
    'zsql_insert': ('kind name qty:int', """\
INSERT INTO zsql_item (kind, name, qty)
VALUES (<dtml-sqlvar kind type="string">, <dtml-sqlvar name type="string">,
        <dtml-sqlvar qty type="int">)"""),
    'zsql_count': ('kind', """\
SELECT count(*) AS n FROM zsql_item
 WHERE kind = <dtml-sqlvar kind type="string">"""),
    'zsql_session': ('', """\
SELECT pg_backend_pid() AS pid, txid_current() AS txid"""),
    'zsql_vote': ('token', """\
INSERT INTO zsql_vote (token) VALUES (<dtml-sqlvar token type="string">)
<dtml-var sql_delimiter>
INSERT INTO zsql_vote (token) VALUES (<dtml-sqlvar token type="string">)"""),
    'zsql_counter_read': ('name', """\
SELECT n FROM zsql_counter WHERE name = <dtml-sqlvar name type="string">"""),
    'zsql_counter_write': ('name n:int', """\
SELECT pg_sleep(0.3)
<dtml-var sql_delimiter>
UPDATE zsql_counter SET n = <dtml-sqlvar n type="int">
 WHERE name = <dtml-sqlvar name type="string">"""),
}

#: id -> text of the pages (Page Templates) in /site.
PAGES = {
    # The rows of zsql_list, one repr per line, and the column types.
    'page_list': """\
<tal:rows define="rows python:here.zsql_list(kind=request['kind'])"
><tal:row repeat="row rows"
>ROW <tal:r replace="python:repr([row[i] for i in range(len(row))])" />
</tal:row>TYPES <tal:t replace="python:repr(
    [(name, rows.data_dictionary()[name]['type'])
     for name in rows.names()])" />
</tal:rows>""",
    # Insert, then count in the same request.
    'page_insert': """\
<tal:i define="ignored python:here.zsql_insert(kind=request['kind'],
                  name=request['name'], qty=3)"
>COUNT <tal:c replace="python:here.zsql_count(kind=request['kind'])[0].n"
/></tal:i>""",
    # Insert, then fail: the request's transaction is aborted.
    'page_insert_fail': """\
<tal:i define="ignored python:here.zsql_insert(kind=request['kind'],
                  name=request['name'], qty=3);
               boom python:1 / 0" />""",
    # Add a folder to the ZODB and insert a pair of tokens that breaks a
    # deferred unique constraint: PostgreSQL refuses at the commit's vote.
    'page_vote_fail': """\
<tal:v define="ignored python:here.manage_addFolder(request['key']);
               ignored2 python:here.zsql_vote(token=request['key'])"
>VOTED</tal:v>""",
    # Add a folder and insert a row, both kept.
    'page_folder_and_row': """\
<tal:v define="ignored python:here.manage_addFolder(request['key']);
               ignored2 python:here.zsql_insert(kind=request['key'],
                   name='x', qty=1)"
>DONE</tal:v>""",
    # Read a counter, wait, write it plus one: SERIALIZABLE collisions.
    'page_counter': """\
<tal:c define="n python:here.zsql_counter_read(name=request['name'])[0].n;
               ignored python:here.zsql_counter_write(name=request['name'],
                   n=n + 1)"
>N <tal:n replace="python:n + 1" /> RETRY <tal:r
   replace="request/retry_count" /></tal:c>""",
    # Whether date columns came back as Zope DateTime objects.
    'page_dates': """\
<tal:d repeat="row python:here.zsql_list(kind='fruit')"
>DATE <tal:x replace="python:same_type(row.born,
                           modules['DateTime'].DateTime())" />
</tal:d>""",
}

#: folder id -> how its "db" is made: (product, factory, form fields).
ADAPTERS = {
    'named': ('zpgpool.zope', 'manage_addZpgpoolConnection',
              {'pool_name': 'example', 'zdatetime': ''}),
    'own': ('zpgpool.zope', 'manage_addZpgpoolConnection',
            {'connection_string': 'env:' + DSN_ENV, 'zdatetime': 'yes',
             'check': 'yes'}),
    'twopc': ('zpgpool.zope', 'manage_addZpgpoolConnection',
              {'pool_name': 'example2pc'}),
    'serial': ('zpgpool.zope', 'manage_addZpgpoolConnection',
               {'pool_name': 'exampleserial'}),
    'legacy': ('ZPsycopgDA', 'manage_addZPsycopgConnection',
               {'connection_string': 'ENV:' + DSN_ENV, 'zdatetime': 'yes',
                'tilevel': '2', 'encoding': 'UTF-8', 'check': 'yes'}),
}


class SharedTransaction:
    """``@@zsql-shared`` on a folder: the backend pid and transaction id
    seen by the folder's ZSQL Method ``zsql_session`` and by the pool
    "example" asked directly, in one request (JSON)."""

    def __init__(self, context, request):
        self.context = context
        self.request = request

    def __call__(self):
        from zope.component import getUtility
        from zpgpool.interfaces import IConnectionPool
        row = self.context.zsql_session()[0]
        cursor = getUtility(IConnectionPool, 'example').connection().cursor()
        cursor.execute('SELECT pg_backend_pid(), txid_current()')
        pid, txid = cursor.fetchone()
        self.request.response.setHeader('Content-Type', 'application/json')
        return json.dumps({'zsql': [row.pid, row.txid],
                           'view': [pid, txid]})


class ZSQLInstance(ZopeInstance):
    """The Zope instance of zopehelpers with zpgpool.zope loaded, the
    tests directory importable, and a manager user."""

    site_zcml = SITE_ZCML

    def make_home(self):
        super().make_home()
        # Zope makes a manager from this file when the ZODB has no user.
        self.write('inituser', '%s:%s\n' % MANAGER)
        # The tests directory is importable in Zope without more: its
        # parent is on the test's sys.path, which python_env() hands down.
        self.extra_environ = {'INSTANCE_HOME': self.home}

    def request(self, path, data=None, auth=MANAGER, timeout=60):
        """GET (or, with *data*, POST) *path*; return an HTTPResult.
        *auth* is a (user, password) pair or None for anonymous."""
        url = '%s/%s' % (self.url, path.lstrip('/'))
        body = None
        if data is not None:
            body = urllib.parse.urlencode(data).encode('utf-8')
        request = urllib.request.Request(url, data=body)
        if auth is not None:
            token = base64.b64encode(('%s:%s' % auth).encode()).decode()
            request.add_header('Authorization', 'Basic ' + token)
        return fetch(request, timeout)

    def zconsole(self, script_text):
        """Run *script_text* with ``zconsole run`` against the instance's
        zope.conf (the server must be stopped: FileStorage is locked);
        return its output."""
        self.write('script.py', script_text)
        return self.run_zconsole('script.py')


def text_of(result):
    """The page's text with HTML entities decoded."""
    return html.unescape(result.text)


def lines(result, tag):
    """The lines of a page that start with *tag*, without it."""
    return [line[len(tag) + 1:] for line in text_of(result).splitlines()
            if line.startswith(tag + ' ')]


class SiteBuilder:
    """Makes the site's objects through the ZMI's factories, over HTTP."""

    def __init__(self, zope):
        self.zope = zope

    def post(self, path, **data):
        result = self.zope.request(path, data)
        if result.status != 200:
            raise RuntimeError('POST %s %r failed: %r\n%s' % (
                path, data, result, self.zope.log_tail()))
        return result

    def folder(self, container, id):
        self.post('%s/manage_addProduct/OFSP/manage_addFolder' % container,
                  id=id)

    def adapter(self, container, product, factory, **fields):
        self.post('%s/manage_addProduct/%s/%s' % (container, product,
                                                  factory),
                  id='db', title='db in %s' % container, **fields)

    def zsql(self, container, id, arguments, template):
        self.post('%s/manage_addProduct/ZSQLMethods/manage_addZSQLMethod'
                  % container, id=id, title=id, connection_id='db',
                  arguments=arguments, template=template)

    def page(self, container, id, text):
        self.post('%s/manage_addProduct/PageTemplates/manage_addPageTemplate'
                  % container, id=id, text=text)

    def build(self):
        self.folder('', 'site')
        for id, (arguments, template) in ZSQL_METHODS.items():
            self.zsql('site', id, arguments, template)
        for id, text in PAGES.items():
            self.page('site', id, text)
        for folder, (product, factory, fields) in ADAPTERS.items():
            self.folder('site', folder)
            self.adapter('site/' + folder, product, factory, **fields)


class ZSQLLayer(ZopeLayer):
    """A Zope 6 site with zpgpool.zope and ZSQL Methods (see the module's
    docstring), beside a private PostgreSQL server."""

    database = 'zpgpool_zsql'

    def make_instance(self):
        conn = psycopg2.connect(self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(SCHEMA)
        finally:
            conn.close()
        # Generous retries: the SERIALIZABLE test has four requests
        # collide on one row.
        return ZSQLInstance(self.dsn, threads=self.threads, retries=10)

    def make_site(self):
        self.zope.start()
        SiteBuilder(self.zope).build()


#: The Zope site of this module, over zopehelpers' private PostgreSQL.
ZSQL_LAYER = ZSQLLayer('ZSQL_LAYER', ZOPE_POSTGRES_LAYER, module=__name__)
