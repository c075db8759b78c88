"""Tests for zpgpool.testing's PgBouncer fixture, against the real
pgbouncer program and a real PostgreSQL server."""
import os
import shutil
import tempfile
import threading
import time
import unittest

import psycopg2

from zpgpool.testing import PGBOUNCER_LAYER
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.testing import PgBouncer
from zpgpool.testing import PgBouncerError
from zpgpool.testing import PgBouncerLayer
from zpgpool.testing import PgBouncerUnavailable
from zpgpool.testing import PostgresServer
from zpgpool.testing import find_pgbouncer
from zpgpool.testing import pgbouncer as pgbouncer_module
from zpgpool.testing.support import _execute

from tests.fixturehelpers import fetch
from tests.fixturehelpers import offered_first
from tests.fixturehelpers import taken_port

#: One server connection for every client: what transaction pooling is for.
ONE_SERVER_CONNECTION_LAYER = PgBouncerLayer(
    'ONE_SERVER_CONNECTION_LAYER', default_pool_size=1)


def backend_pid(conn):
    with conn.cursor() as cur:
        cur.execute('SELECT pg_backend_pid()')
        return cur.fetchone()[0]


class TransactionPoolingTests(unittest.TestCase):

    layer = ONE_SERVER_CONNECTION_LAYER

    def connect(self):
        conn = psycopg2.connect(self.layer.dsn)
        self.addCleanup(conn.close)
        return conn

    def test_two_clients_share_one_server_connection(self):
        first, second = self.connect(), self.connect()
        pids = set()
        for conn in (first, second, first, second):
            pids.add(backend_pid(conn))
            conn.commit()
        self.assertEqual(len(pids), 1, pids)
        direct = psycopg2.connect(self.layer.postgres_dsn)
        self.addCleanup(direct.close)
        self.assertNotIn(backend_pid(direct), pids)

    def test_a_transaction_keeps_its_server_connection(self):
        # While the first client's transaction is open, the only server
        # connection is its own: the second client waits, and gets that
        # connection after the COMMIT.
        first, second = self.connect(), self.connect()
        pid = backend_pid(first)
        seen = []
        waiter = threading.Thread(target=lambda: seen.append(
            backend_pid(second)))
        waiter.start()
        deadline = time.monotonic() + 30
        while self.layer.bouncer.show_pool()['cl_waiting'] != 1:
            self.assertLess(time.monotonic(), deadline, 'nobody waits')
            time.sleep(0.02)
        self.assertEqual(seen, [])
        first.commit()
        waiter.join(30)
        self.assertEqual(seen, [pid])
        second.commit()

    def test_admin_console(self):
        fetch(self.layer.dsn, 'SELECT 1')
        bouncer = self.layer.bouncer
        self.assertEqual(bouncer.show_pool()['pool_mode'], 'transaction')
        user = psycopg2.extensions.parse_dsn(self.layer.dsn)['user']
        self.assertEqual(bouncer.show_pool(user=user)['user'], user)
        self.assertIsNone(bouncer.show_pool(user='nobody'))
        self.assertIsNone(bouncer.show_pool('zpgpool_no_such_db'))
        config = dict((row[0], row[1]) for row in
                      self.layer.bouncer.admin('SHOW CONFIG'))
        self.assertEqual(config['default_pool_size'], '1')
        self.assertEqual(config['pool_mode'], 'transaction')

    def test_layer_restarts_a_stopped_bouncer(self):
        bouncer = self.layer.bouncer
        port = bouncer.port
        bouncer.stop()
        self.assertFalse(bouncer.is_running())
        self.assertIn('stopped', repr(bouncer))
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(self.layer.dsn)
        self.layer.testSetUp()
        self.assertTrue(bouncer.is_running())
        self.assertEqual(bouncer.port, port)
        self.assertEqual(fetch(self.layer.dsn, 'SELECT 1'), [(1,)])

    def test_new_database_through_the_bouncer(self):
        dsn = self.layer.new_database('bounced')
        self.assertIn('port=%s' % self.layer.bouncer.port, dsn)
        (name,), = fetch(dsn, 'SELECT current_database()')
        self.assertTrue(name.startswith('bounced_'), name)


class BouncerTests(unittest.TestCase):
    """PgBouncers of their own, in front of POSTGRES_LAYER's server."""

    layer = POSTGRES_LAYER

    def bouncer(self, **kw):
        bouncer = PgBouncer(self.layer.server or self.layer.dsn, **kw)
        self.addCleanup(bouncer.cleanup)
        return bouncer.start()

    def test_session_mode_gives_each_client_its_own_connection(self):
        # The counterpart of transaction pooling: in session mode two
        # clients never share a server connection.
        bouncer = self.bouncer(pool_mode='session', default_pool_size=2)
        first = psycopg2.connect(bouncer.dsn())
        second = psycopg2.connect(bouncer.dsn())
        try:
            pid = backend_pid(first)
            first.commit()
            self.assertNotEqual(backend_pid(second), pid)
            self.assertEqual(backend_pid(first), pid)
        finally:
            first.close()
            second.close()

    def test_unix_socket_and_settings(self):
        bouncer = self.bouncer(max_client_conn=7,
                               settings={'server_idle_timeout': 33})
        self.assertEqual(fetch(bouncer.socket_dsn(),
                               'SELECT current_user'), [('postgres',)])
        conn = psycopg2.connect(bouncer.socket_dsn())
        self.addCleanup(conn.close)
        clients = _execute(bouncer.admin_dsn(), 'SHOW CLIENTS', named=True)
        self.assertIn(('postgres', 'unix'),
                      {(row['database'], row['addr']) for row in clients})
        config = dict((row[0], row[1]) for row in bouncer.admin('SHOW CONFIG'))
        self.assertEqual(config['max_client_conn'], '7')
        self.assertEqual(config['server_idle_timeout'], '33')
        self.assertEqual(config['listen_addr'], '127.0.0.1')
        self.assertTrue(os.path.exists(os.path.join(
            bouncer.socket_dir, '.s.PGSQL.%d' % bouncer.port)))

    def test_wrong_password_is_rejected(self):
        bouncer = self.bouncer()
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(bouncer.dsn(password='wrong'))

    def test_target_given_as_a_dsn(self):
        if self.layer.server is None:
            target = self.layer.dsn
        else:
            target = self.layer.server.dsn()
        bouncer = PgBouncer(target)
        self.addCleanup(bouncer.cleanup)
        with bouncer:
            self.assertEqual(fetch(bouncer.dsn(), 'SELECT 1'), [(1,)])
            base = bouncer.base_dir
        self.assertFalse(os.path.exists(base))
        self.assertFalse(bouncer.is_running())

    def test_start_is_idempotent_and_cleanup_removes_everything(self):
        bouncer = self.bouncer()
        self.assertIs(bouncer.start(), bouncer)
        base = bouncer.base_dir
        bouncer.cleanup()
        self.assertFalse(os.path.exists(base))
        self.assertIsNone(bouncer.base_dir)
        bouncer.cleanup()   # twice is fine

    def test_cleanup_at_exit(self):
        bouncer = self.bouncer()
        base = bouncer.base_dir
        bouncer._cleanup_at_exit()
        self.assertFalse(os.path.exists(base))

    def test_a_failed_start_reports_the_log(self):
        bouncer = PgBouncer(self.layer.server or self.layer.dsn,
                            settings={'auth_type': 'no-such-method'})
        self.addCleanup(bouncer.cleanup)
        with self.assertRaises(PgBouncerError) as cm:
            bouncer.start(timeout=20)
        self.assertIn('did not start', str(cm.exception))
        # At once, and it says so: not as a time-out.
        self.assertIn('it exited with status 1', str(cm.exception))
        self.assertIn('auth_type', str(cm.exception))
        self.assertIn(bouncer.binary, str(cm.exception))
        self.assertFalse(bouncer.is_running())


    def test_taken_port_on_first_start_picks_another(self):
        with taken_port() as taken:
            with offered_first(taken):
                bouncer = self.bouncer()
            self.assertNotEqual(bouncer.port, taken)
            self.assertEqual(fetch(bouncer.dsn(), 'SELECT 1'), [(1,)])

    def test_a_taken_fixed_port_is_an_error(self):
        with taken_port() as taken:
            bouncer = PgBouncer(self.layer.server or self.layer.dsn,
                                port=taken)
            self.addCleanup(bouncer.cleanup)
            with self.assertRaises(PgBouncerError) as cm:
                bouncer.start(timeout=20)
        self.assertIn(':%d: it cannot listen there: another program holds '
                      'the port' % taken, str(cm.exception))


class ServerBackTests(unittest.TestCase):

    def test_the_server_back_is_used_at_once(self):
        # PgBouncer waits server_login_retry seconds (15 by default) after
        # a failed login to the server before it tries again; a test that
        # restarts the server must not wait that long.
        with PostgresServer() as server:
            bouncer = PgBouncer(server)
            self.addCleanup(bouncer.cleanup)
            bouncer.start()
            server.stop()
            with self.assertRaises(psycopg2.OperationalError):
                psycopg2.connect(bouncer.dsn(connect_timeout=2))
            server.start()
            self.assertEqual(fetch(bouncer.dsn(connect_timeout=8),
                                   'SELECT 1'), [(1,)])


class PgBouncerLayerTests(unittest.TestCase):

    layer = PGBOUNCER_LAYER

    def test_layer_names_and_dsn(self):
        self.assertEqual(repr(self.layer),
                         '<PgBouncerLayer zpgpool.testing.PGBOUNCER_LAYER>')
        self.assertEqual(self.layer.__bases__, (POSTGRES_LAYER,))
        self.assertEqual(ONE_SERVER_CONNECTION_LAYER.__module__, __name__)
        self.assertEqual(self.layer.bouncer.pool_mode, 'transaction')
        self.assertEqual(fetch(self.layer.dsn, 'SELECT 1'), [(1,)])

    def test_layer_setup_fails_without_pgbouncer(self):
        layer = PgBouncerLayer('L', binary='/nonexistent/zpgpool/pgbouncer')
        layer.postgres_layer = self.layer.postgres_layer
        with self.assertRaises(PgBouncerUnavailable):
            layer.setUp()
        self.assertIsNone(layer.bouncer)
        layer.tearDown()

    def test_layer_setup_failure_leaves_nothing(self):
        layer = PgBouncerLayer('L', settings={'auth_type': 'no-such-method'})
        # A temporary directory of its own, to see what is left in it.
        tmp = tempfile.mkdtemp(prefix='zpgpool-test-')
        os.chmod(tmp, 0o755)
        self.addCleanup(shutil.rmtree, tmp, True)
        saved, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            self.assertRaises(PgBouncerError, layer.setUp)
        finally:
            tempfile.tempdir = saved
        self.assertIsNone(layer.bouncer)
        self.assertEqual(os.listdir(tmp), [])


class MissingProgramTests(unittest.TestCase):
    """A missing pgbouncer program is an error that says what to do."""

    def setUp(self):
        self.saved_env = os.environ.get(pgbouncer_module.PGBOUNCER_ENV)
        os.environ.pop(pgbouncer_module.PGBOUNCER_ENV, None)

    def tearDown(self):
        if self.saved_env is None:
            os.environ.pop(pgbouncer_module.PGBOUNCER_ENV, None)
        else:
            os.environ[pgbouncer_module.PGBOUNCER_ENV] = self.saved_env

    def test_nonexistent_binary(self):
        with self.assertRaises(PgBouncerUnavailable) as cm:
            PgBouncer('host=127.0.0.1', binary='/nonexistent/bin/pgbouncer')
        message = str(cm.exception)
        self.assertIn('/nonexistent/bin/pgbouncer', message)
        self.assertIn('apt-get install pgbouncer', message)
        self.assertIn('ZPGPOOL_PGBOUNCER', message)

    def test_environment_names_a_missing_program(self):
        os.environ[pgbouncer_module.PGBOUNCER_ENV] = '/nonexistent/pgb'
        with self.assertRaises(PgBouncerUnavailable) as cm:
            find_pgbouncer()
        self.assertIn('/nonexistent/pgb', str(cm.exception))
        self.assertIn('named by ZPGPOOL_PGBOUNCER', str(cm.exception))

    def test_environment_names_the_program(self):
        found = find_pgbouncer()
        os.environ[pgbouncer_module.PGBOUNCER_ENV] = found
        self.assertEqual(find_pgbouncer(), found)

    def test_nothing_on_path_nor_in_the_usual_folders(self):
        # No machine can be made to lack the program the other tests need,
        # so hide it: an empty PATH and no folders to look in.
        saved_path = os.environ.get('PATH', '')
        saved_folders = pgbouncer_module._PGBOUNCER_FOLDERS
        os.environ['PATH'] = ''
        pgbouncer_module._PGBOUNCER_FOLDERS = ()
        try:
            with self.assertRaises(PgBouncerUnavailable) as cm:
                find_pgbouncer()
        finally:
            os.environ['PATH'] = saved_path
            pgbouncer_module._PGBOUNCER_FOLDERS = saved_folders
        self.assertIn('No pgbouncer program was found', str(cm.exception))
        self.assertIn('apt-get install pgbouncer', str(cm.exception))

    def test_usual_folders_are_searched(self):
        found = find_pgbouncer()
        saved_path = os.environ.get('PATH', '')
        saved_folders = pgbouncer_module._PGBOUNCER_FOLDERS
        os.environ['PATH'] = ''
        pgbouncer_module._PGBOUNCER_FOLDERS = ('/nonexistent',
                                               os.path.dirname(found))
        try:
            self.assertEqual(find_pgbouncer(), found)
        finally:
            os.environ['PATH'] = saved_path
            pgbouncer_module._PGBOUNCER_FOLDERS = saved_folders

    def test_not_pgbouncer(self):
        bouncer = PgBouncer('host=127.0.0.1', binary='/bin/true')
        with self.assertRaises(PgBouncerUnavailable) as cm:
            bouncer.version
        self.assertIn('/bin/true does not look like PgBouncer',
                      str(cm.exception))


class BadOptionTests(unittest.TestCase):

    def check(self, expected, **kw):
        with self.assertRaises(ValueError) as cm:
            PgBouncer('host=127.0.0.1', **kw)
        for text in expected:
            self.assertIn(text, str(cm.exception))

    def test_pool_mode(self):
        self.check(['PgBouncer', 'pool_mode', "'sessions'",
                    'session, transaction, statement'], pool_mode='sessions')

    def test_sizes(self):
        self.check(['default_pool_size', 'at least 1', '0'],
                   default_pool_size=0)
        self.check(['max_client_conn', "'9'"], max_client_conn='9')
        self.check(['max_client_conn', 'True'], max_client_conn=True)

    def test_settings(self):
        self.check(['not a pgbouncer.ini setting name'],
                   settings={'pool mode': 'session'})
        self.check(['cannot span lines'],
                   settings={'admin_users': 'a\n[databases]'})
