"""zpgpool.zope, the database adapter for ZSQL Methods, in a real Zope 6.

Most tests talk over HTTP to the site ZSQL_LAYER builds with the ZMI's
own factories (tests/zsqlhelpers.py): ZSQL Methods with arguments and
``<dtml-sqlvar>``, called from Page Templates, on adapters over pools
declared in ZCML, over a pool of the adapter's own, and on a
Products.ZPsycopgDA connection to the same database.  PostgreSQL is
checked with connections of the test's own.  The last tests run the
adapter's pieces in the test process against the same server.
"""
import concurrent.futures
import html
import os
import re
import unittest
import uuid

import psycopg2
import psycopg2.extensions
import transaction
from zope.interface.verify import verifyObject

from tests.poolhelpers import backend_pids
from tests.poolhelpers import closed_port
from tests.poolhelpers import query
from tests.poolhelpers import wait_for
from tests.zsqlhelpers import DSN_ENV
from tests.zsqlhelpers import MANAGER
from tests.zsqlhelpers import ZSQL_LAYER
from tests.zsqlhelpers import SiteBuilder
from tests.zsqlhelpers import lines
from tests.zsqlhelpers import text_of


def python_rows(dsn, kind):
    """zsql_list's rows as psycopg2 returns them, read by the test."""
    return [list(row) for row in query(
        dsn, "SELECT name, price, qty, big, ratio, flag, born, seen, note"
        " FROM zsql_item WHERE kind = %s ORDER BY name", (kind,))]


def masked_of(properties_page):
    """The connection string the Properties form shows."""
    value = re.search(r'name="connection_string"[^>]*value="([^"]*)"',
                      properties_page, re.S).group(1)
    return html.unescape(value)


class ZSQLTestCase(unittest.TestCase):

    layer = ZSQL_LAYER

    @property
    def zope(self):
        return self.layer.zope

    @property
    def dsn(self):
        return self.layer.dsn

    def key(self):
        return 'k%s' % uuid.uuid4().hex[:10]

    def page(self, folder, page, auth=MANAGER, **params):
        path = 'site/%s/%s' % (folder, page)
        if params:
            path += '?' + '&'.join('%s=%s' % item for item in params.items())
        return self.zope.request(path, auth=auth)

    def count(self, kind):
        return query(self.dsn, 'SELECT count(*) FROM zsql_item'
                     ' WHERE kind = %s', (kind,))[0][0]

    def zodb_has(self, folder, id):
        status = self.zope.request('site/%s/%s/manage_main' % (folder, id)
                                   ).status
        self.assertIn(status, (200, 404))
        return status == 200


class RowsTests(ZSQLTestCase):

    def test_rows_come_back_with_their_python_types(self):
        # The adapter on the ZCML pool leaves zdatetime off: the rows are
        # what psycopg2 gives the test, dates included.
        result = self.page('named', 'page_list', kind='fruit')
        self.assertEqual(result.status, 200, result)
        self.assertEqual(lines(result, 'ROW'),
                         [repr(row) for row in python_rows(self.dsn,
                                                           'fruit')])

    def test_column_types_are_zope_type_letters(self):
        result = self.page('own', 'page_list', kind='nut')
        self.assertEqual(result.status, 200, result)
        self.assertEqual(lines(result, 'TYPES'), [repr([
            ('name', 's'), ('price', 'n'), ('qty', 'i'), ('big', 'i'),
            ('ratio', 'n'), ('flag', 'n'), ('born', 'd'), ('seen', 'd'),
            ('note', 't')])])

    def test_zdatetime_gives_zope_datetime_objects(self):
        self.assertEqual(lines(self.page('own', 'page_dates'), 'DATE'),
                         ['True', 'True'])
        self.assertEqual(lines(self.page('named', 'page_dates'), 'DATE'),
                         ['False', 'False'])

    def test_the_same_zsql_methods_give_the_same_rows_as_zpsycopgda(self):
        # Both connections have zdatetime on; "nut" has a quote in a value
        # and NULLs.
        for kind in ('fruit', 'nut', 'none-such'):
            legacy = self.page('legacy', 'page_list', kind=kind)
            own = self.page('own', 'page_list', kind=kind)
            self.assertEqual(legacy.status, 200, legacy)
            self.assertEqual(own.status, 200, own)
            self.assertEqual(lines(own, 'ROW'), lines(legacy, 'ROW'), kind)
            self.assertEqual(len(lines(own, 'ROW')),
                             len(python_rows(self.dsn, kind)))

    def test_an_insert_with_arguments_is_seen_by_the_request_and_kept(self):
        for folder in ('named', 'own', 'twopc'):
            kind = self.key()
            result = self.page(folder, 'page_insert', kind=kind, name='n1')
            self.assertEqual(result.status, 200, result)
            self.assertEqual(lines(result, 'COUNT'), ['1'])
            self.assertEqual(query(
                self.dsn, 'SELECT name, qty FROM zsql_item WHERE kind = %s',
                (kind,)), [('n1', 3)], folder)


class TransactionTests(ZSQLTestCase):

    def test_a_request_failing_after_the_insert_leaves_nothing(self):
        for folder in ('named', 'own', 'twopc'):
            kind = self.key()
            result = self.page(folder, 'page_insert_fail', kind=kind,
                               name='never')
            self.assertEqual(result.status, 500, result)
            self.assertEqual(self.count(kind), 0, folder)

    def test_a_postgresql_vote_failure_leaves_zodb_untouched(self):
        # The page adds a folder to the ZODB and inserts two equal tokens
        # into a DEFERRABLE INITIALLY DEFERRED unique constraint: the
        # request itself succeeds, and PostgreSQL refuses at COMMIT (one
        # phase) or PREPARE TRANSACTION (two-phase), in the vote, after
        # ZODB voted.  The page needs a manager (it adds a folder).
        for folder in ('named', 'own', 'twopc'):
            key = self.key()
            result = self.page(folder, 'page_vote_fail', auth=MANAGER,
                               key=key)
            self.assertEqual(result.status, 500, result)
            self.assertFalse(self.zodb_has(folder, key), folder)
            self.assertEqual(query(self.dsn, 'SELECT count(*) FROM zsql_vote'
                                   ' WHERE token = %s', (key,)), [(0,)])
        self.assertEqual(query(self.dsn, 'SELECT gid FROM pg_prepared_xacts'),
                         [])
        # Without the broken constraint, the same kind of request keeps
        # both its folder and its row.
        key = self.key()
        result = self.page('named', 'page_folder_and_row',
                           auth=MANAGER, key=key)
        self.assertEqual(result.status, 200, result)
        self.assertTrue(self.zodb_has('named', key))
        self.assertEqual(self.count(key), 1)

    def test_a_zsql_method_and_a_view_share_connection_and_transaction(self):
        # @@zsql-shared runs zsql_session (on the adapter over the pool
        # "example") and asks getUtility(IConnectionPool, "example") for
        # connection() itself, in one request.
        first = self.page('named', '@@zsql-shared').json
        self.assertIsNotNone(first)
        self.assertEqual(first['zsql'], first['view'])
        second = self.page('named', '@@zsql-shared').json
        self.assertEqual(second['zsql'], second['view'])
        # A new request is a new transaction.
        self.assertNotEqual(first['zsql'][1], second['zsql'][1])

    def test_serializable_collisions_are_retried_and_all_succeed(self):
        # Each request reads a counter, waits, and writes it plus one, on
        # the adapter over the SERIALIZABLE pool: concurrent requests fail
        # with serialization failures, which the publisher retries.
        name = self.key()
        query(self.dsn, 'INSERT INTO zsql_counter VALUES (%s, 0)'
              ' RETURNING n', (name,))
        clients = ZSQL_LAYER.threads
        with concurrent.futures.ThreadPoolExecutor(clients) as executor:
            results = list(executor.map(
                lambda _: self.page('serial', 'page_counter', name=name),
                range(clients)))
        for result in results:
            self.assertEqual(result.status, 200, result)
        self.assertEqual(query(self.dsn, 'SELECT n FROM zsql_counter'
                               ' WHERE name = %s', (name,)), [(clients,)])
        self.assertEqual(sorted(int(lines(r, 'N')[0].split()[0])
                                for r in results),
                         list(range(1, clients + 1)))
        retries = sum(int(text_of(r).split('RETRY')[1]) for r in results)
        self.assertGreater(retries, 0)


class ZMITests(ZSQLTestCase):

    def test_the_add_form_answers_a_manager_only(self):
        path = 'site/manage_addProduct/zpgpool.zope/' \
               'manage_addZpgpoolConnectionForm'
        result = self.zope.request(path)
        self.assertEqual(result.status, 200, result)
        self.assertIn('action="manage_addZpgpoolConnection"', result.text)
        self.assertEqual(self.zope.request(path, auth=None).status, 401)

    def test_the_add_form_explains_bad_settings(self):
        folder = self.key()
        SiteBuilder(self.zope).folder('site', folder)
        factory = 'site/%s/manage_addProduct/zpgpool.zope/' \
                  'manage_addZpgpoolConnection' % folder
        result = self.zope.request(factory, {'id': 'db', 'pool_name': 'nope'})
        self.assertEqual(result.status, 400, result)
        self.assertIn('no pool named', text_of(result))
        self.assertIn("'example2pc'", text_of(result))
        result = self.zope.request(factory, {
            'id': 'db', 'connection_string': 'env:' + DSN_ENV,
            'maxconn': '0'})
        self.assertEqual(result.status, 400, result)
        self.assertIn('maxconn must be a number, 1 or more',
                      text_of(result))
        self.assertFalse(self.zodb_has(folder, 'db'))

    def test_the_zsql_method_add_form_offers_the_adapters(self):
        result = self.zope.request('site/named/manage_addProduct/'
                                   'ZSQLMethods/add')
        self.assertEqual(result.status, 200, result)
        self.assertIn('db in site/named', result.text)

    def test_the_test_tab_runs_sql_for_a_manager_only(self):
        for folder in ('named', 'own'):
            path = 'site/%s/db/manage_test' % folder
            data = {'query': "SELECT name, qty FROM zsql_item"
                             " WHERE kind = 'nut'"}
            result = self.zope.request(path, data)
            self.assertEqual(result.status, 200, result)
            self.assertIn('almond', result.text)
            self.assertIn('100', result.text)
            self.assertEqual(
                self.zope.request(path, data, auth=None).status, 401)
            self.assertEqual(self.zope.request(
                'site/%s/db/manage_testForm' % folder, auth=None).status,
                401)

    def test_the_browse_tab_lists_tables_and_columns_for_a_manager_only(self):
        path = 'site/own/db/manage_browse'
        result = self.zope.request(path)
        self.assertEqual(result.status, 200, result)
        text = text_of(result)
        for table in ('zsql_item', 'zsql_counter', 'zsql_vote'):
            self.assertIn('public.%s' % table, ' '.join(text.split()))
        for column in ('price', 'numeric', 'character varying'):
            self.assertIn(column, text)
        self.assertEqual(self.zope.request(path, auth=None).status, 401)

    def test_the_status_tab_shows_the_pools_figures(self):
        self.assertEqual(self.page('own', 'page_list', kind='nut').status,
                         200)
        for folder, pool in (('named', 'example'), ('own', None)):
            result = self.zope.request('site/%s/db/manage_main' % folder)
            self.assertEqual(result.status, 200, result)
            for figure in ('checkouts', 'maxconn', 'in_use', 'waiting'):
                self.assertIn('<th>%s</th>' % figure, result.text)
            if pool:
                self.assertIn('<code>%s</code>' % pool, result.text)
            else:
                self.assertIn('pool of its own', result.text)
            self.assertEqual(self.zope.request(
                'site/%s/db/manage_main' % folder, auth=None).status, 401)

    def test_a_password_is_never_shown(self):
        # The layer's DSN carries the server's password.
        secret = psycopg2.extensions.parse_dsn(self.dsn)['password']
        folder = self.key()
        builder = SiteBuilder(self.zope)
        builder.folder('site', folder)
        builder.adapter('site/' + folder, 'zpgpool.zope',
                        'manage_addZpgpoolConnection',
                        connection_string=self.dsn, check='yes')
        for tab in ('manage_main', 'manage_properties', 'manage_browse',
                    'manage_testForm'):
            result = self.zope.request('site/%s/db/%s' % (folder, tab))
            self.assertEqual(result.status, 200, result)
            self.assertNotIn(secret, result.text, tab)
        properties = self.zope.request('site/%s/db/manage_properties'
                                       % folder).text
        self.assertIn('password=***', properties)
        # Saving the form as shown keeps the password (the pool still
        # connects); a bad connection string's error shows none.
        result = self.zope.request(
            'site/%s/db/manage_edit' % folder,
            {'connection_string': masked_of(properties), 'check': 'yes',
             'title': 'again'})
        self.assertIn('Saved.', result.text)
        self.assertNotIn('alert-danger', result.text)
        result = self.zope.request(
            'site/%s/db/manage_edit' % folder,
            {'connection_string': "host='x password=%s" % secret})
        self.assertEqual(result.status, 200, result)
        self.assertIn('alert-danger', result.text)
        self.assertNotIn(secret, result.text)
        self.assertNotIn(secret, self.zope.log_tail(400))

    def test_an_own_pool_closes_when_its_adapter_is_deleted(self):
        folder = self.key()
        builder = SiteBuilder(self.zope)
        builder.folder('site', folder)
        builder.adapter('site/' + folder, 'zpgpool.zope',
                        'manage_addZpgpoolConnection',
                        connection_string='env:' + DSN_ENV, check='yes')
        status = self.zope.request('site/%s/db/manage_main' % folder).text
        app_name = 'zpgpool:' + re.search(
            r'<th>name</th>\s*<td>([^<]+)</td>', status).group(1)
        self.assertEqual(self.page(folder, 'page_list', kind='nut').status,
                         200)
        wait_for(lambda: backend_pids(self.dsn, app_name),
                 'the adapter pool\'s connection')
        # A changed connection string replaces (and closes) the pool.
        before = backend_pids(self.dsn, app_name)
        result = self.zope.request(
            'site/%s/db/manage_edit' % folder,
            {'connection_string': '%s application_name=zsqlchanged%s'
             % (self.dsn, folder), 'check': 'yes'})
        self.assertIn('Saved.', result.text)
        wait_for(lambda: not backend_pids(self.dsn, app_name) & before,
                 'the old pool\'s connections to close')
        self.assertTrue(backend_pids(self.dsn, 'zsqlchanged' + folder))
        # Deleting the adapter closes its pool.
        result = self.zope.request(
            'site/%s/manage_delObjects' % folder, {'ids': 'db'})
        self.assertEqual(result.status, 200, result)
        wait_for(lambda: not backend_pids(self.dsn, 'zsqlchanged' + folder),
                 'the deleted adapter\'s pool to close')


class MigrationTests(ZSQLTestCase):
    """A ZPsycopgDA connection replaced in place by a script run with
    ``zconsole run`` while Zope is stopped, and a zpgpool one turned
    back."""

    def test_replace_and_restore_in_place(self):
        builder = SiteBuilder(self.zope)
        builder.folder('site', 'mig')
        builder.adapter('site/mig', 'ZPsycopgDA',
                        'manage_addZPsycopgConnection',
                        connection_string='ENV:' + DSN_ENV, zdatetime='yes',
                        tilevel='3', encoding='UTF-8')
        builder.folder('site', 'back')
        builder.adapter('site/back', 'zpgpool.zope',
                        'manage_addZpgpoolConnection',
                        connection_string='env:' + DSN_ENV,
                        isolation_level='READ COMMITTED', zdatetime='yes')
        before = {folder: lines(self.page(folder, 'page_list', kind='fruit'),
                                'ROW') for folder in ('mig', 'back')}
        self.assertEqual(len(before['mig']), 2)
        self.assertEqual(before['mig'], before['back'])
        self.zope.stop()
        try:
            output = self.zope.zconsole(MIGRATION_SCRIPT)
        finally:
            self.zope.start()
        self.assertEqual(output.splitlines()[-2:], [
            'mig|Z zpgpool Database Connection|SERIALIZABLE|True|UTF-8',
            'back|Z Psycopg 2 Database Connection|1|ENV:' + DSN_ENV])
        for folder in ('mig', 'back'):
            result = self.page(folder, 'page_list', kind='fruit')
            self.assertEqual(result.status, 200, result)
            self.assertEqual(lines(result, 'ROW'), before[folder])
            kind = self.key()
            self.assertEqual(lines(self.page(folder, 'page_insert',
                                             kind=kind, name='m'), 'COUNT'),
                             ['1'])
            self.assertEqual(self.count(kind), 1)
        self.assertIn('pool of its own',
                      self.zope.request('site/mig/db/manage_main').text)


MIGRATION_SCRIPT = """\
import transaction
from zpgpool.zope.migrate import replace_zpsycopgda, restore_zpsycopgda
new = replace_zpsycopgda(app.site.mig, 'db')
back = restore_zpsycopgda(app.site.back, 'db')
transaction.commit()
new = app.site.mig.db
print('|'.join(map(str, ('mig', new.meta_type, new.isolation_level,
                         new.zdatetime, new.encoding))))
back = app.site.back.db
print('|'.join(map(str, ('back', back.meta_type, back.tilevel,
                         back.connection_string))))
"""


# ---------------------------------------------------------------------------
# The adapter's pieces, in the test process, against a real server.

from zpgpool import ConnectionPool  # noqa: E402
from zpgpool.testing import POSTGRES_LAYER  # noqa: E402


class InProcessTestCase(unittest.TestCase):

    layer = POSTGRES_LAYER
    _dsn = None

    @property
    def dsn(self):
        # One database for the module's in-process tests.
        cls = InProcessTestCase
        if cls._dsn is None or cls._dsn[0] is not self.layer.server:
            cls._dsn = (self.layer.server, self.layer.new_database('zsqlunit'))
        return cls._dsn[1]


class DBQueryTests(InProcessTestCase):
    """``DB.query`` keeps the contract Shared.DC.ZRDB's DA expects."""

    def setUp(self):
        from zpgpool.zope.db import DB
        self.pool = ConnectionPool(self.dsn, name='zsqlunit', minconn=0)
        self.addCleanup(self.pool.closeall)
        transaction.begin()
        self.addCleanup(transaction.abort)
        self.db = DB(self.pool)

    def test_statements_run_in_order_and_the_last_result_comes_back(self):
        items, rows = self.db.query(
            'CREATE TEMP TABLE t (a int, b text, c varchar(7))\0'
            "INSERT INTO t VALUES (1, 'x', 'p'), (2, 'y', NULL)\0\0 \0"
            'SELECT a, b, c FROM t ORDER BY a')
        self.assertEqual([(i['name'], i['type'], i['width']) for i in items],
                         [('a', 'i', 4), ('b', 't', None), ('c', 's', 7)])
        self.assertEqual(rows, [[1, 'x', 'p'], [2, 'y', None]])

    def test_max_rows_and_query_data(self):
        items, rows = self.db.query(
            'SELECT n FROM generate_series(1, %s) AS n', max_rows=3,
            query_data=(10,))
        self.assertEqual(rows, [[1], [2], [3]])
        self.assertEqual(self.db.query('SELECT 1 AS n')[1], [[1]])

    def test_statements_without_rows_give_no_columns(self):
        self.assertEqual(self.db.query('SELECT 1 WHERE false'),
                         ([{'name': '?column?', 'type': 'i', 'width': 4,
                            'null': None}], []))
        self.assertEqual(self.db.query('SET LOCAL work_mem = 4096'),
                         ([], []))

    def test_two_different_result_sets_are_refused(self):
        with self.assertRaises(psycopg2.ProgrammingError) as caught:
            self.db.query('SELECT 1 AS a\0SELECT 2 AS b')
        self.assertIn('one result set', str(caught.exception))
        self.assertIn('(b)', str(caught.exception))

    def test_of_two_alike_result_sets_the_last_comes_back(self):
        items, rows = self.db.query('SELECT 1 AS a\0SELECT 2 AS a')
        self.assertEqual([i['name'] for i in items], ['a'])
        self.assertEqual(rows, [[2]])

    def test_the_transaction_commits_and_aborts_the_work(self):
        table = 'zsql_%s' % uuid.uuid4().hex[:8]
        query(self.dsn, 'CREATE TABLE %s (n int)' % table)
        self.db.query('INSERT INTO %s VALUES (1)' % table)
        transaction.abort()
        self.assertEqual(query(self.dsn, 'SELECT n FROM %s' % table), [])
        transaction.begin()
        self.db.query('INSERT INTO %s VALUES (2)' % table)
        # Nothing is committed by query() itself.
        self.assertEqual(query(self.dsn, 'SELECT n FROM %s' % table), [])
        transaction.commit()
        self.assertEqual(query(self.dsn, 'SELECT n FROM %s' % table), [(2,)])

    def test_zdatetime_casts_on_its_own_cursors_only(self):
        from DateTime import DateTime
        from zpgpool.zope.db import DB
        items, rows = DB(self.pool, zdatetime=True).query(
            "SELECT date '2024-01-02' AS d, timestamp 'infinity' AS i,"
            " time '10:11:12' AS t, timestamptz '2024-05-06 07:08:09+00'"
            " AS z")
        d, i, t, z = rows[0]
        self.assertIsInstance(d, DateTime)
        self.assertEqual((d.year(), d.month(), d.day()), (2024, 1, 2))
        self.assertEqual(i, 'infinity')
        self.assertEqual((t.hour(), t.minute()), (10, 11))
        self.assertEqual(z.toZone('UTC').hour(), 7)
        # The same connection's other cursors keep psycopg2's types.
        items, rows = self.db.query("SELECT date '2024-01-02' AS d")
        self.assertEqual(repr(rows[0][0]), 'datetime.date(2024, 1, 2)')

    def test_tables_and_columns(self):
        table = 'zsql_%s' % uuid.uuid4().hex[:8]
        query(self.dsn, 'CREATE TABLE %s (n int NOT NULL, s varchar(9))'
              % table)
        query(self.dsn, 'CREATE VIEW %s_v AS SELECT n FROM %s'
              % (table, table))
        tables = self.db.tables()
        self.assertIn({'table_schema': 'public', 'table_name': table,
                       'table_type': 'TABLE'}, tables)
        self.assertIn({'table_schema': 'public', 'table_name': table + '_v',
                       'table_type': 'VIEW'}, tables)
        self.assertEqual(self.db.columns(table), [
            {'name': 'n', 'type': 'integer', 'short_type': 'int4',
             'nullable': False, 'width': None},
            {'name': 's', 'type': 'character varying',
             'short_type': 'varchar', 'nullable': True, 'width': 9}])
        self.assertEqual(self.db.columns("x'; DROP TABLE %s; --" % table),
                         [])


class SettingsTests(InProcessTestCase):
    """Bad settings are refused with the adapter, the setting and what is
    allowed; passwords stay hidden."""

    def make(self, **kw):
        from zpgpool.zope.connection import ZpgpoolConnection
        return ZpgpoolConnection('db', 'a title', **kw)

    def assertRefused(self, expected, **kw):
        from zpgpool.zope.pools import SettingsError
        with self.assertRaises(SettingsError) as caught:
            self.make(**kw)
        message = str(caught.exception)
        self.assertIn("zpgpool database connection 'db'", message)
        for part in expected:
            self.assertIn(part, message)
        return message

    def test_bad_settings(self):
        self.assertRefused(['either', 'neither'])
        self.assertRefused(['either', 'both'], pool_name='main',
                           connection_string=self.dsn)
        self.assertRefused(["no pool named 'nosuch'", 'declared pools'],
                           pool_name='nosuch')
        self.assertRefused(['isolation_level', "'SERIALIZABLE'", 'chaos'],
                           connection_string=self.dsn,
                           isolation_level='chaos')
        self.assertRefused(['maxconn', '1 or more', '0'],
                           connection_string=self.dsn, maxconn=0)
        self.assertRefused(['timeout', 'soon'], connection_string=self.dsn,
                           timeout='soon')
        self.assertRefused(['timeout', '0 or more', 'nan'],
                           connection_string=self.dsn, timeout='nan')
        name = 'ZSQL_UNSET_%s' % uuid.uuid4().hex[:6].upper()
        self.assertRefused([name, 'not set'],
                           connection_string='ENV:%s' % name)
        self.assertRefused(['/nonexistent/zsql.dsn', 'cannot read'],
                           connection_string='file:/nonexistent/zsql.dsn')
        message = self.assertRefused(
            ['connection string'],
            connection_string="host='x password=topsecret-zsql")
        self.assertNotIn('topsecret-zsql', message)

    def test_settings_kept_and_the_password_masked(self):
        import psycopg2.extensions
        from zpgpool.zope.pools import masked
        connection = self.make(connection_string=self.dsn,
                               isolation_level='repeatable_read',
                               encoding='LATIN1', zdatetime='',
                               autoopen='Off', maxconn='3')
        self.assertEqual((connection.isolation_level, connection.encoding,
                          connection.zdatetime, connection.autoopen,
                          connection.maxconn),
                         ('REPEATABLE READ', 'LATIN1', False, False, 3))
        secret = psycopg2.extensions.parse_dsn(self.dsn)['password']
        shown = connection.shown_connection_string()
        self.assertNotIn(secret, shown)
        self.assertIn('password=***', shown)
        # The form sends back what it showed: the stored string stays.
        connection.manage_edit(title='t2', connection_string=shown,
                               isolation_level='SERIALIZABLE')
        self.assertEqual(connection.connection_string, self.dsn)
        self.assertEqual(connection.isolation_level, 'SERIALIZABLE')
        self.assertEqual(masked('env:X'), 'env:X')
        self.assertEqual(masked("host='x password=pw"),
                         '(a connection string libpq cannot parse)')

    def test_the_own_pool_runs_with_the_settings(self):
        connection = self.make(connection_string=self.dsn,
                               isolation_level='SERIALIZABLE',
                               encoding='LATIN1', maxconn=2)
        self.addCleanup(lambda: connection._current_pool().close())
        transaction.begin()
        try:
            db = connection()
            shown = [db.query('SHOW %s' % setting)[1]
                     for setting in ('client_encoding',
                                     'transaction_isolation')]
        finally:
            transaction.abort()
        self.assertEqual(shown, [[['LATIN1']], [['serializable']]])
        self.assertEqual(connection._current_pool().maxconn, 2)


class OwnedPoolTests(InProcessTestCase):

    def settings(self, **changes):
        """An adapter's pool settings as owned_pool() takes them."""
        settings = dict(dsn=self.dsn, encoding='', isolation_level='',
                        maxconn=2, timeout=5.0, twophase=False)
        settings.update(changes)
        return tuple(sorted(settings.items()))

    def test_one_pool_per_key_replaced_when_the_settings_change(self):
        from zpgpool.zope import pools
        key = pools.new_key()
        settings = self.settings()
        first = pools.owned_pool(key, 'label', 'zsqlowned', settings)
        self.assertIs(pools.owned_pool(key, 'label', 'zsqlowned', settings),
                      first)
        changed = self.settings(maxconn=3)
        second = pools.owned_pool(key, 'label', 'zsqlowned', changed)
        self.assertIsNot(second, first)
        self.assertTrue(first.closed)
        self.assertIs(pools.peek_owned(key), second)
        self.assertTrue(pools.drop_owned(key, 'test'))
        self.assertTrue(second.closed)
        self.assertIsNone(pools.peek_owned(key))
        self.assertFalse(pools.drop_owned(key, 'test'))

    def test_a_closed_pool_is_made_anew(self):
        from zpgpool.zope import pools
        key = pools.new_key()
        self.addCleanup(pools.drop_owned, key, 'the test is over')
        settings = self.settings()
        first = pools.owned_pool(key, 'label', 'zsqlowned', settings)
        first.close()
        again = pools.owned_pool(key, 'label', 'zsqlowned', settings)
        self.assertIsNot(again, first)
        self.assertFalse(again.closed)

    def test_a_copy_gets_a_key_of_its_own(self):
        from zpgpool.zope.connection import ZpgpoolConnection
        from zpgpool.zope.subscribers import adapter_copied
        connection = ZpgpoolConnection('db', connection_string=self.dsn)
        key = connection._pool_key
        adapter_copied(connection, None)
        self.assertNotEqual(connection._pool_key, key)
        self.assertTrue(connection._pool_key)


class AdapterPoolTests(InProcessTestCase):
    """The pool behind an adapter follows its settings, its loading from
    the ZODB and the Status tab."""

    def make(self, **kw):
        from zpgpool.zope.connection import ZpgpoolConnection
        from zpgpool.zope.pools import drop_owned
        kw.setdefault('connection_string', self.dsn)
        connection = ZpgpoolConnection('db', 'a title', **kw)
        self.addCleanup(drop_owned, connection._pool_key, 'the test is over')
        return connection

    def loaded(self, connection):
        """``connection`` as another ZODB connection loads it."""
        from zpgpool.zope.connection import ZpgpoolConnection
        copy = ZpgpoolConnection.__new__(ZpgpoolConnection)
        copy.__setstate__(connection.__getstate__())
        return copy

    def test_changed_settings_replace_the_pool_at_once(self):
        connection = self.make(maxconn=2)
        old = connection._pool()
        connection.edit('a title', connection_string=self.dsn, maxconn=3)
        self.assertTrue(old.closed)
        new = connection._current_pool()
        self.assertIsNotNone(new)
        self.assertEqual(new.maxconn, 3)

    def test_switching_to_a_declared_pool(self):
        import zope.component
        import zope.component.testing
        from zpgpool.interfaces import IConnectionPool
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        declared = ConnectionPool(self.dsn, name='zsqldeclared', minconn=0)
        self.addCleanup(declared.closeall)
        zope.component.provideUtility(declared, IConnectionPool,
                                      name='declared')
        connection = self.make()
        own = connection._pool()
        connection.edit('a title', pool_name='declared')
        # The own pool is closed, and the connection string (with its
        # password) is no longer kept in the ZODB.
        self.assertTrue(own.closed)
        self.assertEqual(connection.connection_string, '')
        self.assertFalse(connection.owns_pool())
        self.assertIs(connection._pool(), declared)
        self.assertTrue(connection.connected())
        declared.close()
        self.assertFalse(connection.connected())
        self.assertIn('not connected', connection.title_and_id())

    def test_loaded_with_autoopen_opens_its_pool(self):
        connection = self.make()
        pool = self.loaded(connection)._current_pool()
        self.assertIsNotNone(pool)
        # One connection kept open from the start, as ZPsycopgDA had.
        self.assertEqual(pool.minconn, 1)
        wait_for(lambda: pool.stats()['idle'] == 1, 'the opened connection')

    def test_loaded_without_autoopen_makes_no_pool(self):
        connection = self.make(autoopen=False)
        loaded = self.loaded(connection)
        self.assertIsNone(loaded._current_pool())
        self.assertFalse(loaded.connected())
        self.assertEqual(loaded._pool().minconn, 0)

    def test_closed_from_the_status_tab(self):
        connection = self.make()
        connection.connect()
        pool = connection._current_pool()
        self.assertEqual(connection.title_and_id(), 'a title (db), connected')
        connection.manage_close_connection()
        self.assertTrue(pool.closed)
        self.assertFalse(connection.connected())
        self.assertEqual(connection.title_and_id(),
                         'a title (db), not connected')
        # The next use makes a new pool.
        connection.connect()
        self.assertIsNot(connection._current_pool(), pool)
        self.assertTrue(connection.connected())

    def test_adding_with_check_tries_the_pool(self):
        from OFS.Folder import Folder
        from zpgpool import ConnectError
        from zpgpool.zope.connection import manage_addZpgpoolConnection
        from zpgpool.zope.pools import drop_owned
        folder = Folder('f')
        bad = psycopg2.extensions.make_dsn(self.dsn, port=closed_port())
        self.assertEqual(manage_addZpgpoolConnection(
            folder, 'unchecked', connection_string=bad, autoopen=False),
            'unchecked')
        self.addCleanup(drop_owned, folder.unchecked._pool_key, 'test over')
        with self.assertRaises(ConnectError):
            manage_addZpgpoolConnection(folder, 'checked',
                                        connection_string=bad, timeout=0.5,
                                        autoopen=False, check=True)
        self.addCleanup(drop_owned, folder.checked._pool_key, 'test over')


class MigrationFunctionTests(InProcessTestCase):

    def folder(self):
        from OFS.Folder import Folder
        return Folder('f')

    def legacy(self, folder, tilevel=2, zdatetime='yes', encoding='UTF-8'):
        from Products.ZPsycopgDA.DA import Connection
        folder._setObject('db', Connection(
            'db', 'old title', self.dsn, zdatetime, tilevel=tilevel,
            encoding=encoding))
        return folder.db

    def current(self, folder, **kw):
        from zpgpool.zope.connection import ZpgpoolConnection
        kw.setdefault('connection_string', self.dsn)
        folder._setObject('db', ZpgpoolConnection('db', 'new title', **kw))
        return folder.db

    def test_replace_carries_settings_and_local_roles_and_back(self):
        from zpgpool.zope.migrate import replace_zpsycopgda
        from zpgpool.zope.migrate import restore_zpsycopgda
        folder = self.folder()
        old = self.legacy(folder, tilevel=4)
        old.manage_setLocalRoles('bob', ['Editor'])
        new = replace_zpsycopgda(folder, 'db')
        self.assertIs(folder.db.aq_base, new.aq_base)
        self.assertEqual(new.meta_type, 'Z zpgpool Database Connection')
        self.assertEqual(
            (new.title, new.connection_string, new.isolation_level,
             new.encoding, new.zdatetime, new.autoopen),
            ('old title', self.dsn, 'READ COMMITTED', 'UTF-8', True, True))
        self.assertEqual(new.get_local_roles_for_userid('bob'), ('Editor',))
        back = restore_zpsycopgda(folder, 'db')
        self.assertEqual(back.meta_type, 'Z Psycopg 2 Database Connection')
        self.assertEqual((back.title, back.connection_string, back.tilevel,
                          back.encoding, bool(back.zdatetime)),
                         ('old title', self.dsn, 1, 'UTF-8', True))
        self.assertEqual(back.get_local_roles_for_userid('bob'), ('Editor',))

    def test_what_cannot_be_migrated_is_refused_before_any_change(self):
        from zpgpool.zope.connection import ZpgpoolConnection
        from zpgpool.zope.migrate import replace_zpsycopgda
        from zpgpool.zope.migrate import restore_zpsycopgda
        from zpgpool.zope.pools import SettingsError
        folder = self.folder()
        old = self.legacy(folder, tilevel=0)
        with self.assertRaises(SettingsError) as caught:
            replace_zpsycopgda(folder, 'db')
        self.assertIn('autocommit', str(caught.exception))
        self.assertIs(folder.db.aq_base, old.aq_base)
        with self.assertRaises(SettingsError) as caught:
            restore_zpsycopgda(folder, 'db')
        self.assertIn("is a 'Z Psycopg 2 Database Connection', not a",
                      str(caught.exception))
        with self.assertRaises(SettingsError) as caught:
            replace_zpsycopgda(folder, 'nosuch')
        self.assertIn("'f' holds no object 'nosuch'", str(caught.exception))
        folder._setObject('filed', ZpgpoolConnection(
            'filed', connection_string=self.dsn))
        # (Set directly: edit() would read the file.)
        folder.filed.connection_string = 'file:/run/secrets/dsn'
        with self.assertRaises(SettingsError) as caught:
            restore_zpsycopgda(folder, 'filed')
        self.assertIn('connection_string=', str(caught.exception))
        self.assertEqual(folder.filed.meta_type,
                         'Z zpgpool Database Connection')

    def test_isolation_levels_both_ways(self):
        from zpgpool.zope.migrate import replace_zpsycopgda
        from zpgpool.zope.migrate import restore_zpsycopgda
        # tilevel is psycopg2's number; PostgreSQL runs read uncommitted
        # (4) as read committed.
        for tilevel, level in ((1, 'READ COMMITTED'), (2, 'REPEATABLE READ'),
                               (3, 'SERIALIZABLE'), (4, 'READ COMMITTED')):
            folder = self.folder()
            self.legacy(folder, tilevel=tilevel)
            new = replace_zpsycopgda(folder, 'db')
            self.assertEqual(new.isolation_level, level, tilevel)
        # The server's default ('') has no tilevel: ZPsycopgDA's own
        # default, repeatable read, is what its add form would have made.
        for level, tilevel in (('', 2), ('READ COMMITTED', 1),
                               ('REPEATABLE READ', 2), ('SERIALIZABLE', 3)):
            folder = self.folder()
            self.current(folder, isolation_level=level)
            back = restore_zpsycopgda(folder, 'db')
            self.assertEqual(back.tilevel, tilevel, level)

    def test_zdatetime_off_and_no_encoding_are_carried(self):
        from zpgpool.zope.migrate import replace_zpsycopgda
        from zpgpool.zope.migrate import restore_zpsycopgda
        folder = self.folder()
        self.legacy(folder, zdatetime='', encoding='')
        new = replace_zpsycopgda(folder, 'db')
        self.assertEqual((new.zdatetime, new.encoding), (False, ''))
        # zpgpool's '' is the server's encoding; ZPsycopgDA has no such
        # setting, and is given the UTF-8 its add form fills in.
        back = restore_zpsycopgda(folder, 'db')
        self.assertEqual((back.zdatetime, back.encoding), (None, 'UTF-8'))

    def test_onto_a_declared_pool_and_back(self):
        # As the docstring suggests: the settings given win over the old
        # ones, here to use a pool declared in ZCML.
        import zope.component
        import zope.component.testing
        from zpgpool.interfaces import IConnectionPool
        from zpgpool.zope.migrate import replace_zpsycopgda
        from zpgpool.zope.migrate import restore_zpsycopgda
        from zpgpool.zope.pools import SettingsError
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        declared = ConnectionPool(self.dsn, name='zsqlmigrated', minconn=0)
        self.addCleanup(declared.closeall)
        zope.component.provideUtility(declared, IConnectionPool, name='main')
        folder = self.folder()
        self.legacy(folder, tilevel=1)
        new = replace_zpsycopgda(folder, 'db', pool_name='main',
                                 connection_string='',
                                 isolation_level='SERIALIZABLE')
        self.assertEqual(
            (new.pool_name, new.connection_string, new.isolation_level),
            ('main', '', 'SERIALIZABLE'))
        self.assertIs(new._pool(), declared)
        # Back, ZPsycopgDA needs the connection string zpgpool keeps in
        # ZCML and never shows.
        with self.assertRaises(SettingsError) as caught:
            restore_zpsycopgda(folder, 'db')
        self.assertIn("uses the pool 'main' declared in ZCML",
                      str(caught.exception))
        self.assertIn('pass connection_string=', str(caught.exception))
        self.assertIs(folder.db.aq_base, new.aq_base)
        back = restore_zpsycopgda(folder, 'db', connection_string=self.dsn,
                                  tilevel=1)
        self.assertEqual((back.meta_type, back.connection_string,
                          back.tilevel),
                         ('Z Psycopg 2 Database Connection', self.dsn, 1))

    def test_an_environment_variable_is_named_as_zpsycopgda_reads_it(self):
        # zpgpool reads env:NAME and ENV:NAME, blanks after the colon
        # allowed; ZPsycopgDA only ENV:NAME, the name exactly as written.
        from zpgpool.zope.migrate import restore_zpsycopgda
        name = 'ZSQL_MIGRATED_%s' % uuid.uuid4().hex[:6].upper()
        os.environ[name] = self.dsn
        self.addCleanup(os.environ.pop, name)
        for text in ('env:%s', 'env: %s', 'ENV:%s', 'ENV: %s'):
            folder = self.folder()
            self.current(folder, connection_string=text % name)
            back = restore_zpsycopgda(folder, 'db')
            self.assertEqual(back.connection_string, 'ENV:' + name, text)
        # What ZPsycopgDA makes of it: a connection to the server.
        back.connect(back.connection_string)
        self.addCleanup(back._v_database_connection.close)
        self.assertTrue(back.connected())

    def test_owner_and_permission_settings_are_carried(self):
        from zpgpool.zope.migrate import replace_zpsycopgda
        from zpgpool.zope.migrate import restore_zpsycopgda
        folder = self.folder()
        old = self.legacy(folder)
        old.manage_permission('View', ['Manager'], acquire=0)
        old._owner = (['acl_users'], 'bob')     # what changeOwnership keeps
        new = replace_zpsycopgda(folder, 'db')
        back = restore_zpsycopgda(folder, 'db')
        for connection in (new, back):
            self.assertEqual(connection.getOwnerTuple(), (['acl_users'], 'bob'))
            self.assertEqual(
                [role['name'] for role in
                 connection.rolesOfPermission('View') if role['selected']],
                ['Manager'])
            # Not acquired from the folder either.
            self.assertEqual(connection.acquiredRolesAreUsedBy('View'), '')

    def test_the_adapter_provides_its_interface(self):
        from zpgpool.zope.connection import IZpgpoolConnection
        from zpgpool.zope.connection import ZpgpoolConnection
        self.assertTrue(verifyObject(IZpgpoolConnection, ZpgpoolConnection(
            'db', connection_string=self.dsn)))
