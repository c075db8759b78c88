"""Tests for zpgpool.testing's streaming standby fixture, against real
PostgreSQL servers."""
import os
import threading
import time
import unittest

import psycopg2

from zpgpool.testing import STANDBY_LAYER
from zpgpool.testing import PostgresServer
from zpgpool.testing import PostgresServerError
from zpgpool.testing import StandbyLayer
from zpgpool.testing import StandbyServer
from zpgpool.testing import multihost_dsn

from tests.fixturehelpers import fetch


def wait_for(what, check, timeout=30):
    """Poll *check* until it returns something true; fail after *timeout*
    seconds (a bound that only a hang exceeds)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError('%s: not within %s seconds' % (what, timeout))
        time.sleep(0.02)


class StandbyTests(unittest.TestCase):

    layer = STANDBY_LAYER

    def setUp(self):
        self.primary = self.layer.primary
        self.standby = self.layer.standby

    def test_standby_receives_a_committed_row(self):
        self.primary.execute('CREATE TABLE IF NOT EXISTS shipped (n int)')
        self.primary.execute('INSERT INTO shipped VALUES (7)')
        wait_for('the row on the standby', lambda: (7,) in fetch(
            self.layer.standby_dsn, 'SELECT n FROM shipped'))
        self.assertTrue(self.standby.is_in_recovery())
        self.primary.execute('DROP TABLE shipped')

    def test_replication_is_synchronous(self):
        rows = self.primary.execute(
            'SELECT application_name, state, sync_state '
            'FROM pg_stat_replication')
        self.assertEqual(rows, [(self.standby.name, 'streaming', 'sync')])
        self.assertEqual(self.primary.execute('SHOW synchronous_commit'),
                         [('on',)])
        self.assertEqual(self.primary.execute('SHOW wal_level'),
                         [('replica',)])

    def test_commit_waits_for_the_standby(self):
        # With the standby stopped, a COMMIT on the primary waits for it
        # (wait event SyncRep) until it is cancelled; PostgreSQL then warns
        # that it committed locally without the standby.  (A statement
        # timeout would not do: it ends before the COMMIT.)
        self.standby.stop()
        conn = psycopg2.connect(self.layer.primary_dsn)
        conn.autocommit = True
        pid = conn.get_backend_pid()
        waiting = []

        def cancel_the_wait():
            waiting.append(wait_for('the COMMIT waiting', lambda: (
                self.primary.execute(
                    'SELECT wait_event FROM pg_stat_activity WHERE pid = %s',
                    (pid,)) == [('SyncRep',)])))
            self.primary.execute('SELECT pg_cancel_backend(%s)', (pid,))

        canceller = threading.Thread(target=cancel_the_wait)
        canceller.start()
        try:
            with conn.cursor() as cur:
                cur.execute('CREATE TABLE waited (n int)')
        finally:
            canceller.join(60)
            conn.close()
        self.assertEqual(waiting, [True])
        self.assertTrue(any('synchronous replication' in notice
                            for notice in conn.notices), conn.notices)
        self.standby.start()
        self.primary.execute('DROP TABLE waited')

    def test_standby_refuses_writes_until_promoted(self):
        with self.assertRaises(psycopg2.Error) as cm:
            self.standby.execute('CREATE TABLE nope (n int)')
        self.assertIn('read-only', str(cm.exception))
        self.assertIs(self.standby.promote(), self.standby)
        self.assertFalse(self.standby.is_in_recovery())
        self.standby.execute('CREATE TABLE yes (n int)')
        self.assertEqual(self.standby.execute('SELECT count(*) FROM yes'),
                         [(0,)])

    def test_multihost_dsn_finds_the_primary(self):
        port_of = 'SELECT inet_server_port()'
        self.assertEqual(fetch(self.layer.dsn, port_of),
                         [(self.primary.port,)])
        self.primary.execute('CREATE TABLE survivor (n int)')
        self.primary.execute('INSERT INTO survivor VALUES (1)')
        self.primary.stop('immediate')
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(self.layer.dsn)   # only a standby is left
        self.standby.promote()
        self.assertEqual(fetch(self.layer.dsn, port_of),
                         [(self.standby.port,)])
        # Synchronous replication: what the primary committed survived.
        self.assertEqual(fetch(self.layer.dsn, 'SELECT n FROM survivor'),
                         [(1,)])

    def test_new_standby_of_the_promoted_server(self):
        self.primary.stop('immediate')
        promoted = self.standby.promote()
        again = StandbyServer(promoted, name='second').start()
        self.addCleanup(again.cleanup)
        self.assertTrue(again.is_in_recovery())
        self.assertEqual(promoted.execute(
            'SELECT application_name, sync_state FROM pg_stat_replication'),
            [('second', 'sync')])
        promoted.execute('CREATE TABLE back (n int)')
        promoted.execute('INSERT INTO back VALUES (2)')
        wait_for('the row on the new standby', lambda: (2,) in fetch(
            again.dsn(), 'SELECT n FROM back'))
        read_only = multihost_dsn([again, promoted],
                                  target_session_attrs='standby')
        self.assertEqual(fetch(read_only, 'SELECT inet_server_port()'),
                         [(again.port,)])
        again.cleanup()
        # Gone from the synchronous standbys: commits do not wait for it.
        self.assertEqual(promoted.execute('SHOW synchronous_standby_names'),
                         [('',)])
        promoted.execute('INSERT INTO back VALUES (3)')

    def test_two_standbys_of_one_primary(self):
        extra = StandbyServer(self.primary, name='extra').start()
        base = extra.base_dir
        try:
            self.assertEqual(
                self.primary.execute('SHOW synchronous_standby_names'),
                [('FIRST 1 (%s, extra)' % self.standby.name,)])
            # Promoted, it must not wait for the standbys of its primary.
            self.assertEqual(extra.execute('SHOW synchronous_standby_names'),
                             [('',)])
        finally:
            extra.cleanup()
        self.assertEqual(self.primary.execute(
            'SHOW synchronous_standby_names'),
            [('FIRST 1 (%s)' % self.standby.name,)])
        self.assertIn("extra", repr(extra))
        self.assertFalse(extra.is_running())
        self.assertFalse(os.path.exists(base))

    def test_the_callers_pg_variables_do_not_reach_the_copy(self):
        # Meant for another server, PGSSLMODE=require would make
        # pg_basebackup fail here: these servers speak no SSL.
        saved = os.environ.get('PGSSLMODE')
        os.environ['PGSSLMODE'] = 'require'
        try:
            copy = StandbyServer(self.primary, name='ssl', synchronous=False)
            self.addCleanup(copy.cleanup)
            copy.start()
        finally:
            if saved is None:
                del os.environ['PGSSLMODE']
            else:
                os.environ['PGSSLMODE'] = saved
        self.assertTrue(copy.is_in_recovery())

    def test_layer_replaces_a_broken_pair(self):
        old_ports = (self.primary.port, self.standby.port)
        self.primary.stop('immediate')
        self.standby.promote()
        self.layer.testSetUp()
        self.assertTrue(self.layer._intact())
        self.assertNotEqual((self.layer.primary.port,
                             self.layer.standby.port), old_ports)
        self.assertEqual(fetch(self.layer.dsn, 'SELECT inet_server_port()'),
                         [(self.layer.primary.port,)])
        self.layer.testSetUp()   # an intact pair is kept
        self.assertIsNotNone(self.layer.primary)

    def test_new_database(self):
        dsn = self.layer.new_database('replicated')
        (name,), = fetch(dsn, 'SELECT current_database()')
        self.assertTrue(name.startswith('replicated_'), name)
        self.assertIn('target_session_attrs=read-write', dsn)


class StandbyErrorTests(unittest.TestCase):

    def test_name_is_checked(self):
        primary = PostgresServer()
        for name in ('Upper', 'two words', '', 'x' * 64):
            with self.assertRaises(ValueError) as cm:
                StandbyServer(primary, name=name)
            self.assertIn('lower-case identifier', str(cm.exception))

    def test_primary_must_run(self):
        primary = PostgresServer()
        standby = StandbyServer(primary)
        self.addCleanup(standby.cleanup)
        with self.assertRaises(PostgresServerError) as cm:
            standby.start()
        self.assertIn('does not run', str(cm.exception))

    def test_multihost_dsn_needs_servers(self):
        with self.assertRaises(ValueError) as cm:
            multihost_dsn([])
        self.assertIn('at least one server', str(cm.exception))

    def test_asynchronous_standby(self):
        with PostgresServer() as primary:
            with StandbyServer(primary, synchronous=False) as standby:
                self.assertEqual(primary.execute(
                    'SELECT sync_state FROM pg_stat_replication'),
                    [('async',)])
                self.assertTrue(standby.is_in_recovery())

    def test_asynchronous_layer(self):
        layer = StandbyLayer('L', synchronous=False)
        layer.setUp()
        try:
            self.assertEqual(layer.primary.execute(
                'SELECT sync_state FROM pg_stat_replication'), [('async',)])
        finally:
            layer.tearDown()

    def test_configure_checks_and_reloads(self):
        server = PostgresServer()
        self.addCleanup(server.cleanup)
        with self.assertRaises(ValueError):
            server.configure(**{'bad name': 1})
        server.configure(work_mem='5MB')        # not started: kept
        server.start()
        self.assertEqual(server.execute('SHOW work_mem'), [('5MB',)])
        server.configure(work_mem='6MB')
        self.assertEqual(server.execute('SHOW work_mem'), [('6MB',)])
        server.stop()
        server.configure(work_mem=None)          # stopped: written
        server.start()
        self.assertEqual(server.execute('SHOW work_mem'), [('4MB',)])
