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
import unittest
import uuid

import psycopg2
import transaction
from zope.interface.verify import verifyObject

from tests.poolhelpers import backend_pids
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
    import html
    import re
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
        app_name = 'zpgpool:zsql:/site/%s/db' % folder
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
