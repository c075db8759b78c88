"""Fault scenarios: the server restarting, sessions killed, the network cut,
the server down at start-up, thread churn, exhaustion and fork, under load.

Every scenario goes the way a Zope view does --
``getUtility(IConnectionPool, name).connection()`` and the thread's
transaction manager -- from many threads, and then checks the invariants
in ``faulthelpers.check_invariants``: every committed transaction is in the
database exactly once, nothing that failed before COMMIT is, the pool's
stats add up, no thread is stuck, and after ``close()`` the server sees no
session of the pool.  Nothing is mocked: the server is a real, private one
and the network element is a real TCP proxy.  The longer versions live in
``stress/run.py``.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

import psycopg2
import psycopg2.extensions
import transaction
from zope.component import getGlobalSiteManager
from zope.component import getUtility

from zpgpool import ConnectError
from zpgpool import ConnectionPool
from zpgpool import PoolTimeout
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing import PRIVATE_POSTGRES_LAYER

from tests.faulthelpers import CLEAR_ERRORS
from tests.faulthelpers import Load
from tests.faulthelpers import TcpProxy
from tests.faulthelpers import check_invariants
from tests.faulthelpers import check_no_leaks
from tests.faulthelpers import make_table
from tests.faulthelpers import one_request
from tests.faulthelpers import wait_until_all_succeed
from tests.poolhelpers import WAIT
from tests.poolhelpers import LogCapture
from tests.poolhelpers import backend_pids
from tests.poolhelpers import query
from tests.poolhelpers import run_in_child
from tests.poolhelpers import unique_name
from tests.poolhelpers import wait_for
from tests.support import python_env


class FaultTestBase(unittest.TestCase):

    layer = PRIVATE_POSTGRES_LAYER

    def setUp(self):
        transaction.abort()
        self.name = unique_name("f")
        self.table = "faults_" + self.name
        self.dsn = self.layer.dsn
        self.log = LogCapture().install(self)
        make_table(self.dsn, self.table)
        self.addCleanup(self._drop_table)

    def _drop_table(self):
        server = self.layer.server
        if not server.is_running():
            server.start()
        query(self.dsn, "DROP TABLE IF EXISTS %s" % self.table)

    def register(self, dsn=None, **kw):
        """A pool registered as the named utility views look up."""
        kw.setdefault("name", self.name)
        kw.setdefault("maxconn", 8)
        pool = ConnectionPool(self.dsn if dsn is None else dsn, **kw)
        gsm = getGlobalSiteManager()
        gsm.registerUtility(pool, IConnectionPool, kw["name"])
        self.addCleanup(gsm.unregisterUtility, pool, IConnectionPool,
                        kw["name"])
        self.addCleanup(pool.closeall)
        return pool

    def finish(self, pool, load):
        load.join(self)
        stats = check_invariants(self, pool, self.dsn, self.table, load)
        check_no_leaks(self, pool, self.dsn)
        return stats


class RestartUnderLoadTests(FaultTestBase):

    def _restart(self, mode):
        pool = self.register(maxconn=8, connect_timeout=2,
                             reconnect_max_delay=0.2)
        load = Load(self.name, self.table, threads=16).start()
        wait_for(lambda: len(load.committed) >= 100, "load running")
        self.layer.server.stop(mode)
        down = time.monotonic()
        wait_for(lambda: load.errors_since(down), "requests failing")
        self.layer.server.start()
        back = time.monotonic()
        wait_until_all_succeed(load, back)
        first, everyone = load.recovery(back)
        load.stop(self)
        stats = self.finish(pool, load)
        # Requests begun after the server is back do not fail: the pool
        # retired every connection of the old server when it met the
        # first dead one. Allow the requests in flight at that moment.
        late = load.errors_since(back + 0.5)
        self.assertLessEqual(len(late), 16, late)
        self.assertGreater(stats["connections_lost"], 0)
        return first, everyone

    def test_fast_stop_under_load(self):
        self._restart("fast")

    def test_immediate_stop_under_load(self):
        self._restart("immediate")


class KilledSessionsTests(FaultTestBase):

    def test_terminate_random_pooled_backends_under_load(self):
        pool = self.register(maxconn=6)
        load = Load(self.name, self.table, threads=12).start()
        app_name = "zpgpool:" + self.name
        killed = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            rows = query(self.dsn,
                         "SELECT pg_terminate_backend(pid) FROM "
                         "pg_stat_activity WHERE application_name = %s "
                         "ORDER BY random() LIMIT 2", (app_name,))
            killed += len(rows)
            time.sleep(0.1)
        since = time.monotonic()
        wait_until_all_succeed(load, since)
        load.stop(self)
        self.assertGreater(killed, 0)
        stats = self.finish(pool, load)
        self.assertGreater(stats["connections_lost"]
                           + stats["connections_discarded"], 0)

    def test_lent_parked_connection_whose_session_died(self):
        # A thread's connection, parked between its transactions, is lent
        # to another thread that would otherwise wait; its session was
        # killed meanwhile. The borrower must get a live one.
        pool = self.register(maxconn=1, health_check_after=0)
        parked = threading.Event()
        release = threading.Event()

        def owner():
            one_request(self.name, self.table, "owner")
            parked.set()
            release.wait(WAIT)

        t = threading.Thread(target=owner, daemon=True)
        t.start()
        parked.wait(WAIT)
        self.assertEqual(pool.stats()["bound_idle"], 1)
        query(self.dsn, "SELECT pg_terminate_backend(pid) FROM "
              "pg_stat_activity WHERE application_name = %s",
              ("zpgpool:" + self.name,))
        self.assertEqual(one_request(self.name, self.table, "borrower"),
                         "committed")
        release.set()
        t.join(WAIT)
        transaction.abort()
        self.assertEqual(pool.stats()["connections_lost"], 1)
        check_no_leaks(self, pool, self.dsn)

    def test_own_parked_connection_after_a_quiet_restart(self):
        # Nobody uses the pool while the server restarts; the thread's
        # next request finds its parked connection dead by the ping.
        pool = self.register(maxconn=2, health_check_after=0)
        self.assertEqual(one_request(self.name, self.table, "before"),
                         "committed")
        self.layer.server.restart("fast")
        self.assertEqual(one_request(self.name, self.table, "after"),
                         "committed")
        transaction.abort()
        self.assertEqual(pool.stats()["connections_lost"], 1)
        check_no_leaks(self, pool, self.dsn)

    def test_idle_in_transaction_timeout_from_the_server(self):
        dsn = psycopg2.extensions.make_dsn(
            self.dsn, options="-c idle_in_transaction_session_timeout=300")
        pool = self.register(dsn, maxconn=2)
        tm = transaction.manager
        tm.begin()
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO %s VALUES ('idle')" % self.table)
        time.sleep(1.0)   # the server ends the idle session meanwhile
        with self.assertRaises(CLEAR_ERRORS) as caught:
            cur.execute("INSERT INTO %s VALUES ('late')" % self.table)
            tm.commit()
        tm.abort()
        self.assertIsInstance(caught.exception, psycopg2.OperationalError)
        # The next transaction gets a live connection.
        self.assertEqual(one_request(self.name, self.table, "next"),
                         "committed")
        self.assertEqual(query(self.dsn, "SELECT token FROM %s"
                               % self.table), [("next",)])
        wait_for(lambda: pool.stats()["in_use"] == 0, "in_use 0")
        check_no_leaks(self, pool, self.dsn)

    def test_statement_timeout_from_the_server(self):
        dsn = psycopg2.extensions.make_dsn(
            self.dsn, options="-c statement_timeout=200")
        pool = self.register(dsn, maxconn=2)
        tm = transaction.manager
        tm.begin()
        cur = pool.connection().cursor()
        with self.assertRaises(psycopg2.errors.QueryCanceled):
            cur.execute("SELECT pg_sleep(5)")
        tm.abort()
        conn = pool.connection()
        # A cancelled statement is no disconnect: the same session serves.
        self.assertEqual(one_request(self.name, self.table, "after"),
                         "committed")
        self.assertIs(pool.connection(), conn)
        transaction.abort()
        self.assertEqual(pool.stats()["connections_lost"], 0)
        check_no_leaks(self, pool, self.dsn)


class NetworkCutTests(FaultTestBase):

    def setUp(self):
        super().setUp()
        server = self.layer.server
        self.proxy = TcpProxy((server.host, server.port))
        self.addCleanup(self.proxy.close)
        self.proxied = psycopg2.extensions.make_dsn(
            self.dsn, **self.proxy.dsn_params())

    def test_silent_network(self):
        # Only the holder's connection goes through the proxy when it goes
        # silent: on loopback the kernel acknowledges what the proxy keeps,
        # so a statement on an established connection would wait for the
        # heal (on a real network tcp_user_timeout, 30 s by default, ends
        # it). Connecting and waiting for a place are what must time out.
        pool = self.register(self.proxied, maxconn=2, timeout=1,
                             connect_timeout=2)
        holder_ready = threading.Event()
        release = threading.Event()
        results = {}

        def holder():
            tm = transaction.manager
            tm.begin()
            pool.connection().cursor().execute(
                "INSERT INTO %s VALUES ('held')" % self.table)
            holder_ready.set()
            release.wait(WAIT)
            tm.commit()

        t = threading.Thread(target=holder, daemon=True)
        t.start()
        holder_ready.wait(WAIT)
        self.proxy.silent()

        def caller(n):
            start = time.monotonic()
            try:
                one_request(self.name, self.table, "silent-%d" % n)
            except Exception as exc:
                results[n] = (exc, time.monotonic() - start)
            else:
                results[n] = (None, time.monotonic() - start)

        callers = [threading.Thread(target=caller, args=(n,), daemon=True)
                   for n in range(4)]
        for c in callers:
            c.start()
        for c in callers:
            c.join(WAIT)
            self.assertFalse(c.is_alive(), "a caller hangs on a silent "
                             "network")
        for n, (exc, _) in results.items():
            # Connecting through the silent proxy times out after
            # connect_timeout; a caller that found no free place waits the
            # pool's timeout.
            self.assertIsInstance(exc, (ConnectError, PoolTimeout), exc)
            self.assertIn(repr(self.name), str(exc))
        messages = " ".join(str(exc) for exc, _ in results.values())
        self.assertIn("timeout expired", messages)
        self.proxy.heal()
        release.set()
        t.join(WAIT)
        self.assertEqual(one_request(self.name, self.table, "healed"),
                         "committed")
        transaction.abort()
        rows = {r[0] for r in query(self.dsn, "SELECT token FROM %s"
                                    % self.table)}
        self.assertEqual(rows, {"held", "healed"})
        check_no_leaks(self, pool, self.dsn)

    def test_refusing_network_under_load(self):
        pool = self.register(self.proxied, maxconn=4, timeout=2,
                             connect_timeout=2, reconnect_max_delay=0.2)
        load = Load(self.name, self.table, threads=8).start()
        wait_for(lambda: len(load.committed) >= 50, "load running")
        self.proxy.refuse()
        cut = time.monotonic()
        # Sessions through the proxy are reset; connects are refused.
        wait_for(lambda: any(isinstance(e, ConnectError)
                             and "refused" in str(e)
                             for _, _, e in load.errors_since(cut)),
                 "a connect refused")
        errors = load.errors_since(cut)
        self.assertTrue(all(isinstance(e, CLEAR_ERRORS)
                            for _, _, e in errors), errors)
        self.proxy.heal()
        healed = time.monotonic()
        wait_until_all_succeed(load, healed)
        load.stop(self)
        self.finish(pool, load)


class ServerDownAtStartupTests(FaultTestBase):

    def test_zcml_loads_requests_fail_fast_then_serve(self):
        from zope.configuration import xmlconfig
        server = self.layer.server
        server.stop("fast")
        os.environ["ZPGPOOL_FAULTS_DSN"] = self.dsn
        self.addCleanup(os.environ.pop, "ZPGPOOL_FAULTS_DSN", None)
        xmlconfig.string("""
        <configure xmlns="http://namespaces.zope.org/zope"
                   xmlns:zpgpool="http://namespaces.zope.org/zpgpool">
          <include package="zpgpool" />
          <zpgpool:pool name="%s" dsn="env:ZPGPOOL_FAULTS_DSN"
                        maxconn="4" timeout="5" connect_timeout="2" />
        </configure>""" % self.name)
        pool = getUtility(IConnectionPool, self.name)
        gsm = getGlobalSiteManager()
        self.addCleanup(gsm.unregisterUtility, pool, IConnectionPool,
                        self.name)
        self.addCleanup(pool.closeall)
        for n in range(3):
            start = time.monotonic()
            with self.assertRaises(ConnectError) as caught:
                one_request(self.name, self.table, "down-%d" % n)
            # Fast: a refused connect, not the pool's 5 s wait.
            self.assertLess(time.monotonic() - start, WAIT)
            message = str(caught.exception)
            self.assertIn("zpgpool pool %r" % self.name, message)
            self.assertIn("refused", message)
            self.assertNotIn(server.password, message)
        self.assertEqual(pool.stats()["in_use"], 0)
        server.start()
        self.assertEqual(one_request(self.name, self.table, "up"),
                         "committed")
        transaction.abort()
        self.assertEqual(query(self.dsn, "SELECT token FROM %s"
                               % self.table), [("up",)])
        check_no_leaks(self, pool, self.dsn)


class ThreadChurnTests(FaultTestBase):

    def test_a_thousand_short_lived_threads(self):
        pool = self.register(maxconn=4, timeout=WAIT)
        app_name = "zpgpool:" + self.name
        peak = {"size": 0, "backends": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak["size"] = max(peak["size"], pool.stats()["size"])
                peak["backends"] = max(peak["backends"],
                                       len(backend_pids(self.dsn, app_name)))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        total = 1000
        load_threads = []
        for batch in range(0, total, 50):
            # 50 at a time alive, each one transaction, then gone.
            loads = [Load(self.name, self.table, threads=1, per_thread=1)
                     for _ in range(50)]
            for load in loads:
                load.threads[0].name = "churn-%d" % (batch + len(load_threads))
                load.start()
                load_threads.append(load)
            for load in loads:
                load.join(self)
        stop.set()
        watcher.join(WAIT)
        committed = sum(len(load.committed) for load in load_threads)
        errors = [e for load in load_threads for e in load.errors]
        self.assertEqual(errors, [])
        self.assertEqual(committed, total)
        self.assertEqual(query(self.dsn, "SELECT count(DISTINCT token) FROM"
                               " %s" % self.table), [(1,)])  # all "0-0"
        self.assertEqual(query(self.dsn, "SELECT count(*) FROM %s"
                               % self.table), [(total,)])
        self.assertLessEqual(peak["size"], 4)
        self.assertLessEqual(peak["backends"], 4)
        wait_for(lambda: pool.stats()["in_use"] == 0, "in_use back to 0")
        stats = pool.stats()
        self.assertEqual(stats["bound_idle"] + stats["idle"], stats["size"])
        check_no_leaks(self, pool, self.dsn)


class ExhaustionTests(FaultTestBase):

    def test_64_threads_on_4_connections(self):
        pool = self.register(maxconn=4, timeout=1.0)
        load = Load(self.name, self.table, threads=64, per_thread=3,
                    sleep=0.05).start()
        load.join(self)
        # Each request either committed or waited its second and got
        # PoolTimeout; nothing else.
        self.assertTrue(all(isinstance(e, PoolTimeout)
                            for _, _, e in load.errors), list(load.errors)[:3])
        self.assertEqual(len(load.committed) + len(load.errors), 64 * 3)
        self.assertGreater(len(load.committed), 0)
        stats = self.finish(pool, load)
        self.assertEqual(stats["timeouts"], len(load.errors))

    def test_waiters_are_served_in_arrival_order(self):
        pool = self.register(maxconn=1, timeout=WAIT)
        order = []
        holding = threading.Event()
        release = threading.Event()

        def hold():
            with transaction.manager:
                pool.connection().cursor().execute("SELECT 1")
                holding.set()
                release.wait(WAIT)

        def waiter(n):
            with transaction.manager:
                getUtility(IConnectionPool, self.name).connection()
                order.append(n)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        holding.wait(WAIT)
        waiters = []
        for n in range(8):
            t = threading.Thread(target=waiter, args=(n,), daemon=True)
            t.start()
            waiters.append(t)
            wait_for(lambda: pool.stats()["waiting"] == n + 1,
                     "waiter %d queued" % n)
        release.set()
        for t in [holder] + waiters:
            t.join(WAIT)
            self.assertFalse(t.is_alive())
        self.assertEqual(order, list(range(8)))
        wait_for(lambda: pool.stats()["in_use"] == 0, "in_use 0")
        check_no_leaks(self, pool, self.dsn)


class ForkTests(FaultTestBase):

    def test_parent_and_child_keep_working_through_connection(self):
        pool = self.register(maxconn=4)
        # The parent's thread holds its connection in an open transaction
        # across the fork, and another thread has one parked.
        self.assertEqual(one_request(self.name, self.table, "p-before"),
                         "committed")
        transaction.manager.begin()
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO %s VALUES ('p-open')" % self.table)
        cur.execute("SELECT pg_backend_pid()")
        parent_pid = cur.fetchone()[0]
        other = Load(self.name, self.table, threads=1, per_thread=1)
        other.start().join(self)

        def child():
            transaction.manager.begin()
            c = getUtility(IConnectionPool, self.name).connection().cursor()
            c.execute("SELECT pg_backend_pid()")
            assert c.fetchone()[0] != parent_pid, "the parent's session"
            c.execute("INSERT INTO %s VALUES ('child')" % self.table)
            transaction.manager.commit()
            load = Load(self.name, self.table, threads=4, per_thread=5)
            load.start().join()
            assert not load.errors, load.errors
            getUtility(IConnectionPool, self.name).close()

        self.assertEqual(run_in_child(child), (0, "ok"))
        # The parent's open transaction survived and commits.
        cur.execute("SELECT pg_backend_pid()")
        self.assertEqual(cur.fetchone()[0], parent_pid)
        transaction.manager.commit()
        load = Load(self.name, self.table, threads=4, per_thread=5).start()
        load.join(self)
        self.assertEqual(list(load.errors), [])
        tokens = [r[0] for r in query(self.dsn, "SELECT token FROM %s"
                                      % self.table)]
        for token in ("p-before", "p-open", "child"):
            self.assertEqual(tokens.count(token), 1, tokens)
        # 1 + 1 + 1 + 20 (child) + 20 (parent) rows, plus the other thread.
        self.assertEqual(len(tokens), 44)
        transaction.abort()
        wait_for(lambda: pool.stats()["in_use"] == 0, "in_use 0")
        check_no_leaks(self, pool, self.dsn)


class TwoPhaseKilledDuringCommitTests(FaultTestBase):
    """A process killed while its COMMIT PREPARED is on the server.

    To catch it there honestly, the server is made to hold the COMMIT: once
    the transaction is prepared, synchronous_standby_names names a standby
    that never comes, so COMMIT PREPARED waits (wait event SyncRep) after
    ZODB has finished. The process is killed then; the wait is lifted, and
    ``recover`` with ZODB's decision must leave both sides agreeing.
    """

    _SCRIPT = textwrap.dedent("""
        import sys, time, psycopg2, transaction, ZODB, ZODB.FileStorage
        from zpgpool import ConnectionPool
        dsn, admin, path, name, table = sys.argv[1:6]
        db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
        pool = ConnectionPool(dsn, name=name, twophase=True)
        zconn = db.open()
        zconn.root()["value"] = "crash"
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO %s VALUES ('crash')" % table)

        class HoldCommit:
            # Votes after zpgpool has prepared; then COMMIT PREPARED waits.
            transaction_manager = transaction.manager
            def sortKey(self):
                return "~~~ after zpgpool"
            def abort(self, txn):
                pass
            tpc_begin = commit = tpc_abort = tpc_finish = abort
            def tpc_vote(self, txn):
                c = psycopg2.connect(admin)
                c.autocommit = True
                c.cursor().execute(
                    "ALTER SYSTEM SET synchronous_standby_names = "
                    "'zpgpool_nobody'")
                c.cursor().execute("SELECT pg_reload_conf()")
                c.close()
                time.sleep(0.5)   # the reload reaches the backends

        transaction.get().join(HoldCommit())
        transaction.commit()
        print("commit returned")
    """)

    def _sql(self, statement):
        return self.layer.server.execute(statement)

    def _release_commits(self):
        self._sql("ALTER SYSTEM RESET synchronous_standby_names")
        self._sql("SELECT pg_reload_conf()")

    def test_killed_during_commit_prepared_then_recovered(self):
        import ZODB
        import ZODB.FileStorage
        from zpgpool.datamanager import recover
        from zpgpool.datamanager import zodb_decider
        self.addCleanup(self._release_commits)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "Data.fs")
        ZODB.DB(ZODB.FileStorage.FileStorage(path)).close()
        admin = self.layer.server.socket_dsn()
        proc = subprocess.Popen(
            [sys.executable, "-c", self._SCRIPT, self.dsn, admin, path,
             self.name, self.table], env=python_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(proc.communicate, timeout=WAIT)
        self.addCleanup(proc.kill)
        app_name = "zpgpool:" + self.name
        # Its COMMIT PREPARED is on the server, waiting.
        wait_for(lambda: query(
            self.dsn, "SELECT 1 FROM pg_stat_activity WHERE "
            "application_name = %s AND wait_event = 'SyncRep' AND query "
            "LIKE 'COMMIT PREPARED%%'", (app_name,)),
            "COMMIT PREPARED waiting on the server")
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=WAIT)
        self.assertEqual(proc.returncode, -signal.SIGKILL, err)
        self.assertNotIn(b"commit returned", out)
        self._release_commits()
        wait_for(lambda: not backend_pids(self.dsn, app_name),
                 "the killed process's session gone")
        storage = ZODB.FileStorage.FileStorage(path)
        db = ZODB.DB(storage)
        self.addCleanup(db.close)
        pool = self.register()
        # Nothing is left in doubt (or recovery decides it from ZODB).
        recover(pool, older_than=0, decide=zodb_decider(storage))
        self.assertEqual(query(self.dsn, "SELECT count(*) FROM "
                               "pg_prepared_xacts"), [(0,)])
        zconn = db.open()
        in_zodb = zconn.root().get("value") == "crash"
        zconn.close()
        in_pg = query(self.dsn, "SELECT token FROM %s" % self.table)
        # ZODB finished before PostgreSQL's COMMIT PREPARED was sent.
        self.assertTrue(in_zodb)
        self.assertEqual(in_pg, [("crash",)])
        check_no_leaks(self, pool, self.dsn)


class ChecksTests(FaultTestBase):
    """The checks every scenario ends with see what they are there for."""

    def _load(self, pool_name, table, **kw):
        return Load(pool_name, table, threads=2, per_thread=3, **kw) \
            .start().join(self)

    def test_check_invariants_sees_what_went_wrong(self):
        pool = self.register(maxconn=2)
        load = self._load(self.name, self.table)
        check_invariants(self, pool, self.dsn, self.table, load)
        token = load.committed[0]
        insert = "INSERT INTO %s VALUES (%%s)" % self.table
        delete = "DELETE FROM %s WHERE token = %%s" % self.table
        for sql, value, undo, what in (
                (insert, token, [delete, insert], "more than once"),
                (delete, token, [insert], "committed but not in"),
                (insert, "nobody", [delete], "rows from nowhere")):
            query(self.dsn, sql, (value,))
            with self.assertRaisesRegex(AssertionError, what):
                check_invariants(self, pool, self.dsn, self.table, load)
            for sql in undo:
                query(self.dsn, sql, (value,))
            check_invariants(self, pool, self.dsn, self.table, load)

    def test_check_invariants_sees_an_error_that_says_nothing(self):
        pool = self.register(maxconn=2)
        # The table is missing: not an error an outage explains.
        load = self._load(self.name, "faults_no_such_table")
        with self.assertRaisesRegex(AssertionError, "say nothing useful"):
            check_invariants(self, pool, self.dsn, self.table, load)

    def test_check_invariants_sees_a_failed_request_committed(self):
        # Nothing listens on the port: every request fails before COMMIT.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pool = self.register(
            psycopg2.extensions.make_dsn(self.dsn, port=port), timeout=0)
        load = self._load(self.name, self.table)
        self.assertEqual(load.committed, [])
        check_invariants(self, pool, self.dsn, self.table, load)
        query(self.dsn, "INSERT INTO %s VALUES (%%s)" % self.table,
              (load.failed_before_commit[0],))
        with self.assertRaisesRegex(AssertionError,
                                    "failed before COMMIT but in"):
            check_invariants(self, pool, self.dsn, self.table, load)

    def test_wait_for_gives_up(self):
        outcome = []

        def waiting():
            try:
                wait_for(lambda: False, "Godot", timeout=0.1)
            except AssertionError as exc:
                outcome.append(str(exc))

        # In a thread, so that a wait that never ends fails the test.
        waiter = threading.Thread(target=waiting, daemon=True)
        waiter.start()
        waiter.join(WAIT)
        self.assertEqual(len(outcome), 1)
        self.assertIn("Godot", outcome[0])
