"""Tests for the transaction integration (datamanager.py), against a real
PostgreSQL server."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import transaction
import transaction.interfaces
from zope.interface.verify import verifyObject

from zpgpool.statements import ONE_PHASE_SESSION_RESET
from zpgpool.testing import POSTGRES_LAYER


from tests.poolhelpers import NO_TWOPHASE_LAYER
from tests.poolhelpers import crash_in_commit
from tests.poolhelpers import query
from tests.scaleouthelpers import run_threads
from tests.support import python_env

JOIN_TIMEOUT = 60
# The last message of a one-phase transaction that changed its session.
RESET_AND_COMMIT = ONE_PHASE_SESSION_RESET + "; COMMIT"


class _Base(unittest.TestCase):

    layer = POSTGRES_LAYER
    table = "dm_items"

    def setUp(self):
        transaction.abort()
        self.dsn = self.layer.dsn
        self.admin = psycopg2.connect(self.dsn)
        self.admin.autocommit = True
        self.sql("DROP TABLE IF EXISTS %s" % self.table)
        self.sql("CREATE TABLE %s (id serial PRIMARY KEY, value text UNIQUE"
                 " DEFERRABLE INITIALLY DEFERRED)" % self.table)
        self.pools = []

    def tearDown(self):
        transaction.abort()
        for pool in self.pools:
            pool.closeall()
        for (gid,) in self.sql("SELECT gid FROM pg_prepared_xacts WHERE gid "
                               "LIKE 'zpgpool:%%'"):
            self.sql("ROLLBACK PREPARED %s", (gid,))
        self.sql("DROP TABLE IF EXISTS %s" % self.table)
        self.admin.close()

    def sql(self, query, params=None):
        cur = self.admin.cursor()
        cur.execute(query, params)
        rows = cur.fetchall() if cur.description else None
        cur.close()
        return rows

    def assertNothingPrepared(self):
        self.assertEqual(self.sql("SELECT count(*) FROM pg_prepared_xacts"),
                         [(0,)])

    def values(self):
        return [v for (v,) in self.sql("SELECT value FROM %s ORDER BY id"
                                       % self.table)]

    def _makeOne(self, **kw):
        from zpgpool import ConnectionPool
        kw.setdefault("name", "dm")
        kw.setdefault("maxconn", 4)
        pool = ConnectionPool(self.dsn, **kw)
        self.pools.append(pool)
        return pool

    def insert(self, pool, value):
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO %s (value) VALUES (%%s)" % self.table,
                    (value,))
        cur.close()

    def value_in_next_transaction(self, pool, query):
        """What *query* returns (first column, first row) on *pool*'s
        connection, in a transaction that is then aborted."""
        cur = pool.connection().cursor()
        cur.execute(query)
        value = cur.fetchone()[0]
        transaction.abort()
        return value

    def session_statement(self, statement, changes_session):
        """Run *statement* through a new one-connection pool, in the
        current transaction, and check whether the data manager takes it
        for a change of session state; return the pool and the backend's
        pid."""
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        conn.cursor().execute(statement)
        self.assertEqual(pool.thread_local.state.dm.dirty, changes_session)
        return pool, conn.get_backend_pid()

    def assertDuplicateFailsCommit(self, pool):
        """Insert one value twice through *pool* in the current
        transaction: the deferred unique constraint fails its COMMIT (or
        PREPARE), and aborting it leaves no row."""
        self.insert(pool, "dup")
        self.insert(pool, "dup")
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            transaction.commit()
        transaction.abort()
        self.assertEqual(self.values(), [])

    def assertZODBConflictFailsCommit(self, db, pool):
        """Write ZODB's root in a transaction that also inserts a row
        through *pool*, while another connection commits a change to the
        root first: the commit fails with ConflictError, and leaves no
        row."""
        import ZODB.POSException
        zconn = db.open()
        zconn.root()["value"] = 0
        transaction.commit()
        tm2 = transaction.TransactionManager()
        zconn2 = db.open(transaction_manager=tm2)
        zconn2.root()["value"] = 2
        zconn.root()["value"] = 1
        tm2.commit()
        zconn2.close()
        self.insert(pool, "with zodb")
        with self.assertRaises(ZODB.POSException.ConflictError):
            transaction.commit()
        transaction.abort()
        zconn.close()
        self.assertEqual(self.values(), [])


def attempts(work, times):
    """Run ``work(n)`` as attempt n = 1, 2, ... of one transaction, which
    ``transaction.manager.attempts(times)`` retries after a TransientError;
    return how many attempts it took."""
    tries = 0
    for attempt in transaction.manager.attempts(times):
        with attempt:
            tries += 1
            work(tries)
    return tries


class OnePhaseTests(_Base):

    def test_commit_makes_work_visible(self):
        pool = self._makeOne()
        self.insert(pool, "a")
        self.assertEqual(self.values(), [])   # not yet committed
        transaction.commit()
        self.assertEqual(self.values(), ["a"])
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_abort_rolls_back(self):
        pool = self._makeOne()
        self.insert(pool, "a")
        transaction.abort()
        self.assertEqual(self.values(), [])
        conn = pool.connection()
        self.assertEqual(conn.get_transaction_status(),
                         ext.TRANSACTION_STATUS_IDLE)

    def test_same_connection_across_transactions(self):
        pool = self._makeOne()
        first = pool.connection()
        self.assertIs(pool.connection(), first)
        self.insert(pool, "a")
        transaction.commit()
        second = pool.connection()
        self.assertIs(second, first)
        transaction.abort()
        self.assertIs(pool.connection(), first)

    def test_data_manager_provides_its_interfaces(self):
        pool = self._makeOne()
        pool.connection()
        dm = pool.thread_local.state.dm
        verifyObject(transaction.interfaces.IDataManager, dm)
        verifyObject(transaction.interfaces.ISavepointDataManager, dm)
        self.assertIsInstance(dm.sortKey(), str)
        # After the names ZODB's storages use (paths, storage names).
        self.assertGreater(dm.sortKey(), "/tmp/Data.fs:1")
        self.assertGreater(dm.sortKey(), "MappingStorage:1")

    def test_kept_connection_joins_next_transaction(self):
        pool = self._makeOne()
        conn = pool.connection()
        transaction.commit()
        # The application kept ``conn``; its work must still be transactional.
        cur = conn.cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('kept')")
        self.assertEqual(self.values(), [])
        transaction.abort()
        self.assertEqual(self.values(), [])
        cur.execute("INSERT INTO dm_items (value) VALUES ('kept2')")
        transaction.commit()
        self.assertEqual(self.values(), ["kept2"])
        self.assertEqual(conn.get_transaction_status(),
                         ext.TRANSACTION_STATUS_IDLE)

    def test_no_statement_sends_nothing(self):
        pool = self._makeOne()
        conn = pool.connection()
        backend = conn.get_backend_pid()
        transaction.commit()
        # psycopg2 sends COMMIT only when it sent BEGIN; it never did.
        self.assertEqual(conn.status, ext.STATUS_READY)
        state = self.sql("SELECT state FROM pg_stat_activity WHERE pid = %s",
                         (backend,))
        self.assertEqual(state, [("idle",)])

    def test_manual_commit_is_refused(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne()
        conn = pool.connection()
        for action in (conn.commit, conn.rollback,
                       lambda: setattr(conn, "autocommit", True),
                       lambda: conn.tpc_begin("x"),
                       lambda: conn.set_session(readonly=True),
                       lambda: conn.set_client_encoding("LATIN1"),
                       conn.__enter__):
            with self.assertRaises(ConnectionMisuse) as caught:
                action()
            self.assertIn("transaction manager", str(caught.exception))
            self.assertIn("'dm'", str(caught.exception))
        self.insert(pool, "still works")
        transaction.commit()
        self.assertEqual(self.values(), ["still works"])

    def test_failed_statement_cannot_be_committed_silently(self):
        from zpgpool import PoolError
        pool = self._makeOne()
        self.insert(pool, "a")
        cur = pool.connection().cursor()
        with self.assertRaises(psycopg2.Error):
            cur.execute("SELECT 1/0")
        with self.assertRaises(PoolError) as caught:
            transaction.commit()
        self.assertIn("a statement failed earlier", str(caught.exception))
        transaction.abort()
        self.assertEqual(self.values(), [])
        self.insert(pool, "b")
        transaction.commit()
        self.assertEqual(self.values(), ["b"])

    def test_deferred_constraint_fails_in_vote(self):
        pool = self._makeOne()
        self.assertDuplicateFailsCommit(pool)
        self.insert(pool, "ok")
        transaction.commit()
        self.assertEqual(self.values(), ["ok"])

    def test_session_state_does_not_leak(self):
        pool = self._makeOne(maxconn=1)
        cur = pool.connection().cursor()
        cur.execute("SET search_path TO pg_catalog")
        cur.execute("CREATE TEMP TABLE leftover (x int)")
        cur.execute("SELECT set_config('zpgpool.user', 'alice', false)")
        transaction.commit()
        cur = pool.connection().cursor()
        cur.execute("SHOW search_path")
        self.assertNotEqual(cur.fetchone()[0], "pg_catalog")
        cur.execute("SELECT current_setting('zpgpool.user', true)")
        self.assertIn(cur.fetchone()[0], (None, ""))
        cur.execute("SELECT count(*) FROM pg_class WHERE relname = "
                    "'leftover' AND relpersistence = 't'")
        self.assertEqual(cur.fetchone()[0], 0)
        transaction.abort()

    def test_local_settings_keep_the_connection_clean_without_reset(self):
        pool, _ = self.session_statement(
            "SET LOCAL statement_timeout = 1234", changes_session=False)
        transaction.commit()
        self.assertEqual(self.value_in_next_transaction(
            pool, "SHOW statement_timeout"), "0")

    def test_transaction_characteristics_are_sent_with_begin(self):
        pool = self._makeOne(isolation_level="SERIALIZABLE", readonly=True)
        cur = pool.connection().cursor()
        cur.execute("SHOW transaction_isolation")
        self.assertEqual(cur.fetchone()[0], "serializable")
        cur.execute("SHOW default_transaction_isolation")
        self.assertEqual(cur.fetchone()[0], "read committed")
        cur.execute("SHOW default_transaction_read_only")
        self.assertEqual(cur.fetchone()[0], "off")
        with self.assertRaises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("INSERT INTO dm_items (value) VALUES ('no')")
        transaction.abort()
        self.assertEqual(self.values(), [])

    def test_explicit_transaction_manager(self):
        from zpgpool import ConnectionMisuse
        tm = transaction.TransactionManager(explicit=True)
        pool = self._makeOne(transaction_manager=tm)
        with self.assertRaises(ConnectionMisuse) as caught:
            pool.connection()
        self.assertIn("explicit mode", str(caught.exception))
        with tm:
            cur = pool.connection().cursor()
            cur.execute("INSERT INTO dm_items (value) VALUES ('explicit')")
        self.assertEqual(self.values(), ["explicit"])
        # A kept connection used outside a transaction is refused too.
        conn = pool.connection if False else None
        with tm:
            conn = pool.connection()
        with self.assertRaises(ConnectionMisuse):
            conn.cursor().execute("SELECT 1")
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_abort_twice_and_dead_connection(self):
        pool = self._makeOne()
        conn = pool.connection()
        cur = conn.cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('x')")
        self.sql("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        with self.assertRaises(psycopg2.OperationalError):
            cur.execute("SELECT 1")
        dm = pool.thread_local.state.dm
        transaction.abort()          # must not raise
        dm.abort(None)               # again: still fine
        dm.tpc_abort(None)
        dm.tpc_finish(None)
        fresh = pool.connection()
        self.assertIsNot(fresh, conn)
        self.insert(pool, "after")
        transaction.commit()
        self.assertEqual(self.values(), ["after"])
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 0)
        self.assertGreaterEqual(stats["connections_lost"], 1)

    def test_thread_death_mid_transaction_rolls_back(self):
        pool = self._makeOne(maxconn=1)
        seen = []

        def work():
            conn = pool.connection()
            seen.append(conn.get_backend_pid())
            cur = conn.cursor()
            cur.execute("INSERT INTO dm_items (value) VALUES ('orphan')")
            # The thread ends without commit or abort.

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(JOIN_TIMEOUT)
        self.assertFalse(thread.is_alive())
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 0)
        self.assertEqual(stats["bound_idle"], 0)
        self.assertEqual(self.values(), [])
        # The one connection is free for this thread, rolled back.
        conn = pool.connection()
        self.assertEqual(conn.get_backend_pid(), seen[0])
        self.assertEqual(conn.get_transaction_status(),
                         ext.TRANSACTION_STATUS_IDLE)
        self.insert(pool, "next")
        transaction.commit()
        self.assertEqual(self.values(), ["next"])

    def test_more_threads_than_connections(self):
        pool = self._makeOne(maxconn=4, timeout=60)
        pids = set()
        lock = threading.Lock()

        def work(n):
            for i in range(5):
                with transaction.manager:
                    conn = pool.connection()
                    with lock:
                        pids.add(conn.get_backend_pid())
                    cur = conn.cursor()
                    cur.execute("INSERT INTO dm_items (value) VALUES (%s)",
                                ("%d-%d" % (n, i),))
                    cur.execute("SELECT pg_sleep(0.005)")

        # Fails if a thread raised or hangs.
        run_threads([lambda n=n: work(n) for n in range(16)], JOIN_TIMEOUT)
        self.assertEqual(len(self.values()), 80)
        self.assertLessEqual(len(pids), 4)
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 0)
        self.assertLessEqual(stats["size"], 4)
        self.assertEqual(stats["timeouts"], 0)

    def test_parked_connection_is_lent_and_owner_gets_another(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne(maxconn=1, timeout=30)
        mine = pool.connection()
        transaction.commit()       # parked, still this thread's
        borrowed = []

        def other():
            with transaction.manager:
                conn = pool.connection()
                borrowed.append(conn)
                conn.cursor().execute(
                    "INSERT INTO dm_items (value) VALUES ('other')")

        t = threading.Thread(target=other)
        t.start()
        t.join(JOIN_TIMEOUT)
        self.assertIs(borrowed[0], mine)   # lent instead of a time-out
        self.assertEqual(self.values(), ["other"])
        again = pool.connection()
        self.assertEqual(again.get_transaction_status(),
                         ext.TRANSACTION_STATUS_IDLE)
        transaction.abort()
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 0)
        self.assertEqual(stats["timeouts"], 0)
        del ConnectionMisuse

    def test_a_lent_connection_comes_without_its_thread_s_state(self):
        # What the idle thread did to its connection on the client side
        # -- a cursor factory, the notices it got, autocommit for the
        # transaction integration -- does not reach the thread it is lent
        # to, nor a getconn() caller.
        from psycopg2.extras import RealDictCursor
        pool = self._makeOne(maxconn=1, timeout=30)
        mine = pool.connection()
        mine.cursor_factory = RealDictCursor
        mine.cursor().execute("DO $$BEGIN RAISE NOTICE 'mine'; END$$")
        transaction.commit()       # parked, still this thread's
        self.assertIn("mine", mine.notices[-1])
        seen = []

        def other():
            with transaction.manager:
                conn = pool.connection()
                cur = conn.cursor()
                cur.execute("SELECT 1 AS one")
                seen.append((conn, list(conn.notices), cur.fetchone()))
            conn = pool.getconn()
            seen.append((conn, conn.cursor_factory, conn.autocommit))
            pool.putconn(conn)

        t = threading.Thread(target=other)
        t.start()
        t.join(JOIN_TIMEOUT)
        self.assertEqual(seen, [(mine, [], (1,)), (mine, None, False)])

    def test_closed_pool(self):
        from zpgpool import PoolClosed
        pool = self._makeOne()
        pool.connection()
        transaction.commit()
        pool.close()
        with self.assertRaises(PoolClosed) as caught:
            pool.connection()
        self.assertIn("'dm'", str(caught.exception))


class SavepointTests(_Base):

    def test_savepoint_rollback(self):
        pool = self._makeOne()
        self.insert(pool, "a")
        sp = transaction.savepoint()
        self.insert(pool, "b")
        sp.rollback()
        self.insert(pool, "c")
        transaction.commit()
        self.assertEqual(self.values(), ["a", "c"])

    def test_savepoint_before_any_statement(self):
        pool = self._makeOne()
        pool.connection()
        sp = transaction.savepoint()
        self.insert(pool, "b")
        sp.rollback()
        transaction.commit()
        self.assertEqual(self.values(), [])

    def test_savepoint_with_zodb(self):
        import ZODB
        import ZODB.MappingStorage
        db = ZODB.DB(ZODB.MappingStorage.MappingStorage())
        self.addCleanup(db.close)
        pool = self._makeOne()
        zconn = db.open()
        self.addCleanup(zconn.close)
        root = zconn.root()
        root["x"] = 1
        self.insert(pool, "a")
        sp = transaction.savepoint()
        root["x"] = 2
        self.insert(pool, "b")
        sp.rollback()
        transaction.commit()
        self.assertEqual(self.values(), ["a"])
        self.assertEqual(root["x"], 1)


class RetryTests(_Base):

    def test_serialization_failure_is_transient_and_still_psycopg2(self):
        pool = self._makeOne(isolation_level="SERIALIZABLE")
        self.sql("INSERT INTO dm_items (value) VALUES ('0')")
        cur = pool.connection().cursor()
        cur.execute("SELECT value FROM dm_items")
        self.sql("UPDATE dm_items SET value = '1'")
        with self.assertRaises(psycopg2.errors.SerializationFailure) as caught:
            cur.execute("UPDATE dm_items SET value = '2'")
        exc = caught.exception
        self.assertIsInstance(exc, transaction.interfaces.TransientError)
        self.assertEqual(exc.pgcode, "40001")
        self.assertTrue(pool.thread_local.state.dm.should_retry(exc))
        self.assertFalse(pool.thread_local.state.dm.should_retry(ValueError()))
        transaction.abort()

    def test_session_lost_before_first_statement_is_retried(self):
        from zpgpool import SessionLost
        pool = self._makeOne(health_check_after=None)
        conn = pool.connection()
        transaction.commit()        # parked, bound to this thread
        self.sql("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        self.assertEqual(attempts(lambda n: self.insert(pool, "again"), 3), 2)
        self.assertEqual(self.values(), ["again"])

        # A session lost after statements ran, before COMMIT was sent, is
        # retryable too: the server rolled the whole transaction back, so
        # running all of it again is safe.
        def lose_the_first(n):
            cur = pool.connection().cursor()
            cur.execute("INSERT INTO dm_items (value) VALUES ('mid')")
            if n == 1:
                self.sql("SELECT pg_terminate_backend(%s)",
                         (pool.connection().get_backend_pid(),))
                with self.assertRaises(SessionLost) as caught:
                    cur.execute("SELECT 1")
                self.assertIsInstance(caught.exception,
                                      psycopg2.OperationalError)
                raise caught.exception
        self.assertEqual(attempts(lose_the_first, 3), 2)
        self.assertEqual(self.values(), ["again", "mid"])
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_session_lost_with_the_error_caught_never_commits(self):
        from zpgpool import SessionLost
        pool = self._makeOne()
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('lost')")
        self.sql("SELECT pg_terminate_backend(%s)",
                 (pool.connection().get_backend_pid(),))
        try:
            cur.execute("SELECT 1")
        except psycopg2.OperationalError:
            pass    # the application swallows the error and commits
        # The work went with the session: the commit must not succeed as if
        # it had been saved; retrying the whole transaction is safe.
        with self.assertRaises(SessionLost) as caught:
            transaction.commit()
        self.assertIn("'dm'", str(caught.exception))
        self.assertIn("before COMMIT", str(caught.exception))
        self.assertTrue(pool.thread_local.state.dm.should_retry(
            caught.exception))
        transaction.abort()
        self.assertEqual(self.values(), [])
        self.insert(pool, "next")
        transaction.commit()
        self.assertEqual(self.values(), ["next"])
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_session_lost_during_commit_is_commit_unknown(self):
        from zpgpool import CommitUnknown
        from tests.poolhelpers import start
        from tests.poolhelpers import wait_for
        self.sql("CREATE OR REPLACE FUNCTION dm_slow_commit() RETURNS trigger"
                 " AS $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$"
                 " LANGUAGE plpgsql")
        self.sql("CREATE CONSTRAINT TRIGGER dm_slow AFTER INSERT ON dm_items"
                 " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE"
                 " FUNCTION dm_slow_commit()")
        pool = self._makeOne()
        # Also when the session reset shares the COMMIT's message.
        for changed_session in (False, True):
            txn = transaction.get()
            txn.note("the slow one")
            if changed_session:
                pool.connection().cursor().execute("SET zp.test = 'x'")
            self.insert(pool, "slow")
            pid = pool.connection().get_backend_pid()
            killer = start(self, lambda: (
                wait_for(lambda: self.sql(
                    "SELECT query FROM pg_stat_activity WHERE pid = %s AND "
                    "wait_event = 'PgSleep'", (pid,)), "COMMIT running"),
                self.sql("SELECT pg_terminate_backend(%s)", (pid,))))
            with self.assertRaises(CommitUnknown) as caught:
                transaction.commit()
            killer.finish(self)
            self.assertNotIsInstance(caught.exception,
                                     transaction.interfaces.TransientError)
            self.assertIsInstance(caught.exception, psycopg2.OperationalError)
            message = str(caught.exception)
            self.assertIn("'dm'", message)
            self.assertIn("COMMIT", message)
            self.assertIn("the slow one", message)
            self.assertFalse(
                pool.thread_local.state.dm.should_retry(caught.exception))
            transaction.abort()
        self.sql("DROP TRIGGER dm_slow ON dm_items")
        # The broken connections were discarded; the pool serves on.
        self.insert(pool, "next")
        transaction.commit()
        self.assertEqual(self.values(), ["next"])
        self.assertGreaterEqual(pool.stats()["connections_discarded"], 2)

    def test_concurrent_serializable_workload_retried(self):
        pool = self._makeOne(isolation_level="SERIALIZABLE", maxconn=4,
                             timeout=60)
        self.sql("DROP TABLE IF EXISTS dm_counter")
        self.sql("CREATE TABLE dm_counter (n int)")
        self.sql("INSERT INTO dm_counter VALUES (0)")
        threads_n, rounds = 4, 5
        barrier = threading.Barrier(threads_n)
        retries = []

        def increment(n, r, tries):
            cur = pool.connection().cursor()
            cur.execute("SELECT n FROM dm_counter")
            value = cur.fetchone()[0]
            if r == 0 and tries == 1:
                barrier.wait(JOIN_TIMEOUT)
            cur.execute("UPDATE dm_counter SET n = %s", (value + 1,))
            cur.execute("INSERT INTO dm_items (value) VALUES (%s)",
                        ("%d-%d" % (n, r),))

        def work(n):
            for r in range(rounds):
                tries = attempts(lambda tries: increment(n, r, tries), 50)
                retries.append(tries - 1)

        run_threads([lambda n=n: work(n) for n in range(threads_n)],
                    JOIN_TIMEOUT * 2)
        self.assertEqual(self.sql("SELECT n FROM dm_counter"),
                         [(threads_n * rounds,)])
        # Every unit of work committed exactly once.
        self.assertEqual(sorted(self.values()), sorted(
            "%d-%d" % (n, r) for n in range(threads_n) for r in range(rounds)))
        # The barrier forced overlapping transactions: some were retried.
        self.assertGreater(sum(retries), 0)
        self.assertEqual(pool.stats()["in_use"], 0)


class _Hook:
    """A participant sorted at ``key`` that runs ``action(txn)`` in one
    phase (``tpc_vote`` or ``tpc_finish``) and does nothing otherwise: it
    puts a test's action between two of zpgpool's steps, where a real
    failure (a backend killed after PREPARE, another resource's veto) can
    be provoked on demand, or records when it is called."""

    def __init__(self, key, phase, action):
        self.transaction_manager = transaction.manager
        self.key = key
        setattr(self, phase, action)

    def sortKey(self):
        return self.key

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_abort = tpc_vote = tpc_finish = abort


def _veto(check=None):
    """A participant that votes after zpgpool and fails, having run
    ``check()``: it stands for any other data manager (a second database,
    a mail queue) vetoing the commit."""
    def vote(txn):
        if check is not None:
            check()
        raise RuntimeError("vetoed by another resource")
    return _Hook("~~~ after zpgpool", "tpc_vote", vote)


class TwoPhaseTests(_Base):

    def test_commit_prepares_then_commits(self):
        pool = self._makeOne(twophase=True)
        self.insert(pool, "a")
        transaction.commit()
        self.assertEqual(self.values(), ["a"])
        self.assertNothingPrepared()
        self.insert(pool, "b")
        transaction.commit()
        self.assertEqual(self.values(), ["a", "b"])

    def test_later_vote_failure_rolls_back_prepared(self):
        from zpgpool.datamanager import gid_prefix
        pool = self._makeOne(twophase=True)
        self.insert(pool, "a")
        seen = []

        def check():
            seen.extend(self.sql("SELECT gid FROM pg_prepared_xacts"))

        transaction.get().join(_veto(check))
        with self.assertRaises(RuntimeError):
            transaction.commit()
        transaction.abort()
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0][0].startswith(gid_prefix(pool)), seen)
        self.assertTrue(seen[0][0].startswith("zpgpool:dm:"))
        self.assertEqual(self.values(), [])
        self.assertNothingPrepared()
        self.insert(pool, "b")
        transaction.commit()
        self.assertEqual(self.values(), ["b"])

    def test_a_transaction_that_only_read_is_not_prepared(self):
        # It has nothing to keep atomic with the others: it commits in its
        # vote, and a veto after it changes nothing.
        self.sql("INSERT INTO %s (value) VALUES ('there')" % self.table)
        pool = self._makeOne(twophase=True)
        seen = []

        def check():
            seen.extend(self.sql("SELECT count(*) FROM pg_prepared_xacts"))
            seen.extend(self.sql(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)))

        for veto in (False, True):
            conn = pool.connection()
            pid = conn.get_backend_pid()
            cur = conn.cursor()
            cur.execute("SELECT value FROM %s" % self.table)
            self.assertEqual(cur.fetchall(), [("there",)])
            transaction.get().join(_Hook("~~~ after zpgpool", "tpc_vote",
                                         lambda txn: check()))
            if veto:
                transaction.get().join(_veto())
                with self.assertRaises(RuntimeError):
                    transaction.commit()
                transaction.abort()
            else:
                transaction.commit()
            # Nothing prepared, and its transaction already over.
            self.assertEqual(seen, [(0,), ("idle",)])
            del seen[:]
        self.assertEqual(self.values(), ["there"])
        self.assertNothingPrepared()
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_a_read_that_wrote_through_a_function_is_prepared(self):
        # The statement only reads, as far as its text tells: the server
        # says the transaction wrote, so it is prepared and stays atomic
        # with the other participants.
        from zpgpool.datamanager import gid_prefix
        self.sql("CREATE OR REPLACE FUNCTION dm_add(v text) RETURNS int "
                 "LANGUAGE sql AS $$ INSERT INTO %s (value) VALUES (v) "
                 "RETURNING id $$" % self.table)
        self.addCleanup(query, self.dsn, "DROP FUNCTION dm_add(text)")
        pool = self._makeOne(twophase=True)
        seen = []

        def check():
            seen.extend(self.sql("SELECT gid FROM pg_prepared_xacts"))

        pool.connection().cursor().execute("SELECT dm_add('vetoed')")
        transaction.get().join(_veto(check))
        with self.assertRaises(RuntimeError):
            transaction.commit()
        transaction.abort()
        self.assertEqual(len(seen), 1, seen)
        self.assertTrue(seen[0][0].startswith(gid_prefix(pool)), seen)
        self.assertEqual(self.values(), [])
        pool.connection().cursor().execute("SELECT dm_add('kept')")
        transaction.commit()
        self.assertEqual(self.values(), ["kept"])
        self.assertNothingPrepared()

    def test_session_lost_before_a_read_only_vote_is_retried(self):
        from zpgpool import SessionLost
        pool = self._makeOne(twophase=True)
        conn = pool.connection()
        conn.cursor().execute("SELECT 1")
        pid = conn.get_backend_pid()
        # Before zpgpool votes ("~zpgpool:..." sorts after it).
        transaction.get().join(_Hook("!", "tpc_vote", lambda txn: self.sql(
            "SELECT pg_terminate_backend(%s)", (pid,))))
        with self.assertRaises(SessionLost):
            transaction.commit()
        transaction.abort()
        self.assertEqual(
            self.value_in_next_transaction(pool, "SELECT 41 + 1"), 42)
        self.assertNothingPrepared()

    def _zodb(self):
        import ZODB
        import ZODB.FileStorage
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(tmp,
                                                                "Data.fs")))
        self.addCleanup(db.close)
        return db

    def test_postgres_vote_failure_leaves_zodb_untouched(self):
        db = self._zodb()
        pool = self._makeOne(twophase=True)
        zconn = db.open()
        zconn.root()["value"] = "committed"
        transaction.commit()
        zconn.root()["value"] = "must not land"
        self.assertDuplicateFailsCommit(pool)
        zconn.close()
        other = db.open()
        self.assertEqual(other.root()["value"], "committed")
        other.close()
        self.assertNothingPrepared()

    def test_zodb_conflict_leaves_no_row_and_nothing_prepared(self):
        self.assertZODBConflictFailsCommit(self._zodb(),
                                           self._makeOne(twophase=True))
        self.assertNothingPrepared()

    def test_zodb_and_postgres_commit_together(self):
        db = self._zodb()
        pool = self._makeOne(twophase=True)
        zconn = db.open()
        zconn.root()["value"] = "both"
        self.insert(pool, "both")
        transaction.commit()
        zconn.close()
        other = db.open()
        self.assertEqual(other.root()["value"], "both")
        other.close()
        self.assertEqual(self.values(), ["both"])

    def test_killed_between_prepare_and_commit_prepared_is_recovered(self):
        from zpgpool import ConnectionPool
        from zpgpool.datamanager import list_prepared
        from zpgpool.datamanager import recover
        # Killed after zpgpool prepared, before COMMIT PREPARED.
        crash_in_commit(self, [("dm", self.dsn)], self.table,
                        "~~~ after zpgpool", "tpc_vote", value="in doubt",
                        timeout=JOIN_TIMEOUT)
        self.assertEqual(self.values(), [])
        pool = ConnectionPool(self.dsn, name="dm")
        self.pools.append(pool)
        other = ConnectionPool(self.dsn, name="other")
        self.pools.append(other)
        listed = list_prepared(pool, older_than=0)
        self.assertEqual(len(listed), 1)
        self.assertEqual(list_prepared(other, older_than=0), [])
        # Too young to be in doubt yet: nothing done.
        self.assertEqual(recover(pool, older_than=3600, commit=True), [])
        self.assertEqual(recover(pool, older_than=0),
                         [(listed[0][0], "listed")])
        done = recover(pool, older_than=0, commit=True)
        self.assertEqual(done, [(listed[0][0], "commit")])
        self.assertEqual(self.values(), ["in doubt"])
        self.assertNothingPrepared()

    def _crash_and_recover(self, killer_key, phase):
        from zpgpool import ConnectionPool
        from zpgpool.datamanager import recover
        from zpgpool.datamanager import zodb_decider
        import ZODB
        import ZODB.FileStorage
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "Data.fs")
        db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
        db.close()
        crash_in_commit(self, [("dm", self.dsn)], self.table, killer_key,
                        phase, zodb_path=path, timeout=JOIN_TIMEOUT)
        storage = ZODB.FileStorage.FileStorage(path)
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        pool = ConnectionPool(self.dsn, name="dm")
        self.pools.append(pool)
        done = recover(pool, older_than=0, decide=zodb_decider(storage))
        self.assertEqual(len(done), 1)
        zconn = db.open()
        in_zodb = zconn.root().get("value") == "crash"
        zconn.close()
        self.assertEqual(self.values() == ["crash"], in_zodb)
        self.assertNothingPrepared()
        return done[0][1], in_zodb

    def test_crash_after_prepare_before_zodb_finish_rolls_back(self):
        # Killed after every vote, before any tpc_finish: ZODB did not
        # commit, so the prepared transaction is rolled back.
        action, in_zodb = self._crash_and_recover("~~~ last", "tpc_vote")
        self.assertEqual((action, in_zodb), ("rollback", False))

    def test_crash_after_zodb_finish_commits(self):
        # Killed between ZODB's tpc_finish and COMMIT PREPARED: ZODB
        # committed, so recovery commits the prepared transaction too.
        action, in_zodb = self._crash_and_recover("zzz between", "tpc_finish")
        self.assertEqual((action, in_zodb), ("commit", True))

    def test_resolve_refuses_foreign_gid(self):
        from zpgpool import PoolError
        from zpgpool.datamanager import resolve_prepared
        pool = self._makeOne()
        with self.assertRaises(PoolError) as caught:
            resolve_prepared(pool, ["someone-else's"], commit=True)
        self.assertIn("not one of this pool's", str(caught.exception))

    def test_hostile_pool_name_in_gid(self):
        from zpgpool import ConnectionPool
        pool = ConnectionPool(self.dsn, name="x'; DROP TABLE dm_items; --",
                              twophase=True)
        self.pools.append(pool)
        self.insert(pool, "a")
        seen = []
        transaction.get().join(_veto(lambda: seen.extend(
            self.sql("SELECT gid FROM pg_prepared_xacts"))))
        with self.assertRaises(RuntimeError):
            transaction.commit()
        transaction.abort()
        self.assertTrue(seen[0][0].startswith("zpgpool:x___DROP_TABLE"), seen)
        self.assertEqual(self.values(), [])


class NoTwoPhaseServerTests(_Base):

    layer = NO_TWOPHASE_LAYER

    def test_clear_error_on_first_use(self):
        from zpgpool import PoolError
        pool = self._makeOne(twophase=True)
        with self.assertRaises(PoolError) as caught:
            pool.connection()
        self.assertIn("max_prepared_transactions", str(caught.exception))
        self.assertIn("'dm'", str(caught.exception))
        transaction.abort()
        self.assertEqual(pool.stats()["in_use"], 0)
        # A one-phase pool on the same server serves.
        plain = self._makeOne(name="plain")
        self.insert(plain, "fine")
        transaction.commit()
        self.assertEqual(self.values(), ["fine"])


class SeveralPoolsTests(_Base):
    """One-phase and two-phase pools in one transaction: all or nothing."""

    def _pair(self, one_phase_name, two_phase_name):
        one = self._makeOne(name=one_phase_name)
        two = self._makeOne(name=two_phase_name, twophase=True)
        return one, two

    def _prepare_fails(self, one_phase_name, two_phase_name):
        one, two = self._pair(one_phase_name, two_phase_name)
        self.insert(one, "from one-phase")
        self.assertDuplicateFailsCommit(two)    # at PREPARE
        self.assertNothingPrepared()
        # Both pools serve the next transaction.
        self.insert(one, "next one")
        self.insert(two, "next two")
        transaction.commit()
        self.assertEqual(sorted(self.values()), ["next one", "next two"])

    def test_two_phase_prepare_fails_one_phase_sorts_first_by_name(self):
        # "main" < "main2pc": by name alone the one-phase pool voted first.
        self._prepare_fails("main", "main2pc")

    def test_two_phase_prepare_fails_one_phase_sorts_last_by_name(self):
        self._prepare_fails("zmain", "a2pc")

    def _commit_fails(self, one_phase_name, two_phase_name):
        one, two = self._pair(one_phase_name, two_phase_name)
        self.insert(two, "from two-phase")
        self.assertDuplicateFailsCommit(one)    # at COMMIT
        # The two-phase pool had prepared when the COMMIT failed, and its
        # prepared transaction was rolled back.
        self.assertNothingPrepared()

    def test_one_phase_commit_fails_after_two_phase_prepared(self):
        self._commit_fails("main", "main2pc")

    def test_one_phase_commit_fails_other_name_order(self):
        self._commit_fails("zmain", "a2pc")

    def test_one_phase_votes_after_every_two_phase_participant(self):
        one, two = self._pair("a", "b")
        order = []
        # Whatever the names: a two-phase participant named to sort last.
        transaction.get().join(_Hook("~~~~ zzz", "tpc_vote",
                                     lambda txn: order.append("~~~~ zzz")))
        self.insert(one, "x")
        self.insert(two, "y")
        transaction.get().join(_Hook("\uffff late", "tpc_vote",
                                     lambda txn: order.append("\uffff late")))
        one_key = one.thread_local.state.dm.sortKey()
        keys = sorted([one_key, two.thread_local.state.dm.sortKey(), "~~~~ zzz",
                       "\uffff late", "/tmp/Data.fs:1", "~sqlalchemy:1"])
        self.assertEqual(keys[-1], one_key)
        transaction.commit()
        self.assertEqual(order, ["~~~~ zzz", "\uffff late"])
        self.assertEqual(sorted(self.values()), ["x", "y"])

    def test_one_phase_votes_after_zodb(self):
        import ZODB
        import ZODB.MappingStorage
        db = ZODB.DB(ZODB.MappingStorage.MappingStorage())
        self.addCleanup(db.close)
        # No row: ZODB failed its vote before the one-phase pool sent
        # COMMIT.
        self.assertZODBConflictFailsCommit(db, self._makeOne(name="a"))

    def test_second_writable_one_phase_pool_is_refused(self):
        from zpgpool import ConnectionMisuse
        first = self._makeOne(name="first")
        second = self._makeOne(name="second")
        self.insert(first, "a")
        before = second.stats()["checkouts"]
        with self.assertRaises(ConnectionMisuse) as caught:
            second.connection()
        message = str(caught.exception)
        self.assertIn("'second'", message)
        self.assertIn("'first'", message)
        self.assertIn("atomic", message)
        self.assertIn("twophase=True", message)
        # Refused before it took, let alone used, a connection.
        self.assertEqual(second.stats()["checkouts"], before)
        self.assertEqual(second.stats()["in_use"], 0)
        transaction.abort()
        self.assertEqual(self.values(), [])
        # The next transaction may use the other one alone.
        self.insert(second, "b")
        transaction.commit()
        self.assertEqual(self.values(), ["b"])

    def test_pool_that_could_not_join_is_not_the_writer(self):
        # A writable one-phase pool whose checkout timed out never joined
        # the transaction: another may still write in it.
        from zpgpool import PoolTimeout
        busy = self._makeOne(name="busy", maxconn=1, timeout=0)
        other = self._makeOne(name="other")
        held = busy.getconn()
        with self.assertRaises(PoolTimeout):
            busy.connection()
        self.insert(other, "a")
        transaction.commit()
        self.assertEqual(self.values(), ["a"])
        busy.putconn(held)

    def test_read_only_one_phase_pool_beside_a_writable_one(self):
        writer = self._makeOne(name="writer")
        reader = self._makeOne(name="reader", readonly=True)
        other_reader = self._makeOne(name="other", readonly=True)
        self.insert(writer, "a")
        for pool in (reader, other_reader):
            cur = pool.connection().cursor()
            cur.execute("SELECT count(*) FROM dm_items")
            self.assertEqual(cur.fetchone()[0], 0)
        transaction.commit()
        self.assertEqual(self.values(), ["a"])

    def test_several_two_phase_pools_and_one_one_phase_pool(self):
        one = self._makeOne(name="one")
        twos = [self._makeOne(name="two%d" % n, twophase=True)
                for n in range(2)]
        self.insert(one, "one")
        for n, pool in enumerate(twos):
            self.insert(pool, "two%d" % n)
        transaction.commit()
        self.assertEqual(sorted(self.values()), ["one", "two0", "two1"])
        self.assertNothingPrepared()

    def test_one_phase_zope_sqlalchemy_session_beside_a_one_phase_pool(self):
        import sqlalchemy
        import sqlalchemy.orm
        import zope.sqlalchemy
        from zpgpool import ConnectionMisuse
        engine = sqlalchemy.create_engine(
            "postgresql+psycopg2://", poolclass=sqlalchemy.pool.NullPool,
            creator=lambda: psycopg2.connect(self.dsn))
        self.addCleanup(engine.dispose)
        session = sqlalchemy.orm.Session(engine)
        zope.sqlalchemy.register(session)
        pool = self._makeOne(name="pg")
        session.execute(sqlalchemy.text(
            "INSERT INTO dm_items (value) VALUES ('sqlalchemy')"))
        zope.sqlalchemy.mark_changed(session)
        self.insert(pool, "zpgpool")
        with self.assertRaises(ConnectionMisuse) as caught:
            transaction.commit()
        self.assertIn("zope.sqlalchemy", str(caught.exception))
        transaction.abort()
        self.assertEqual(self.values(), [])
        # Reading through zope.sqlalchemy beside a writing pool is fine.
        session.execute(sqlalchemy.text("SELECT 1"))
        self.insert(pool, "alone")
        transaction.commit()
        self.assertEqual(self.values(), ["alone"])
        # A pool that joined but sent nothing commits nothing: zope.sqlalchemy
        # writing beside it is fine.
        session.execute(sqlalchemy.text(
            "INSERT INTO dm_items (value) VALUES ('only sqlalchemy')"))
        zope.sqlalchemy.mark_changed(session)
        pool.connection()
        transaction.commit()
        self.assertEqual(sorted(self.values()), ["alone", "only sqlalchemy"])
        session.close()


class SessionResetTests(_Base):
    """Session changes are undone inside their own transaction, before its
    COMMIT or PREPARE, so no statement is sent after them."""

    def _last_statement(self, pool):
        conn = pool.connection()
        pid = conn.get_backend_pid()
        transaction.abort()
        return self.sql("SELECT query FROM pg_stat_activity WHERE pid = %s",
                        (pid,))[0][0]

    def _dirty_the_session(self, pool, role):
        cur = pool.connection().cursor()
        cur.execute("SET zp.test = 'A'")
        cur.execute("SET ROLE %s" % role)
        cur.execute("SELECT pg_advisory_lock(4242)")
        cur.execute("CREATE TEMP TABLE zp_temp (x int)")
        cur.execute("PREPARE zp_stmt AS SELECT 1")
        cur.execute("DECLARE zp_held CURSOR WITH HOLD FOR SELECT 1")
        return pool.connection().get_backend_pid()

    def _role(self):
        role = "zp_role_%d" % os.getpid()
        self.sql("DROP ROLE IF EXISTS %s" % role)
        self.sql("CREATE ROLE %s" % role)
        self.sql("GRANT INSERT, SELECT ON dm_items TO %s" % role)
        self.sql("GRANT USAGE ON SEQUENCE dm_items_id_seq TO %s" % role)
        # Clean-ups run after tearDown has closed self.admin.
        self.addCleanup(query, self.dsn, "DROP ROLE IF EXISTS %s" % role)
        self.addCleanup(query, self.dsn, "DROP OWNED BY %s" % role)
        return role

    def assertClean(self, pool):
        cur = pool.connection().cursor()
        cur.execute(
            "SELECT current_setting('zp.test', true), current_user = "
            "session_user, (SELECT count(*) FROM pg_locks WHERE locktype = "
            "'advisory' AND pid = pg_backend_pid()), (SELECT count(*) FROM "
            "pg_prepared_statements), (SELECT count(*) FROM pg_cursors), "
            "(SELECT count(*) FROM pg_class WHERE relname = 'zp_temp')")
        self.assertEqual(cur.fetchone(), ("", True, 0, 0, 0, 0))
        transaction.abort()

    def test_one_phase_reset_runs_before_commit(self):
        pool = self._makeOne(maxconn=1)
        self._dirty_the_session(pool, self._role())
        self.insert(pool, "kept")
        transaction.commit()
        self.assertEqual(self.values(), ["kept"])
        # Nothing was sent after COMMIT: behind a transaction-mode PgBouncer
        # anything later would run on another client's server connection.
        self.assertEqual(self._last_statement(pool), RESET_AND_COMMIT)
        self.assertClean(pool)

    def test_two_phase_reset_runs_before_prepare(self):
        pool = self._makeOne(maxconn=1, twophase=True)
        cur = pool.connection().cursor()
        cur.execute("SET zp.test = 'A'")
        cur.execute("SET ROLE %s" % self._role())
        cur.execute("SELECT pg_advisory_lock(4242)")
        cur.execute("PREPARE zp_stmt AS SELECT 1")
        self.insert(pool, "kept")
        transaction.commit()
        self.assertEqual(self.values(), ["kept"])
        self.assertTrue(self._last_statement(pool).startswith(
            "COMMIT PREPARED"))
        self.assertNothingPrepared()
        self.assertClean(pool)

    def test_listen_in_a_two_phase_transaction_is_refused(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne(maxconn=1, twophase=True)
        cur = pool.connection().cursor()
        with self.assertRaises(ConnectionMisuse) as caught:
            cur.execute("LISTEN zp_channel")
        self.assertIn("LISTEN", str(caught.exception))
        self.assertIn("'dm'", str(caught.exception))
        transaction.abort()
        self.assertEqual(self.sql("SELECT count(*) FROM pg_stat_activity "
                                  "WHERE query ILIKE '%%LISTEN%%' AND pid <> "
                                  "pg_backend_pid()"), [(0,)])

    def test_one_phase_listen_is_undone(self):
        pool = self._makeOne(maxconn=1)
        cur = pool.connection().cursor()
        cur.execute("LISTEN zp_channel")
        transaction.commit()
        self.assertEqual(self.value_in_next_transaction(
            pool, "SELECT count(*) FROM pg_listening_channels()"), 0)

    def test_aborted_transaction_releases_session_locks_before_rollback(self):
        pool = self._makeOne(maxconn=1)
        self._dirty_the_session(pool, self._role())
        transaction.abort()
        self.assertEqual(self._last_statement(pool), "ROLLBACK")
        self.assertClean(pool)

    def test_failed_transaction_is_reset_after_its_rollback(self):
        pool = self._makeOne(maxconn=1)
        self._dirty_the_session(pool, self._role())
        cur = pool.connection().cursor()
        with self.assertRaises(psycopg2.errors.DivisionByZero):
            cur.execute("SELECT 1 / 0")
        transaction.abort()
        # A transaction in error cannot run statements: reset afterwards.
        self.assertEqual(self._last_statement(pool), "DISCARD ALL")
        self.assertClean(pool)

    def test_failed_transaction_keeps_its_reset_connection(self):
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        conn.cursor().execute("SELECT pg_advisory_lock(4714)")
        with self.assertRaises(psycopg2.errors.DivisionByZero):
            conn.cursor().execute("SELECT 1 / 0")
        transaction.abort()
        # Reset after ROLLBACK, and still this thread's.
        stats = pool.stats()
        self.assertEqual((stats["bound_idle"], stats["in_use"]), (1, 0))
        self.assertEqual(stats["connections_discarded"], 0)
        self.assertIs(pool.connection(), conn)
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = "
                    "'advisory' AND pid = pg_backend_pid()")
        self.assertEqual(cur.fetchone()[0], 0)
        transaction.abort()

    def test_untouched_session_sends_no_reset(self):
        pool = self._makeOne(maxconn=1)
        self.insert(pool, "plain")
        transaction.commit()
        self.assertEqual(self._last_statement(pool), "COMMIT")


# -- what the mutation list (tests/mutations.toml) showed untested --------------


class DeadlockTests(_Base):

    def test_deadlock_is_retryable_and_both_commit(self):
        self.sql("DROP TABLE IF EXISTS dm_pair")
        self.sql("CREATE TABLE dm_pair (id int PRIMARY KEY, n int)")
        self.sql("INSERT INTO dm_pair VALUES (1, 0), (2, 0)")
        self.addCleanup(query, self.dsn, "DROP TABLE IF EXISTS dm_pair")
        pool = self._makeOne(maxconn=2, timeout=JOIN_TIMEOUT)
        barrier = threading.Barrier(2)
        first_errors = []

        def update(first, second, tries):
            if tries > 1:
                # Let the survivor commit first: retried at once, the
                # victim may take its first row back before the survivor
                # is granted it, and deadlock again.
                time.sleep(0.2 * tries)
            cur = pool.connection().cursor()
            try:
                cur.execute("UPDATE dm_pair SET n = n + 1 WHERE id = %s",
                            (first,))
                if tries == 1:
                    # Each holds one row and wants the other's.
                    barrier.wait(JOIN_TIMEOUT)
                cur.execute("UPDATE dm_pair SET n = n + 1 WHERE id = %s",
                            (second,))
            except psycopg2.Error as exc:
                first_errors.append(exc)
                raise

        # Fails if a thread raised or hangs.
        run_threads([lambda: attempts(lambda n: update(1, 2, n), 5),
                     lambda: attempts(lambda n: update(2, 1, n), 5)],
                    JOIN_TIMEOUT)
        # PostgreSQL broke the deadlock by failing one of the two (on a
        # loaded machine perhaps more than once).
        self.assertGreaterEqual(len(first_errors), 1, first_errors)
        for exc in first_errors:
            self.assertIsInstance(exc, psycopg2.errors.DeadlockDetected)
            self.assertIsInstance(exc, transaction.interfaces.TransientError)
            self.assertEqual(exc.pgcode, "40P01")
        # Retried, both transactions committed in full.
        self.assertEqual(self.sql("SELECT id, n FROM dm_pair ORDER BY id"),
                         [(1, 2), (2, 2)])
        self.assertEqual(pool.stats()["in_use"], 0)


class SessionChangeDetectionTests(_Base):
    """Which statements make the data manager undo session changes before
    COMMIT, seen from the server."""

    def _backend_state(self, pid):
        return self.sql(
            "SELECT a.query, (SELECT count(*) FROM pg_locks l WHERE "
            "l.locktype = 'advisory' AND l.pid = a.pid) FROM "
            "pg_stat_activity a WHERE a.pid = %s", (pid,))[0]

    def test_session_advisory_lock_is_released_before_commit(self):
        pool, pid = self.session_statement("SELECT pg_advisory_lock(4711)",
                                           changes_session=True)
        self.insert(pool, "locked")
        transaction.commit()
        self.assertEqual(self.values(), ["locked"])
        # Released inside the transaction, in COMMIT's message.
        self.assertEqual(self._backend_state(pid), (RESET_AND_COMMIT, 0))

    def test_transaction_advisory_lock_needs_no_reset(self):
        _, pid = self.session_statement("SELECT pg_advisory_xact_lock(4712)",
                                        changes_session=False)
        transaction.commit()
        self.assertEqual(self._backend_state(pid), ("COMMIT", 0))

    def test_an_xact_word_elsewhere_hides_no_session_change(self):
        from zpgpool.datamanager import changes_session
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        for query in (
                "SELECT set_config('a.b', 'x', false), pg_current_xact_id()",
                "SELECT pg_advisory_lock(1) FROM (SELECT 1 AS xact) t",
                "SELECT pg_try_advisory_lock_shared(2)",
                "select PG_ADVISORY_UNLOCK_ALL()"):
            self.assertTrue(changes_session(query, conn), query)
        for query in ("SELECT pg_advisory_xact_lock(1)",
                      "SELECT pg_try_advisory_xact_lock_shared(1)",
                      "SELECT 'set_config is only a word here'"):
            self.assertFalse(changes_session(query, conn), query)
        cur = conn.cursor()
        cur.execute("SELECT pg_advisory_lock(4713), pg_current_xact_id()")
        transaction.commit()
        self.assertEqual(self._backend_state(conn.get_backend_pid()),
                         (RESET_AND_COMMIT, 0))

    def test_set_config_alone_is_undone(self):
        pool = self._makeOne(maxconn=1)
        cur = pool.connection().cursor()
        cur.execute("SELECT set_config('zpgpool.alone', 'x', false)")
        transaction.commit()
        self.assertIn(self.value_in_next_transaction(
            pool, "SELECT current_setting('zpgpool.alone', true)"),
            (None, ""))

    def test_callproc_of_a_session_function_is_undone(self):
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        cur = conn.cursor()
        cur.callproc("set_config", ("zpgpool.proc", "x", False))
        cur.callproc("pg_advisory_lock", (4714,))
        self.assertTrue(pool.thread_local.state.dm.dirty)
        transaction.commit()
        self.assertEqual(self._backend_state(conn.get_backend_pid()),
                         (RESET_AND_COMMIT, 0))
        self.assertIn(self.value_in_next_transaction(
            pool, "SELECT current_setting('zpgpool.proc', true)"),
            (None, ""))
        # A function that changes nothing needs no reset.
        conn = pool.connection()
        conn.cursor().callproc("pg_backend_pid")
        self.assertFalse(pool.thread_local.state.dm.dirty)
        transaction.abort()

    def test_executemany_of_a_session_change_is_undone(self):
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        conn.cursor().executemany("SELECT set_config('zpgpool.many', %s, "
                                  "false)", [("a",), ("b",)])
        self.assertTrue(pool.thread_local.state.dm.dirty)
        transaction.commit()
        self.assertEqual(self._backend_state(conn.get_backend_pid()),
                         (RESET_AND_COMMIT, 0))
        self.assertIn(self.value_in_next_transaction(
            pool, "SELECT current_setting('zpgpool.many', true)"),
            (None, ""))

    def test_named_cursor_does_not_outlive_its_transaction(self):
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        cur = conn.cursor("zp_named")
        cur.execute("SELECT generate_series(1, 3)")
        self.assertEqual(cur.fetchall(), [(1,), (2,), (3,)])
        self.assertTrue(pool.thread_local.state.dm.dirty)
        transaction.commit()
        self.assertEqual(self.value_in_next_transaction(
            pool, "SELECT count(*) FROM pg_cursors"), 0)

    def test_transaction_without_statements_sends_nothing(self):
        for twophase in (False, True):
            pool = self._makeOne(name="quiet%d" % twophase, twophase=twophase)
            conn = pool.connection()
            pid = conn.get_backend_pid()
            transaction.commit()
            last = self.sql("SELECT query FROM pg_stat_activity WHERE pid = "
                            "%s", (pid,))[0][0]
            self.assertFalse(last.startswith(("COMMIT", "PREPARE")), last)
            self.assertNothingPrepared()


class MisuseGuardTests(_Base):

    def test_connection_used_from_another_thread_is_refused(self):
        from zpgpool import ConnectionMisuse
        from tests.poolhelpers import start
        pool = self._makeOne()
        conn = pool.connection()
        self.insert(pool, "mine")

        def other():
            with self.assertRaises(ConnectionMisuse) as caught:
                conn.cursor().execute(
                    "INSERT INTO dm_items (value) VALUES ('theirs')")
            return str(caught.exception)
        message = start(self, other).finish(self)
        self.assertIn("no longer yours", message)
        self.assertIn("'dm'", message)
        transaction.commit()
        self.assertEqual(self.values(), ["mine"])

    def test_kept_connection_replaced_meanwhile_is_refused(self):
        from zpgpool import ConnectionMisuse
        from tests.poolhelpers import wait_for
        import time
        pool = self._makeOne(max_lifetime=0.2)
        kept = pool.connection()
        transaction.commit()        # parked, still this thread's
        wait_for(lambda: kept._zp_expires < time.monotonic(),
                 "the kept connection's lifetime to pass")
        # The next transaction gets another connection; the kept one is
        # not it, and must not silently run outside the transaction.
        with self.assertRaises(ConnectionMisuse) as caught:
            kept.cursor().execute("INSERT INTO dm_items (value) VALUES "
                                  "('kept')")
        self.assertIn("call pool.connection() again", str(caught.exception))
        self.insert(pool, "fresh")
        transaction.commit()
        self.assertEqual(self.values(), ["fresh"])

    def test_a_connection_its_thread_gave_back_is_the_next_callers(self):
        # A thread's connection goes back to the pool when the thread ends;
        # whoever takes it next with getconn() commits it themselves. (With
        # a configure that leaves connections in autocommit mode, as the
        # transaction integration runs them, it goes back unreset.)
        from tests.poolhelpers import start
        from tests.poolhelpers import wait_for

        def autocommit(conn):
            conn.autocommit = True
        pool = self._makeOne(maxconn=1, configure=autocommit)

        def request():
            self.insert(pool, "theirs")
            transaction.commit()
        start(self, request).finish(self)
        wait_for(lambda: pool.stats()["idle"] == 1,
                 "the ended thread's connection back")
        conn = pool.getconn()
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("INSERT INTO dm_items (value) VALUES ('mine')")
        conn.commit()
        pool.putconn(conn)
        self.assertEqual(self.values(), ["theirs", "mine"])

    def test_cursor_of_a_returned_connection_is_refused(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne(maxconn=1)
        conn = pool.connection()
        cur = conn.cursor()
        self.sql("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        with self.assertRaises(psycopg2.OperationalError):
            cur.execute("SELECT 1")
        transaction.abort()         # the broken connection goes back
        for send in (lambda: cur.execute("SELECT 1"),
                     lambda: cur.executemany("SELECT %s", [(1,)]),
                     lambda: cur.callproc("pg_backend_pid")):
            with self.assertRaises(ConnectionMisuse) as caught:
                send()
            self.assertIn("went back to its pool", str(caught.exception))

    def test_transaction_dropped_without_abort_is_not_carried_over(self):
        tm = transaction.TransactionManager()
        pool = self._makeOne(maxconn=1, timeout=5, transaction_manager=tm)
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('dropped')")
        # The transaction is forgotten without commit or abort.
        tm.free(tm.get())
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('kept')")
        tm.commit()
        self.assertEqual(self.values(), ["kept"])
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_savepoint_of_a_finished_transaction_is_refused(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne()
        self.insert(pool, "a")
        savepoint = pool.thread_local.state.dm.savepoint()
        transaction.commit()
        with self.assertRaises(ConnectionMisuse) as caught:
            savepoint.rollback()
        self.assertIn("finished transaction", str(caught.exception))
        self.assertIn("'dm'", str(caught.exception))
        transaction.abort()
        self.assertEqual(self.values(), ["a"])


class SessionResetFailureTests(_Base):
    """DISCARD ALL after a failed transaction's ROLLBACK, when it fails on a
    connection that is still open.

    PostgreSQL offers no way to make DISCARD ALL fail on demand after a
    ROLLBACK, except running it inside a transaction block; so these tests
    call ThreadState.ended() themselves, with the connection still in its
    transaction, where the data manager would call it after ROLLBACK.
    """

    def _failed_reset(self, pool):
        from tests.poolhelpers import LogCapture
        log = LogCapture().install(self)
        conn = pool.connection()
        conn.cursor().execute("SELECT pg_advisory_lock(4713)")
        state = pool.thread_local.state
        dm = state.dm
        dm.reset_after = True
        dm.finished = True
        state.ended(dm)
        self.assertTrue(any("could not reset the session" in r.getMessage()
                            for r in log.records), log.records)
        # Marked as not to be parked or reused by this thread.
        self.assertTrue(dm.broken)
        return conn

    def test_connection_is_no_longer_bound_to_the_thread(self):
        pool = self._makeOne(maxconn=2)
        self._failed_reset(pool)
        stats = pool.stats()
        self.assertEqual((stats["bound_idle"], stats["in_use"]), (0, 0))

    def test_connection_is_discarded(self):
        # Closed, not rolled back and kept with the session state the
        # reset failed to clear (here a session advisory lock).
        pool = self._makeOne(maxconn=2)
        conn = self._failed_reset(pool)
        self.assertTrue(conn.closed)


class CommitPreparedFailureTests(_Base):
    """COMMIT PREPARED / ROLLBACK PREPARED failing on zpgpool's own
    connection (its backend killed after PREPARE), resolved from another."""

    def _kill(self, pid):
        from tests.poolhelpers import wait_for
        self.sql("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: not self.sql("SELECT 1 FROM pg_stat_activity WHERE "
                                      "pid = %s", (pid,)), "backend %d gone"
                 % pid)

    def test_commit_prepared_failing_is_committed_from_another_connection(
            self):
        pool = self._makeOne(twophase=True)
        self.insert(pool, "resolved elsewhere")
        pid = pool.connection().get_backend_pid()
        dm = pool.thread_local.state.dm
        # Finishes after every vote (zpgpool has prepared) and before
        # zpgpool's own tpc_finish.
        hook = _Hook("~a before zpgpool", "tpc_finish",
                     lambda txn: self._kill(pid))
        self.assertLess(hook.sortKey(), dm.sortKey())
        transaction.get().join(hook)
        transaction.commit()
        self.assertEqual(self.values(), ["resolved elsewhere"])
        self.assertNothingPrepared()
        self.assertEqual(pool.stats()["in_use"], 0)
        self.insert(pool, "next")
        transaction.commit()
        self.assertEqual(self.values(), ["resolved elsewhere", "next"])

    def test_rollback_prepared_failing_is_rolled_back_elsewhere(self):
        pool = self._makeOne(twophase=True)
        self.insert(pool, "vetoed")
        pid = pool.connection().get_backend_pid()

        def kill_and_veto(txn):
            self._kill(pid)
            raise RuntimeError("vetoed after zpgpool prepared")
        hook = _Hook("~~~ after zpgpool", "tpc_vote", kill_and_veto)
        self.assertGreater(hook.sortKey(), pool.thread_local.state.dm.sortKey())
        transaction.get().join(hook)
        with self.assertRaises(RuntimeError):
            transaction.commit()
        transaction.abort()
        self.assertEqual(self.values(), [])
        self.assertNothingPrepared()
        self.insert(pool, "next")
        transaction.commit()
        self.assertEqual(self.values(), ["next"])


class NeverCommittedTests(_Base):
    """Statements a thread or a script never committed are rolled back,
    with a warning that names the pool."""

    def setUp(self):
        super().setUp()
        from tests.poolhelpers import LogCapture
        self.log = LogCapture().install(self)

    def warnings(self):
        return [r.getMessage() for r in self.log.records
                if r.levelname == "WARNING" and "never committed"
                in r.getMessage()]

    def test_thread_ending_mid_transaction(self):
        pool = self._makeOne(name="forgetful")

        def forget():
            self.insert(pool, "never committed")

        thread = threading.Thread(target=forget)
        thread.start()
        thread.join(JOIN_TIMEOUT)
        from tests.poolhelpers import wait_for
        wait_for(lambda: pool.stats()["in_use"] == 0, "the connection back")
        self.assertEqual(self.values(), [])
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("'forgetful'", warnings[0])
        self.assertIn("a thread ended", warnings[0])

    def test_a_thread_s_connection_goes_to_getconn_out_of_autocommit(self):
        # connection() runs its connection in autocommit mode (the data
        # manager sends BEGIN itself); once the thread has ended, a
        # getconn() caller gets psycopg2's default, whose statements open
        # a transaction.
        pool = self._makeOne(name="handed-on", maxconn=1)

        def work():
            self.insert(pool, "committed")
            transaction.commit()

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(JOIN_TIMEOUT)
        from tests.poolhelpers import wait_for
        wait_for(lambda: pool.stats()["idle"] == 1, "the connection back")
        conn = pool.getconn()
        try:
            self.assertFalse(conn.autocommit)
            conn.cursor().execute("SELECT 1")
            self.assertEqual(conn.get_transaction_status(),
                             ext.TRANSACTION_STATUS_INTRANS)
        finally:
            conn.rollback()
            pool.putconn(conn)
        self.assertEqual(self.values(), ["committed"])

    def test_thread_that_committed_is_not_warned_about(self):
        pool = self._makeOne(name="careful")

        def work():
            self.insert(pool, "committed")
            transaction.commit()
            pool.connection()   # joined, but nothing sent

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(JOIN_TIMEOUT)
        self.assertEqual(self.values(), ["committed"])
        self.assertEqual(self.warnings(), [])

    def test_script_exiting_without_commit(self):
        script = textwrap.dedent("""
            import logging, sys
            logging.basicConfig()
            from zpgpool import ConnectionPool
            pool = ConnectionPool(sys.argv[1], name="script")
            cur = pool.connection().cursor()
            cur.execute("INSERT INTO dm_items (value) VALUES ('forgotten')")
            print(pool.connection().get_backend_pid(), flush=True)
        """)
        proc = subprocess.run([sys.executable, "-c", script, self.dsn],
                              env=python_env(), timeout=JOIN_TIMEOUT,
                              capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("zpgpool pool 'script': the process is exiting with "
                      "statements that were never committed", proc.stderr)
        self.assertEqual(self.values(), [])


class GivenManagerTests(_Base):
    """``connection(transaction_manager)``: a transaction of a manager
    other than the pool's, such as pyramid_tm's request.tm."""

    def request_manager(self):
        """A manager of one request, as pyramid_tm's explicit_manager
        makes them, begun."""
        tm = transaction.TransactionManager(explicit=True)
        tm.begin()
        return tm

    def test_each_request_commits_through_its_own_manager(self):
        pool = self._makeOne(maxconn=1, timeout=5)
        pids = set()
        for value in ("a", "b", "c"):
            tm = self.request_manager()
            conn = pool.connection(tm)
            self.assertIs(pool.connection(tm), conn)
            conn.cursor().execute(
                "INSERT INTO dm_items (value) VALUES (%s)", (value,))
            pids.add(conn.get_backend_pid())
            tm.commit()
            self.assertEqual(pool.stats()["in_use"], 0)
        self.assertEqual(self.values(), ["a", "b", "c"])
        # One connection, kept for the thread across the managers.
        self.assertEqual(len(pids), 1)
        tm = self.request_manager()
        pool.connection(tm).cursor().execute(
            "INSERT INTO dm_items (value) VALUES ('aborted')")
        tm.abort()
        self.assertEqual(self.values(), ["a", "b", "c"])
        # The pool's own manager still works after them.
        self.insert(pool, "d")
        transaction.commit()
        self.assertEqual(self.values(), ["a", "b", "c", "d"])

    def test_savepoints_and_two_phase_follow_the_given_manager(self):
        pool = self._makeOne(twophase=True)
        tm = self.request_manager()
        cur = pool.connection(tm).cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('kept')")
        savepoint = tm.savepoint()
        cur.execute("INSERT INTO dm_items (value) VALUES ('undone')")
        savepoint.rollback()
        # IDataManager's transaction_manager: the manager it was joined by.
        self.assertIs(pool.thread_local.state.dm.transaction_manager, tm)
        gid = tm.get().extension[pool.thread_local.state.gid_key]
        self.assertTrue(gid.startswith("zpgpool:"), gid)
        tm.commit()
        self.assertEqual(self.values(), ["kept"])
        self.assertNothingPrepared()
        # The thread-local manager's transaction was never involved.
        self.assertNotIn(pool.thread_local.state.gid_key,
                         transaction.get().extension)

    def test_another_managers_open_transaction_is_refused(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne(maxconn=1, timeout=5)
        tm = self.request_manager()
        cur = pool.connection(tm).cursor()
        cur.execute("INSERT INTO dm_items (value) VALUES ('first')")
        other = self.request_manager()
        for use in (pool.connection, lambda: pool.connection(other)):
            with self.assertRaises(ConnectionMisuse) as caught:
                use()
            self.assertIn("pool 'dm': this thread's connection is in an open"
                          " transaction of another transaction manager",
                          str(caught.exception))
            self.assertIn("pool.connection(request.tm)",
                          str(caught.exception))
        # Nothing of the open transaction was lost: it goes on and commits.
        cur.execute("INSERT INTO dm_items (value) VALUES ('second')")
        tm.commit()
        self.assertEqual(self.values(), ["first", "second"])
        other.abort()

    def test_a_kept_cursor_after_its_managers_transaction(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne()
        tm = self.request_manager()
        cur = pool.connection(tm).cursor()
        tm.commit()
        with self.assertRaises(ConnectionMisuse) as caught:
            cur.execute("INSERT INTO dm_items (value) VALUES ('late')")
        self.assertIn("no transaction is active", str(caught.exception))
        self.assertIn("pool.connection(request.tm)", str(caught.exception))
        self.assertEqual(self.values(), [])


class PyramidTests(_Base):
    """A Pyramid application under pyramid_tm, served through WSGI."""

    def app(self, pool, manager_hook=None, argument=None):
        """A WSGI test app whose POST /add inserts ``value`` through
        ``pool``, passing connection() ``argument(request)`` when given,
        and fails after the insert when asked to."""
        import webtest
        from pyramid.config import Configurator

        def add(request):
            if argument is None:
                conn = pool.connection()
            else:
                conn = pool.connection(argument(request))
            conn.cursor().execute(
                "INSERT INTO dm_items (value) VALUES (%s)",
                (request.params["value"],))
            if "fail" in request.params:
                raise ValueError("the view failed after its insert")
            return request.response

        settings = {}
        if manager_hook is not None:
            settings["tm.manager_hook"] = manager_hook
        config = Configurator(settings=settings)
        config.include("pyramid_tm")
        config.add_route("add", "/add")
        config.add_view(add, route_name="add", request_method="POST")
        return webtest.TestApp(config.make_wsgi_app())

    def assertNoTransactionLeftOpen(self, pool):
        self.assertEqual(pool.stats()["in_use"], 0)
        self.assertEqual(self.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
            "'zpgpool:dm' AND state <> 'idle'"), [(0,)])

    def test_explicit_manager_given_the_requests(self):
        pool = self._makeOne(maxconn=1, timeout=5)
        app = self.app(pool, "pyramid_tm.explicit_manager",
                       argument=lambda request: request.tm)
        app.post("/add", {"value": "one"})
        app.post("/add", {"value": "two"})
        with self.assertRaises(ValueError):
            app.post("/add", {"value": "failed", "fail": "1"})
        self.assertEqual(self.values(), ["one", "two"])
        self.assertNoTransactionLeftOpen(pool)

    def test_explicit_manager_not_given_is_refused(self):
        from zpgpool import ConnectionMisuse
        pool = self._makeOne(maxconn=1, timeout=5)
        app = self.app(pool, "pyramid_tm.explicit_manager")
        for value in ("one", "two"):
            with self.assertRaises(ConnectionMisuse) as caught:
                app.post("/add", {"value": value})
            self.assertIn("zpgpool pool 'dm': this request's transaction "
                          "belongs to pyramid_tm's request.tm",
                          str(caught.exception))
            self.assertIn("pool.connection(request.tm)",
                          str(caught.exception))
        self.assertEqual(self.values(), [])
        self.assertNoTransactionLeftOpen(pool)
        # Asked for on purpose, the pool's own manager is used; its
        # transaction is then the caller's to commit.
        app = self.app(pool, "pyramid_tm.explicit_manager",
                       argument=lambda request: pool.transaction_manager)
        app.post("/add", {"value": "on purpose"})
        self.assertEqual(self.values(), [])
        transaction.commit()
        self.assertEqual(self.values(), ["on purpose"])

    def test_default_manager(self):
        # pyramid_tm's default is transaction.manager, the pool's too.
        pool = self._makeOne(maxconn=1, timeout=5)
        app = self.app(pool)
        app.post("/add", {"value": "one"})
        with self.assertRaises(ValueError):
            app.post("/add", {"value": "failed", "fail": "1"})
        self.assertEqual(self.values(), ["one"])
        self.assertNoTransactionLeftOpen(pool)
