"""Tests for zpgpool.pool, against the real throwaway PostgreSQL server.

Nothing here mocks psycopg2 or the server. Where a test needs the server to
misbehave on demand it makes the real one do it: ``pg_terminate_backend``,
stopping and restarting it, or freezing one of its processes with SIGSTOP
(those tests use PRIVATE_POSTGRES_LAYER, whose server runs on this machine).
"""
import io
import os
import re
import signal
import threading
import time
import unittest

import psycopg2
import psycopg2.extensions
import psycopg2.pool

import zpgpool
from zpgpool import ConnectError
from zpgpool import ConnectionMisuse
from zpgpool import ConnectionPool
from zpgpool import InvalidOption
from zpgpool import PoolClosed
from zpgpool import PoolError
from zpgpool import PoolTimeout
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.testing import PRIVATE_POSTGRES_LAYER

from .poolhelpers import WAIT
from .poolhelpers import LogCapture
from .poolhelpers import TableChecks
from .poolhelpers import backend_pids
from .poolhelpers import close_pool
from .poolhelpers import is_connecting
from .poolhelpers import is_in
from .poolhelpers import query
from .poolhelpers import run_in_child
from .poolhelpers import server_pid
from .poolhelpers import closed_port
from .poolhelpers import start
from .poolhelpers import terminate
from .poolhelpers import unique_name
from .poolhelpers import wait_for
from .poolhelpers import with_params


def _use_dict_cursors(conn):
    """A pool's configure callable that gives its connections dict rows."""
    from psycopg2.extras import DictCursor
    conn.cursor_factory = DictCursor


class SlottedConnection(psycopg2.extensions.connection):
    """A connection factory with slots of its own."""
    __slots__ = ("opened_for",)


class PoolTestBase(TableChecks, unittest.TestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        self.name = unique_name()
        self.app_name = "zpgpool:" + self.name
        # What the pool logs goes here, not to stderr.
        self.log = LogCapture().install(self)

    def _makeOne(self, dsn=None, **kw):
        kw.setdefault("name", self.name)
        pool = ConnectionPool(self.layer.dsn if dsn is None else dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def _makeCompat(self, cls, *args, **kw):
        pool = cls(*args, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def backends(self):
        """Backend pids of this test's pool, as the server sees them."""
        return backend_pids(self.layer.dsn, self.app_name)


# -- the psycopg2.pool contract -----------------------------------------------

def psycopg2_style_snippet(module, dsn):
    """Code written against psycopg2.pool's documented API, verbatim.

    ``module`` provides ThreadedConnectionPool and SimpleConnectionPool:
    psycopg2.pool or zpgpool. Returns what the code observed.
    """
    seen = []
    for cls in (module.SimpleConnectionPool, module.ThreadedConnectionPool):
        pool = cls(1, 2, dsn)
        seen.append((pool.minconn, pool.maxconn, pool.closed))
        conn = pool.getconn()
        cur = conn.cursor()
        cur.execute("SELECT 1 + 1")
        seen.append(cur.fetchone()[0])
        conn.commit()
        pool.putconn(conn)
        a = pool.getconn("a")
        seen.append(pool.getconn("a") is a)
        b = pool.getconn(key="b")
        seen.append(a is not b)
        try:
            pool.getconn()
        except psycopg2.pool.PoolError as exc:
            seen.append("connection pool exhausted" in str(exc))
        pool.putconn(a, key="a")
        pool.putconn(b, "b", close=True)
        seen.append(b.closed != 0)
        pool.closeall()
        seen.append((pool.closed, a.closed != 0))
        try:
            pool.getconn()
        except psycopg2.pool.PoolError:
            seen.append("refused after closeall")
    pool = module.ThreadedConnectionPool(0, 1, dsn=dsn)
    conn = pool.getconn()
    conn.cursor().execute("SELECT 1")
    pool.putconn(conn)
    pool.closeall()
    return seen


def set_up_pool_class(module, calls):
    """A subclass of ``module``'s ThreadedConnectionPool that sets its
    connections up in psycopg2's ``_connect``, as code written for
    psycopg2.pool does (to register a type, SET a session default, ...),
    and appends each connection it set up to ``calls``."""
    class SetUpPool(module.ThreadedConnectionPool):
        def _connect(self, key=None):
            conn = super()._connect(key)
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '4321ms'")
            conn.commit()
            calls.append(conn)
            return conn
    return SetUpPool


def connect_override_snippet(module, dsn, name):
    """What the connections of ``set_up_pool_class(module)`` show."""
    calls = []
    SetUpPool = set_up_pool_class(module, calls)
    kw = {} if module is psycopg2.pool else {"name": name}
    pool = SetUpPool(0, 2, dsn, **kw)
    seen = []
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SHOW statement_timeout")
        seen.append(cur.fetchone()[0])
    conn.commit()
    seen.append(calls[-1] is conn)
    pool.putconn(conn)
    pool.closeall()
    return seen


class Psycopg2ContractTests(PoolTestBase):

    def test_errors_are_psycopg2_pool_errors(self):
        for cls in (PoolError, PoolTimeout, PoolClosed, InvalidOption,
                    ConnectionMisuse, ConnectError):
            self.assertTrue(issubclass(cls, psycopg2.pool.PoolError), cls)
        self.assertTrue(issubclass(ConnectError, psycopg2.OperationalError))
        self.assertTrue(issubclass(InvalidOption, ValueError))
        self.assertTrue(issubclass(InvalidOption, TypeError))

    def test_same_code_runs_against_psycopg2_and_zpgpool(self):
        expected = psycopg2_style_snippet(psycopg2.pool, self.layer.dsn)
        ours = psycopg2_style_snippet(zpgpool, self.layer.dsn)
        self.assertEqual(ours, expected)
        self.assertEqual(ours[:3], [(1, 2, False), 2, True])

    def test_a_connect_override_sets_up_each_connection(self):
        expected = connect_override_snippet(psycopg2.pool, self.layer.dsn,
                                            self.name)
        self.assertEqual(expected, ["4321ms", True])
        self.assertEqual(connect_override_snippet(zpgpool, self.layer.dsn,
                                                  self.name), expected)

    def test_a_connect_override_runs_again_after_a_session_reset(self):
        # A borrower's SET makes the pool reset the session when the
        # connection comes back (DISCARD ALL), which undoes the override's
        # SET too: the override runs again, and so does the pool's own
        # configure, after it.
        calls = []
        pool = self._makeCompat(set_up_pool_class(zpgpool, calls), 0, 1,
                                self.layer.dsn,
                                name=self.name,
                                configure=lambda conn: calls.append("own"))
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = 0")
        conn.commit()
        pool.putconn(conn)
        self.assertIs(pool.getconn(), conn)
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            self.assertEqual(cur.fetchone(), ("4321ms",))
        conn.commit()
        self.assertEqual(calls, [conn, "own", conn, "own"])
        pool.putconn(conn)

    def test_a_connect_override_must_set_up_the_pool_s_connection(self):
        # An override that opens a connection of its own (psycopg2's
        # _connect did the opening) is refused by name, and what it opened
        # is closed.
        own = []

        class OwnConnections(zpgpool.ThreadedConnectionPool):
            def _connect(self, key=None):
                own.append(psycopg2.connect(self.dsn_for_test))
                return own[-1]
        OwnConnections.dsn_for_test = self.layer.dsn
        pool = self._makeCompat(OwnConnections, 0, 1, self.layer.dsn,
                                name=self.name)
        with self.assertRaises(ConnectError) as cm:
            pool.getconn()
        message = str(cm.exception)
        self.assertIn(repr(self.name), message)
        self.assertIn("its configure callable %s.%s._connect failed: "
                      "TypeError: it returned " % (
                          __name__, OwnConnections.__qualname__), message)
        self.assertIn("the pool opens its connections itself", message)
        self.assertTrue(own[0].closed)
        wait_for(lambda: not self.backends(), "the pool's connection closed")
        self.assertEqual(pool.stats()["size"], 0)

    def test_calling_connect_directly_is_refused(self):
        # Also by an override, after it has set up a connection in this
        # thread: it is not handed that one again.
        class SetUpPool(zpgpool.ThreadedConnectionPool):
            def _connect(self, key=None):
                return super()._connect(key)
        pool = self._makeCompat(SetUpPool, 0, 1, self.layer.dsn,
                                name=self.name)
        pool.putconn(pool.getconn())
        with self.assertRaises(ConnectionMisuse) as cm:
            pool._connect()
        self.assertEqual(str(cm.exception), (
            "zpgpool pool %r: _connect() sets up a connection the pool has "
            "just opened, and only the pool calls it; to open connections "
            "ahead of use, give minconn or call open(wait=True)"
            % self.name))
        self.assertEqual(pool.stats()["connections_opened"], 1)

    def test_psycopg2_bookkeeping_can_be_read(self):
        # Code that counts psycopg2's _used and _pool (for a health page)
        # reads copies of them, even while it holds the pool's lock.
        pool = self._makeCompat(zpgpool.ThreadedConnectionPool, 0, 3,
                                self.layer.dsn, name=self.name)
        keyed = pool.getconn("a")
        plain = pool.getconn()
        idle = pool.getconn()
        pool.putconn(idle)

        def counts():
            with pool._lock:
                return pool._used, pool._pool, pool._rused
        used, free, rused = start(self, counts).finish(self)
        self.assertEqual(used, {"a": keyed, id(plain): plain})
        self.assertEqual(free, [idle])
        self.assertEqual(rused, {id(keyed): "a", id(plain): id(plain)})
        stats = pool.stats()
        self.assertEqual((len(used), len(free)),
                         (stats["in_use"], stats["idle"]))
        # Copies: changing them changes nothing in the pool.
        pool._pool.clear()
        self.assertEqual(pool._pool, [idle])
        pool.putconn(keyed, "a")
        pool.putconn(plain)
        self.assertEqual(pool._used, {})

    def test_pooled_connection_class_works_on_its_own(self):
        # zpgpool.pool.PooledConnection has been importable since the first
        # release; as a connection_factory outside any pool it is a plain
        # psycopg2 connection.
        from zpgpool.pool import PooledConnection
        conn = psycopg2.connect(self.layer.dsn,
                                connection_factory=PooledConnection)
        self.addCleanup(conn.close)
        self.assertIsInstance(conn, PooledConnection)
        with conn.cursor() as cur:
            cur.execute("SET LOCAL work_mem = '5MB'")
            cur.execute("SELECT current_setting('work_mem')")
            self.assertEqual(cur.fetchone(), ("5MB",))
        conn.rollback()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            self.assertEqual(cur.fetchone(), (1,))
        conn.autocommit = False
        conn.commit()

    def test_compat_classes_take_connect_keywords(self):
        # connect_timeout is libpq's here, as for psycopg2.connect, which
        # takes it as a string too; the pool's own option takes a number.
        # The pool's connect_kwargs option adds to the keywords.
        params = psycopg2.extensions.parse_dsn(self.layer.dsn)
        pool = self._makeCompat(
            zpgpool.ThreadedConnectionPool, 0, 2, connect_timeout="7",
            connect_kwargs={"options": "-c work_mem=3MB"}, name=self.name,
            **params)
        conn = pool.getconn()
        dsn_params = conn.get_dsn_parameters()
        self.assertEqual(dsn_params["connect_timeout"], "7")
        with conn.cursor() as cur:
            cur.execute("SHOW work_mem")
            self.assertEqual(cur.fetchone(), ("3MB",))
        self.assertEqual(dsn_params["application_name"], self.app_name)
        self.assertWorks(conn)
        pool.putconn(conn)

    def test_compat_takes_one_positional_dsn_at_most(self):
        with self.assertRaises(TypeError) as cm:
            zpgpool.SimpleConnectionPool(0, 1, self.layer.dsn, "extra")
        self.assertIn("at most one positional", str(cm.exception))

    def test_compat_pools_fail_fast_when_exhausted(self):
        for cls in (zpgpool.SimpleConnectionPool,
                    zpgpool.ThreadedConnectionPool):
            pool = self._makeCompat(cls, 0, 1, self.layer.dsn, name=self.name)
            self.assertEqual(pool.timeout, 0)
            conn = pool.getconn()
            with self.assertRaises(psycopg2.pool.PoolError) as cm:
                pool.getconn()
            self.assertIsInstance(cm.exception, PoolTimeout)
            self.assertIn("connection pool exhausted", str(cm.exception))
            self.assertIn(repr(self.name), str(cm.exception))
            pool.putconn(conn)
            self.assertIs(pool.getconn(), conn)
            pool.putconn(conn)

    def test_compat_pool_serves_at_once_while_warming(self):
        # psycopg2 connects minconn in the constructor; ours warms them in
        # the background, and a getconn() meanwhile must not find the pool
        # "exhausted" because the warming connection holds the last place.
        for _ in range(5):
            pool = self._makeCompat(zpgpool.SimpleConnectionPool, 1, 1,
                                    self.layer.dsn, name=self.name)
            conn = pool.getconn()
            self.assertWorks(conn)
            pool.putconn(conn)
            pool.closeall()

    def test_timeout_zero_waits_for_the_connection_being_warmed(self):
        pool = self._makeOne(minconn=2, maxconn=2, timeout=0)
        pool.open()
        conns = [pool.getconn(), pool.getconn()]
        for conn in conns:
            self.assertWorks(conn)
        with self.assertRaises(PoolTimeout):
            pool.getconn()
        self.assertEqual(pool.stats()["connections_opened"], 2)

    def test_compat_pool_may_wait_when_given_a_timeout(self):
        pool = self._makeCompat(zpgpool.ThreadedConnectionPool, 0, 1,
                                self.layer.dsn, timeout=WAIT)
        conn = pool.getconn()
        waiter = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
        pool.putconn(conn)
        self.assertIs(waiter.finish(self), conn)
        pool.putconn(conn)

    def test_compat_pool_warms_minconn(self):
        pool = self._makeCompat(zpgpool.SimpleConnectionPool, 2, 4,
                                self.layer.dsn, name=self.name)
        wait_for(lambda: pool.stats()["idle"] == 2, "two warm connections")
        self.assertEqual(len(self.backends()), 2)

    def test_attributes(self):
        pool = self._makeOne(minconn=2, maxconn=5)
        self.assertEqual((pool.minconn, pool.maxconn), (2, 5))
        self.assertFalse(pool.closed)
        pool.closeall()
        self.assertTrue(pool.closed)

    def test_keyed_getconn_returns_the_same_connection(self):
        pool = self._makeOne(maxconn=3)
        a = pool.getconn("a")
        self.assertIs(pool.getconn("a"), a)
        b = pool.getconn("b")
        self.assertIsNot(a, b)
        self.assertEqual(pool.stats()["in_use"], 2)
        pool.putconn(a, key="a")
        # The key is free again: a new getconn("a") takes a connection anew.
        self.assertEqual(pool.stats()["in_use"], 1)
        a2 = pool.getconn("a")
        self.assertEqual(pool.stats()["in_use"], 2)
        pool.putconn(key="a")
        pool.putconn(b)   # without the key: the pool knows it
        self.assertEqual(pool.stats()["in_use"], 0)
        self.assertIn(a2, (a, b))

    def test_key_zero_and_other_falsy_keys(self):
        # psycopg2#348: key 0 broke putconn.
        pool = self._makeOne(maxconn=3)
        for key in (0, "", False):
            conn = pool.getconn(key)
            self.assertIs(pool.getconn(key), conn)
            pool.putconn(conn, key=key)
            self.assertEqual(pool.stats()["in_use"], 0)

    def test_keyed_getconn_from_two_threads(self):
        pool = self._makeOne(maxconn=3)
        mine = pool.getconn("shared")
        other = start(self, pool.getconn, "shared").finish(self)
        self.assertIs(other, mine)
        pool.putconn(mine, "shared")

    def test_two_threads_taking_a_free_key_at_once(self):
        # Both find the key free and open a connection (the barrier holds
        # each connect until the other's has begun); the second to finish
        # keeps the first one's and gives its own back.
        both_connecting = threading.Barrier(2)
        pool = self._makeOne(maxconn=3,
                             configure=lambda conn: both_connecting.wait(WAIT))
        takers = [start(self, pool.getconn, "k") for _ in range(2)]
        first, second = [taker.finish(self) for taker in takers]
        self.assertIs(first, second)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["in_use"], stats["idle"]),
                         (2, 1, 1))
        pool.putconn(first, key="k")
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_putconn_with_the_wrong_key(self):
        pool = self._makeOne(maxconn=3)
        a = pool.getconn("a")
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(a, key="b")
        self.assertIn("not held under key 'b'", str(cm.exception))
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(key="nobody")
        self.assertIn("no connection is held under key 'nobody'",
                      str(cm.exception))
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn()
        self.assertIn("needs a connection or a key", str(cm.exception))
        # Still out under "a", and the pool still serves.
        self.assertIs(pool.getconn("a"), a)
        pool.putconn(a, key="a")
        self.assertWorks(pool.getconn())

    def test_keyed_getconn_of_a_held_key_takes_no_place(self):
        # The only place is held under "a": asking for "a" again must not
        # need a second one.
        pool = self._makeOne(maxconn=1, timeout=0)
        a = pool.getconn("a")
        self.assertIs(pool.getconn("a"), a)
        self.assertEqual(pool.stats()["timeouts"], 0)
        self.assertEqual(pool.stats()["connections_opened"], 1)
        pool.putconn(a, key="a")

    def test_closed_pool_refuses_a_key_it_still_remembers(self):
        pool = self._makeOne(maxconn=2)
        conn = pool.getconn("k")
        pool.close(timeout=0)      # "k" is still out, and remembered
        with self.assertRaises(PoolClosed) as cm:
            pool.getconn("k")
        self.assertIn("%r is closed" % self.name, str(cm.exception))
        pool.putconn(conn, key="k")
        self.assertTrue(conn.closed)

    def test_keyed_getconn_after_closeall(self):
        pool = self._makeOne(maxconn=2)
        conn = pool.getconn("k")
        pool.closeall()
        self.assertTrue(conn.closed)
        with self.assertRaises(PoolClosed):
            pool.getconn("k")
        with self.assertRaises(PoolClosed):
            pool.getconn()


# -- construction: lazy, checked at once --------------------------------------

class LazyTests(PoolTestBase):

    def test_constructing_connects_to_nothing(self):
        threads = threading.active_count()
        pool = self._makeOne(minconn=3)
        self.assertEqual(self.backends(), set())
        self.assertEqual(threading.active_count(), threads)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["connections_opened"]), (0, 0))

    def test_constructing_against_a_closed_port(self):
        dsn = with_params(self.layer.dsn, port=closed_port())
        pool = self._makeOne(dsn, minconn=1)
        self.assertEqual(pool.stats()["connections_failed"], 0)
        with self.assertRaises(ConnectError) as cm:
            pool.getconn()
        self.assertIsInstance(cm.exception, psycopg2.OperationalError)
        self.assertIn("cannot connect", str(cm.exception))
        stats = pool.stats()
        self.assertGreaterEqual(stats["connections_failed"], 1)
        self.assertEqual((stats["size"], stats["in_use"]), (0, 0))
        self.assertTrue(stats["last_connect_error"])

    def test_open_warms_minconn_in_the_background(self):
        pool = self._makeOne(minconn=3, maxconn=5)
        pool.open()
        wait_for(lambda: len(self.backends()) == 3, "three backends")
        stats = wait_for(lambda: (lambda s: s if s["idle"] == 3 else None)(
            pool.stats()), "three idle connections")
        self.assertEqual((stats["size"], stats["in_use"]), (3, 0))
        self.assertEqual(stats["connections_opened"], 3)

    def test_open_wait(self):
        pool = self._makeOne(minconn=2, maxconn=5)
        pool.open(wait=True, timeout=WAIT)
        self.assertEqual(pool.stats()["size"], 2)
        self.assertEqual(len(self.backends()), 2)
        pool.open(wait=True)   # again: nothing more to do
        self.assertEqual(pool.stats()["connections_opened"], 2)

    def test_open_wait_gives_up_and_says_why(self):
        dsn = with_params(self.layer.dsn, port=closed_port())
        pool = self._makeOne(dsn, minconn=1, reconnect_max_delay=0.1)
        with self.assertRaises(PoolTimeout) as cm:
            pool.open(wait=True, timeout=0.3)
        msg = str(cm.exception)
        self.assertIn("could not open 1 connections", msg)
        self.assertIn("last connect error", msg)
        self.assertIn(repr(self.name), msg)


# -- checkout and return ------------------------------------------------------

class ReturnTests(PoolTestBase):

    def test_idle_connection_is_kept(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pid = server_pid(conn)
        conn.commit()
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        self.assertEqual(server_pid(again), pid)
        stats = pool.stats()
        self.assertEqual(stats["connections_opened"], 1)
        self.assertEqual(stats["returned_bad"], 0)
        pool.putconn(again)

    def test_connection_closed_by_its_caller_is_just_dropped(self):
        pool = self._makeOne(minconn=0, maxconn=4)
        conns = [pool.getconn() for _ in range(4)]
        for conn in conns[1:]:
            pool.putconn(conn)
        conns[0].close()            # closed == 1: closed on purpose
        pool.putconn(conns[0])
        stats = pool.stats()
        # The other three are kept: a caller's close() is no sign that
        # the server went away, so nothing older is retired.
        self.assertEqual(stats["size"], 3)
        self.assertEqual(stats["idle"], 3)
        self.assertEqual(stats["connections_lost"], 0)
        self.assertEqual(stats["connections_discarded"], 1)
        again = pool.getconn()
        self.assertIn(again, conns[1:])
        pool.putconn(again)

    def test_returned_session_characteristics_are_restored(self):
        table = self.make_table()
        pool = self._makeOne(maxconn=1, isolation_level="REPEATABLE READ")
        conn = pool.getconn()
        conn.set_session(readonly=True, isolation_level="SERIALIZABLE",
                         deferrable=True)
        conn.cursor().execute("SELECT 1")
        conn.rollback()
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        cur = again.cursor()
        cur.execute("SELECT current_setting('transaction_isolation'), "
                    "current_setting('transaction_read_only'), "
                    "current_setting('transaction_deferrable')")
        self.assertEqual(cur.fetchone(), ("repeatable read", "off", "off"))
        cur.execute("INSERT INTO %s VALUES (1)" % table)   # not read-only
        again.rollback()
        # Each characteristic alone is noticed and undone.
        again.readonly = True
        pool.putconn(again)
        third = pool.getconn()
        self.assertFalse(third.readonly)
        third.autocommit = True
        pool.putconn(third)
        third = pool.getconn()
        self.assertFalse(third.autocommit)
        self.assertEqual(third.isolation_level,
                         psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        # psycopg2's older call, too.
        third.set_isolation_level(
            psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
        pool.putconn(third)
        fourth = pool.getconn()
        self.assertIs(fourth, conn)
        self.assertEqual(fourth.isolation_level,
                         psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        pool.putconn(fourth)

    def test_returned_cursor_factory_is_restored(self):
        from psycopg2.extras import DictCursor
        from psycopg2.extras import RealDictCursor
        pool = self._makeOne(maxconn=1)
        conn = pool.getconn()
        conn.cursor_factory = RealDictCursor
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        self.assertIsNone(again.cursor_factory)
        with again.cursor() as cur:
            cur.execute("SELECT 1 AS one")
            self.assertEqual(cur.fetchone(), (1,))
        again.rollback()
        pool.putconn(again)
        # The pool's own cursor_factory is what comes back, and so is one
        # that configure chose: both are the connection's from the start.
        for number, option in enumerate((
                {"connect_kwargs": {"cursor_factory": DictCursor}},
                {"configure": _use_dict_cursors})):
            pool = self._makeOne(name="%s-%d" % (self.name, number),
                                 maxconn=1, **option)
            conn = pool.getconn()
            self.assertIs(conn.cursor_factory, DictCursor)
            conn.cursor_factory = None
            pool.putconn(conn)
            again = pool.getconn()
            self.assertIs(again, conn)
            self.assertIs(again.cursor_factory, DictCursor, option)
            pool.putconn(again)

    def test_borrower_s_notices_and_notifications_are_dropped(self):
        pool = self._makeOne(maxconn=1)
        conn = pool.getconn()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("LISTEN zpgpool_test_channel")
            cur.execute("NOTIFY zpgpool_test_channel, 'for the first'")
            cur.execute("DO $$BEGIN RAISE NOTICE 'private'; END$$")
            cur.execute("UNLISTEN *")
        conn.autocommit = False
        self.assertEqual(len(conn.notifies), 1)
        self.assertIn("private", conn.notices[-1])
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        self.assertEqual((again.notices, again.notifies), ([], []))
        # Also when nothing else sends it down the slow return.
        with again.cursor() as cur:
            cur.execute("DO $$BEGIN RAISE NOTICE 'private too'; END$$")
        again.commit()
        pool.putconn(again)
        third = pool.getconn()
        self.assertIs(third, conn)
        self.assertEqual(third.notices, [])
        pool.putconn(third)

    def test_in_transaction_is_rolled_back(self):
        table = self.make_table()
        pool = self._makeOne()
        conn = pool.getconn()
        conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_INTRANS)
        pool.putconn(conn)
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_IDLE)
        self.assertEqual(self.rows(table), [])
        again = pool.getconn()
        self.assertIs(again, conn)
        # Nothing of the earlier work is committed by the next user.
        again.commit()
        self.assertEqual(self.rows(table), [])
        self.assertEqual(pool.stats()["returned_bad"], 1)
        pool.putconn(again)

    def test_in_error_is_rolled_back(self):
        pool = self._makeOne()
        conn = pool.getconn()
        with self.assertRaises(psycopg2.errors.UndefinedTable):
            conn.cursor().execute("SELECT * FROM no_such_table")
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_INERROR)
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        self.assertWorks(again)
        self.assertEqual(pool.stats()["returned_bad"], 1)
        pool.putconn(again)

    def test_closed_connection_is_discarded_and_replaced(self):
        pool = self._makeOne()
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["idle"], stats["in_use"]),
                         (0, 0, 0))
        self.assertEqual(stats["connections_discarded"], 1)
        again = pool.getconn()
        self.assertIsNot(again, conn)
        self.assertWorks(again)
        pool.putconn(again)

    def test_broken_connection_is_discarded(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pid = server_pid(conn)
        conn.commit()
        query(self.layer.dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        with self.assertRaises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        self.assertTrue(zpgpool.pool.is_disconnect(None, conn))
        pool.putconn(conn)
        stats = pool.stats()
        self.assertEqual(stats["connections_lost"], 1)
        self.assertEqual(stats["size"], 0)
        again = pool.getconn()
        self.assertNotEqual(server_pid(again), pid)
        pool.putconn(again)

    def test_failed_rollback_discards(self):
        # In a transaction, and its backend gone without the client knowing
        # yet: the rollback at return fails, so the connection is dropped.
        pool = self._makeOne(minconn=0)
        conn = pool.getconn()
        pid = server_pid(conn)
        query(self.layer.dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: pid not in {r[0] for r in query(
            self.layer.dsn, "SELECT pid FROM pg_stat_activity")},
            "the backend to go")
        self.assertEqual(conn.closed, 0)
        pool.putconn(conn)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["connections_lost"],
                          stats["returned_bad"]), (0, 1, 1))
        with pool.checkout() as again:
            self.assertNotEqual(server_pid(again), pid)

    def test_returned_to_a_closed_pool_in_a_transaction(self):
        table = self.make_table()
        pool = self._makeOne()
        conn = pool.getconn()
        conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
        pool.close(timeout=0)
        self.assertFalse(conn.closed)
        pool.putconn(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(self.rows(table), [])

    def test_close_true_discards(self):
        pool = self._makeOne(minconn=0)
        conn = pool.getconn()
        pool.putconn(conn, close=True)
        self.assertTrue(conn.closed)
        self.assertEqual(pool.stats()["size"], 0)
        wait_for(lambda: not self.backends(), "the backend to go")

    def test_discarded_below_minconn_is_refilled(self):
        pool = self._makeOne(minconn=1)
        conn = pool.getconn()
        pid = server_pid(conn)
        pool.putconn(conn, close=True)
        # The discard wakes the maintainer at once; a pool that refills
        # only at a later round, or never, misses this bound by far.
        new = wait_for(lambda: (self.backends() - {pid}), "a new backend",
                       timeout=5)
        wait_for(lambda: pool.stats()["idle"] == 1, "an idle connection",
                 timeout=5)
        with pool.checkout() as again:
            self.assertEqual({server_pid(again)}, new)

    def test_autocommit_is_reset(self):
        pool = self._makeOne()
        conn = pool.getconn()
        conn.autocommit = True
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        self.assertFalse(again.autocommit)
        pool.putconn(again)

    def test_returned_connection_goes_to_the_next_caller_lifo(self):
        pool = self._makeOne(maxconn=3)
        a, b = pool.getconn(), pool.getconn()
        pool.putconn(a)
        pool.putconn(b)
        # The most recently used comes first: the others can age out.
        self.assertIs(pool.getconn(), b)


class CheckoutTests(PoolTestBase):

    def test_commits_on_success(self):
        table = self.make_table()
        pool = self._makeOne()
        with pool.checkout() as conn:
            conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
        self.assertEqual(self.rows(table), [1])
        self.assertEqual(pool.stats()["in_use"], 0)
        self.assertEqual(pool.stats()["idle"], 1)

    def test_rolls_back_on_exception(self):
        table = self.make_table()
        pool = self._makeOne()
        with self.assertRaises(ZeroDivisionError):
            with pool.checkout() as conn:
                conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
                1 / 0
        self.assertEqual(self.rows(table), [])
        stats = pool.stats()
        self.assertEqual((stats["in_use"], stats["idle"]), (0, 1))
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_IDLE)

    def test_swallowed_error_is_not_reported_as_committed(self):
        # PostgreSQL answers COMMIT of an aborted transaction with a
        # ROLLBACK, and psycopg2 raises nothing: the block's writes would
        # be lost silently.
        table = self.make_table()
        pool = self._makeOne()
        with self.assertRaises(PoolError) as cm:
            with pool.checkout() as conn:
                conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
                try:
                    conn.cursor().execute("SELECT * FROM no_such_table")
                except psycopg2.errors.UndefinedTable:
                    pass
        self.assertIn("cannot commit the checkout() block", str(cm.exception))
        self.assertIn(repr(self.name), str(cm.exception))
        self.assertEqual(self.rows(table), [])
        stats = pool.stats()
        self.assertEqual((stats["in_use"], stats["idle"]), (0, 1))
        with pool.checkout() as again:
            self.assertIs(again, conn)
            self.assertWorks(again)

    def test_block_closing_the_connection(self):
        pool = self._makeOne(minconn=0)
        with pool.checkout() as conn:
            conn.close()
        self.assertEqual(pool.stats()["size"], 0)
        with pool.checkout() as again:
            self.assertWorks(again)

    def test_failing_commit_propagates_and_returns(self):
        table = self.make_table()
        query(self.layer.dsn, "ALTER TABLE %s ADD CONSTRAINT u_%s UNIQUE (v)"
              " DEFERRABLE INITIALLY DEFERRED" % (table, self.name))
        pool = self._makeOne()
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            with pool.checkout() as conn:
                conn.cursor().execute("INSERT INTO %s VALUES (1), (1)"
                                      % table)
        self.assertEqual(self.rows(table), [])
        self.assertEqual(pool.stats()["in_use"], 0)
        with pool.checkout() as again:
            self.assertIs(again, conn)
            self.assertWorks(again)

    def test_timeout(self):
        pool = self._makeOne(maxconn=1)
        held = pool.getconn()
        with self.assertRaises(PoolTimeout):
            with pool.checkout(timeout=0.05):
                self.fail("got a connection")  # pragma: no cover
        pool.putconn(held)
        with pool.checkout(timeout=0.05) as conn:
            self.assertIs(conn, held)

    def test_getconn_timeout_overrides_the_pools(self):
        pool = self._makeOne(maxconn=1, timeout=WAIT)
        held = pool.getconn()
        with self.assertRaises(PoolTimeout) as cm:
            pool.getconn(timeout=0.05)
        # Given up after its own 0.05 s, not the pool's WAIT.
        waited = float(re.search(r"within ([0-9.e+-]+) s",
                                 str(cm.exception)).group(1))
        self.assertLess(waited, WAIT / 2)
        pool.putconn(held)
        self.assertIs(pool.getconn(timeout=0.05), held)
        pool.putconn(held)

    def test_idle_block_returns_connection_as_it_was(self):
        pool = self._makeOne()
        with pool.checkout() as conn:
            pass
        self.assertEqual(pool.stats()["idle"], 1)
        self.assertFalse(conn.closed)


# -- waiting when exhausted ---------------------------------------------------

class WaitingTests(PoolTestBase):

    def test_timeout_message(self):
        pool = self._makeOne(maxconn=2, timeout=WAIT)
        a, b = pool.getconn(), pool.getconn()
        other = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
        with self.assertRaises(PoolTimeout) as cm:
            pool.checkout(timeout=0.2).__enter__()
        msg = str(cm.exception)
        self.assertIn(repr(self.name), msg)
        self.assertIn("connection pool exhausted", msg)
        self.assertIn("maxconn=2", msg)
        self.assertIn("in use=2", msg)
        self.assertIn("waiting=1", msg)
        waited = float(re.search(r"within ([0-9.e+-]+) s", msg).group(1))
        self.assertGreater(waited, 0)
        stats = pool.stats()
        self.assertEqual(stats["timeouts"], 1)
        self.assertEqual(stats["waits"], 2)
        pool.putconn(a)
        self.assertIs(other.finish(self), a)
        pool.putconn(a)
        pool.putconn(b)
        self.assertGreater(pool.stats()["wait_time"], 0)

    def test_an_interrupted_wait_leaves_no_waiter_behind(self):
        import signal

        class Interrupted(Exception):
            pass

        def interrupt(signum, frame):
            raise Interrupted()
        pool = self._makeOne(maxconn=1, timeout=WAIT)
        held = pool.getconn()
        previous = signal.signal(signal.SIGALRM, interrupt)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        # As Ctrl-C would, in the main thread, while it waits.
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with self.assertRaises(Interrupted):
            pool.getconn()
        self.assertEqual(pool.stats()["waiting"], 0)
        # The connection that comes back goes to the idle stack, not to
        # the caller that left.
        pool.putconn(held)
        self.assertIs(pool.getconn(timeout=0), held)
        pool.putconn(held)
        self.assertEqual(pool.stats()["in_use"], 0)

    def _interrupt_waiting_caller(self, action):
        """Arrange for ``action`` to run in this thread in 0.2 s, while it
        waits, followed by an exception, as Ctrl-C would raise there;
        return the exception's class."""
        class Interrupted(Exception):
            pass

        def interrupt(signum, frame):
            action()
            raise Interrupted()
        previous = signal.signal(signal.SIGALRM, interrupt)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        return Interrupted

    def test_a_wait_interrupted_after_the_hand_over(self):
        # The connection reaches the waiter, and the interrupt comes before
        # the waiter took it: it goes on to the idle stack, and nothing
        # counts it as in use.
        pool = self._makeOne(maxconn=1, timeout=WAIT)
        held = pool.getconn()
        with self.assertRaises(self._interrupt_waiting_caller(
                lambda: pool.putconn(held))):
            pool.getconn()
        stats = pool.stats()
        self.assertEqual((stats["in_use"], stats["idle"], stats["waiting"]),
                         (0, 1, 0))
        self.assertIs(pool.getconn(timeout=0), held)
        pool.putconn(held)

    def test_a_wait_interrupted_after_a_place_came_free(self):
        # A discarded connection frees a place for the first waiter, which
        # is interrupted before it could connect: the place goes on to the
        # next waiter, who would otherwise wait out its time-out (no
        # minconn: the maintainer does not fill the place instead).
        pool = self._makeOne(minconn=0, maxconn=1, timeout=WAIT)
        held = pool.getconn()

        def second_waiter():
            wait_for(lambda: pool.stats()["waiting"] == 1, "the first")
            return pool.getconn()
        second = start(self, second_waiter)

        def discard_held():
            wait_for(lambda: pool.stats()["waiting"] == 2, "two waiters")
            pool.putconn(held, close=True)
        with self.assertRaises(self._interrupt_waiting_caller(discard_held)):
            pool.getconn()
        conn = second.finish(self)
        self.assertWorks(conn)
        pool.putconn(conn)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["in_use"], stats["waiting"]),
                         (1, 0, 0))

    def test_timeout_zero_fails_at_once(self):
        pool = self._makeOne(maxconn=1, timeout=0)
        conn = pool.getconn()
        with self.assertRaises(PoolTimeout):
            pool.getconn()
        pool.putconn(conn)
        self.assertIs(pool.getconn(), conn)

    def test_many_more_threads_than_maxconn(self):
        pool = self._makeOne(minconn=0, maxconn=3, timeout=WAIT)
        held = [pool.getconn() for i in range(3)]
        n_threads, rounds = 30, 5

        def work(i):
            for _ in range(rounds):
                with pool.checkout() as conn:
                    with conn.cursor() as cur:
                        cur.execute("SELECT %s", (i,))
                        assert cur.fetchone() == (i,)
            return i
        workers = [start(self, work, i) for i in range(n_threads)]
        # Everybody has to wait at least once: all connections are held.
        wait_for(lambda: pool.stats()["waiting"] == n_threads,
                 "all threads waiting")
        for conn in held:
            pool.putconn(conn)
        results = [w.finish(self) for w in workers]
        self.assertEqual(results, list(range(n_threads)))
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 0)
        self.assertEqual(stats["waiting"], 0)
        self.assertEqual(stats["timeouts"], 0)
        self.assertLessEqual(stats["connections_opened"], 3)
        self.assertEqual(stats["checkouts"], 3 + n_threads * rounds)
        self.assertGreaterEqual(stats["waits"], n_threads)
        self.assertLessEqual(len(self.backends()), 3)

    def test_fifo_order(self):
        pool = self._makeOne(minconn=0, maxconn=1, timeout=WAIT)
        held = pool.getconn()
        served = []

        def work(i):
            conn = pool.getconn()
            served.append(i)
            pool.putconn(conn)
        workers = []
        for i in range(10):
            workers.append(start(self, work, i))
            # Make the arrival order certain before the next one comes.
            wait_for(lambda: pool.stats()["waiting"] == i + 1,
                     "thread %d waiting" % i)
        pool.putconn(held)
        for w in workers:
            w.finish(self)
        self.assertEqual(served, list(range(10)))

    def test_waiter_gets_a_place_when_a_connection_is_discarded(self):
        pool = self._makeOne(maxconn=1, timeout=WAIT)
        conn = pool.getconn()
        waiter = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
        pool.putconn(conn, close=True)
        got = waiter.finish(self)
        self.assertIsNot(got, conn)
        self.assertWorks(got)
        pool.putconn(got)


# -- health -------------------------------------------------------------------

def last_query(dsn, pid):
    return query(dsn, "SELECT query FROM pg_stat_activity WHERE pid = %s",
                 (pid,))[0][0]


class HealthTests(PoolTestBase):

    layer = PRIVATE_POSTGRES_LAYER

    def mark(self, conn):
        """Leave a recognisable last statement on ``conn``'s backend."""
        conn.rollback()
        conn.autocommit = True
        conn.cursor().execute("SELECT 'marker'")
        conn.autocommit = False

    def test_idle_connection_is_pinged(self):
        pool = self._makeOne(health_check_after=0.05)
        conn = pool.getconn()
        pid = server_pid(conn)
        self.mark(conn)
        pool.putconn(conn)
        time.sleep(0.1)
        self.assertIs(pool.getconn(), conn)
        self.assertEqual(last_query(self.layer.dsn, pid), "SELECT 1")
        # The ping left no transaction open and autocommit off.
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_IDLE)
        self.assertFalse(conn.autocommit)
        pool.putconn(conn)

    def test_no_ping_when_disabled(self):
        pool = self._makeOne(health_check_after=None)
        conn = pool.getconn()
        pid = server_pid(conn)
        self.mark(conn)
        pool.putconn(conn)
        time.sleep(0.05)
        self.assertIs(pool.getconn(), conn)
        self.assertIn("marker", last_query(self.layer.dsn, pid))
        pool.putconn(conn)

    def test_ping_leaves_session_characteristics_alone(self):
        # Behind pgbouncer in transaction mode, session state set outside
        # a transaction stays on a server connection that another client
        # gets next. The ping may only reset (psycopg2 sends "SET
        # default_transaction_* TO DEFAULT" when autocommit goes off), and
        # the pool's characteristics must still come with the next BEGIN.
        dsn = self.layer.new_database()
        dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
        query(self.layer.dsn, "ALTER DATABASE %s SET log_statement = 'all'"
              % dbname)
        for options, begin in (
                ({"readonly": True}, "BEGIN READ ONLY"),
                ({"isolation_level": "SERIALIZABLE", "deferrable": True},
                 "BEGIN ISOLATION LEVEL SERIALIZABLE DEFERRABLE"),
                ({}, "BEGIN")):
            with open(self.layer.server.log_file) as log:
                log.seek(0, os.SEEK_END)
                pool = self._makeOne(dsn, health_check_after=0,
                                     name=unique_name(), **options)
                conn = pool.getconn()
                conn.rollback()
                pool.putconn(conn)
                self.assertIs(pool.getconn(), conn)    # pinged
                with conn.cursor() as cur:
                    cur.execute("SELECT 'after the ping'")
                    cur.execute("SHOW default_transaction_read_only")
                    self.assertEqual(cur.fetchone(), ("off",))
                conn.rollback()
                pool.putconn(conn)
                text = wait_for(lambda: (lambda t: t if "after the ping" in t
                                         else None)(log.read()), "the log")
            statements = re.findall(r"statement: (.*)", text)
            ping = statements.index("SELECT 1")
            for statement in statements:
                if statement.startswith("SET "):
                    self.assertTrue(statement.endswith(" TO DEFAULT"),
                                    statement)
            self.assertEqual(statements[statements.index(
                "SELECT 'after the ping'", ping) - 1], begin)

    def test_terminated_backends_are_replaced_silently(self):
        pool = self._makeOne(minconn=3, maxconn=5, health_check_after=0)
        pool.open(wait=True, timeout=WAIT)
        old = wait_for(lambda: (lambda p: p if len(p) == 3 else None)(
            self.backends()), "three backends")
        query(self.layer.dsn, "SELECT pg_terminate_backend(pid) FROM "
              "pg_stat_activity WHERE application_name = %s",
              (self.app_name,))
        wait_for(lambda: not (self.backends() & old), "backends to go")
        conns = [pool.getconn() for _ in range(3)]
        for conn in conns:
            self.assertWorks(conn)
            self.assertNotIn(server_pid(conn), old)
        stats = pool.stats()
        self.assertGreaterEqual(stats["connections_lost"], 1)
        self.assertEqual(stats["connections_discarded"], 3)
        for conn in conns:
            pool.putconn(conn)

    def test_terminated_checked_out_connection(self):
        pool = self._makeOne(maxconn=2)
        conn = pool.getconn()
        pid = server_pid(conn)
        conn.rollback()
        query(self.layer.dsn, "SELECT pg_terminate_backend(%s)", (pid,))
        with self.assertRaises(psycopg2.OperationalError) as cm:
            conn.cursor().execute("SELECT 1")
        self.assertTrue(zpgpool.pool.is_disconnect(cm.exception, conn))
        pool.putconn(conn)
        with pool.checkout() as again:
            self.assertWorks(again)

    def test_an_older_loss_found_later_keeps_the_watermark(self):
        # Three connections out when their sessions die. The newest is
        # found dead first: the two opened before it are retired when they
        # come back. Finding the oldest dead afterwards must not lower that
        # mark, or the middle one, unused since, would be kept and handed
        # out dead (no ping: it was used just now, as far as the pool knows).
        pool = self._makeOne(maxconn=3)
        oldest, middle, newest = [pool.getconn() for _ in range(3)]
        terminate(self.layer.dsn, oldest, middle, newest)
        for conn in (newest, oldest):
            with self.assertRaises(psycopg2.OperationalError):
                conn.cursor().execute("SELECT 1")
            pool.putconn(conn)
        pool.putconn(middle)
        self.assertTrue(middle.closed)
        with pool.checkout() as again:
            self.assertWorks(again)
        stats = pool.stats()
        self.assertEqual((stats["connections_lost"], stats["size"]), (2, 1))

    def test_prefer_standby_keeps_its_primary_while_no_standby_answers(self):
        # A pool that prefers standbys pings its connections (a standby
        # may have come back); while none answers, the primary it has is
        # kept, not closed and opened again at every checkout.
        pool = self._makeOne(
            dsn=with_params(self.layer.dsn,
                            target_session_attrs="prefer-standby"),
            maxconn=2, health_check_after=0)
        for _ in range(3):
            with pool.checkout() as conn:
                self.assertWorks(conn)
        stats = pool.stats()
        self.assertEqual((stats["connections_opened"],
                          stats["connections_discarded"]), (1, 0))

    def test_is_disconnect_by_sqlstate(self):
        is_disconnect = zpgpool.pool.is_disconnect
        conn = psycopg2.connect(self.layer.dsn)
        self.addCleanup(conn.close)
        with self.assertRaises(psycopg2.errors.QueryCanceled) as cm:
            conn.cursor().execute(
                "SET LOCAL statement_timeout = 1; SELECT pg_sleep(1)")
        # A failed statement on a live connection is not a disconnect.
        self.assertFalse(is_disconnect(cm.exception, conn))
        conn.rollback()
        with self.assertRaises(psycopg2.Error) as cm:
            conn.cursor().execute(
                "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '57P01'; END $$")
        self.assertTrue(is_disconnect(cm.exception))
        with self.assertRaises(psycopg2.Error) as cm:
            conn.cursor().execute("SELECT 1")   # in error
        self.assertFalse(is_disconnect(cm.exception))
        conn.rollback()
        with self.assertRaises(psycopg2.Error) as cm:
            conn.cursor().execute(
                "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '08006'; END $$")
        self.assertTrue(is_disconnect(cm.exception))
        # A failed connect (no connection, no SQLSTATE).
        with self.assertRaises(psycopg2.OperationalError) as cm:
            psycopg2.connect(with_params(self.layer.dsn, port=closed_port()))
        self.assertTrue(is_disconnect(cm.exception))


class ServerRestartTests(PoolTestBase):

    layer = PRIVATE_POSTGRES_LAYER

    def _restart_with_idle_connections(self, mode):
        server = self.layer.server
        pool = self._makeOne(minconn=1, maxconn=5, health_check_after=0)
        conns = [pool.getconn() for _ in range(3)]
        old = {server_pid(c) for c in conns}
        for conn in conns:
            conn.rollback()
            pool.putconn(conn)
        server.restart(mode)
        got = [pool.getconn() for _ in range(3)]
        for conn in got:
            self.assertWorks(conn)
            self.assertNotIn(server_pid(conn), old)
            self.assertNotIn(conn, conns)
        stats = pool.stats()
        # The first dead one was found by its ping; the two opened before
        # it were retired with it, unpinged.
        self.assertEqual(stats["connections_lost"], 1)
        self.assertEqual(stats["connections_discarded"], 3)
        for conn in got:
            pool.putconn(conn)

    def test_fast_restart(self):
        self._restart_with_idle_connections("fast")

    def test_immediate_restart(self):
        self._restart_with_idle_connections("immediate")

    def test_restart_while_checked_out(self):
        server = self.layer.server
        pool = self._makeOne(minconn=0, maxconn=3)
        idle = pool.getconn()
        conn = pool.getconn()
        pool.putconn(idle)
        server.restart("fast")
        # The holder's session is gone: that one error is its to see.
        with self.assertRaises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        pool.putconn(conn)
        # The idle one, opened before it, was retired with it.
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["connections_lost"]), (0, 1))
        with pool.checkout() as again:
            self.assertWorks(again)

    def test_reconnects_with_backoff_and_recovers_by_itself(self):
        server = self.layer.server
        log = self.log
        # timeout=1: a caller waits through an outage up to its time-out.
        pool = self._makeOne(minconn=2, maxconn=4, health_check_after=0,
                             reconnect_max_delay=0.2, connect_timeout=2,
                             timeout=1)
        pool.open(wait=True, timeout=WAIT)
        server.stop("fast")
        with self.assertRaises(ConnectError) as cm:
            pool.getconn()
        self.assertIn("cannot connect", str(cm.exception))
        # The maintenance thread keeps trying, backing off.
        wait_for(lambda: pool.stats()["connections_failed"] >= 4,
                 "several reconnect attempts")
        stats = pool.stats()
        self.assertTrue(stats["last_connect_error"])
        self.assertEqual(stats["in_use"], 0)
        self.assertTrue(any(r.levelname == "WARNING" and "cannot connect"
                            in r.getMessage() for r in log.records))
        server.start()
        # Nobody asks for a connection: the pool refills minconn itself.
        wait_for(lambda: pool.stats()["idle"] == 2, "minconn refilled")
        stats = pool.stats()
        self.assertIsNone(stats["last_connect_error"])
        with pool.checkout() as conn:
            self.assertWorks(conn)

    def test_backoff_is_not_a_busy_loop(self):
        dsn = with_params(self.layer.dsn, port=closed_port())
        pool = self._makeOne(dsn, minconn=1, reconnect_max_delay=0.5)
        pool.open()
        wait_for(lambda: pool.stats()["connections_failed"] >= 4,
                 "four failed attempts")
        # Now the delay is at its ceiling: 0.25 to 0.5 s between attempts.
        before = pool.stats()["connections_failed"]
        time.sleep(4.0)
        attempts = pool.stats()["connections_failed"] - before
        # A connect to a closed port fails in microseconds: without the
        # back-off there would be thousands of attempts, with a delay stuck
        # at its 0.1 s start some forty, and a delay that ignores
        # reconnect_max_delay (1.6 s and more by now) three at most.
        self.assertLess(attempts, 20)
        self.assertGreaterEqual(attempts, 5)


# -- lifetime and idle shrinking ----------------------------------------------

class LifetimeTests(PoolTestBase):

    def test_expired_connection_is_replaced_at_checkout(self):
        pool = self._makeOne(max_lifetime=0.2)
        conn = pool.getconn()
        pid = server_pid(conn)
        conn.rollback()
        pool.putconn(conn)
        time.sleep(0.3)
        again = pool.getconn()
        self.assertIsNot(again, conn)
        self.assertNotEqual(server_pid(again), pid)
        self.assertTrue(conn.closed)
        self.assertGreaterEqual(pool.stats()["connections_discarded"], 1)
        pool.putconn(again)

    def test_expired_connection_is_closed_when_returned(self):
        pool = self._makeOne(max_lifetime=0.1)
        conn = pool.getconn()
        time.sleep(0.2)
        pool.putconn(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(pool.stats()["size"], 0)

    def test_maintenance_replaces_expired_idle_connections(self):
        pool = self._makeOne(minconn=1, max_lifetime=0.3)
        pool.open(wait=True, timeout=WAIT)
        first = wait_for(self.backends, "a backend")
        wait_for(lambda: self.backends() and not (self.backends() & first),
                 "the connection to be replaced")
        wait_for(lambda: pool.stats()["idle"] == 1, "the new one idle")
        self.assertGreaterEqual(pool.stats()["connections_discarded"], 1)

    def test_lifetimes_have_jitter(self):
        pool = self._makeOne(minconn=0, maxconn=6, max_lifetime=100)
        conns = [pool.getconn() for _ in range(6)]
        # White box: no server can show a 10 % spread in 100 s quickly.
        lifetimes = [c._zp_expires - c._zp_created for c in conns]
        for lifetime in lifetimes:
            self.assertGreaterEqual(lifetime, 90)
            self.assertLessEqual(lifetime, 100)
        self.assertGreater(len(set(lifetimes)), 1)
        for conn in conns:
            pool.putconn(conn)

    def test_no_lifetime(self):
        pool = self._makeOne(max_lifetime=None)
        conn = pool.getconn()
        self.assertEqual(conn._zp_expires, float("inf"))
        pool.putconn(conn)
        self.assertIs(pool.getconn(), conn)

    def test_idle_connections_shrink_to_minconn(self):
        pool = self._makeOne(minconn=1, maxconn=4, max_idle=0.2)
        conns = [pool.getconn() for _ in range(4)]
        self.assertEqual(len(self.backends()), 4)
        for conn in conns:
            pool.putconn(conn)
        wait_for(lambda: pool.stats()["size"] == 1, "shrinking to minconn")
        time.sleep(1.2)   # another maintenance round leaves minconn alone
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["idle"]), (1, 1))
        self.assertEqual(stats["connections_discarded"], 3)
        wait_for(lambda: len(self.backends()) == 1, "one backend left")
        self.assertEqual(sum(1 for c in conns if not c.closed), 1)


# -- libpq defaults -----------------------------------------------------------

class DefaultsTests(PoolTestBase):

    def test_safe_defaults(self):
        pool = self._makeOne()
        conn = pool.getconn()
        params = conn.get_dsn_parameters()
        self.assertEqual(params["application_name"], self.app_name)
        self.assertEqual(params["connect_timeout"], "10")
        self.assertEqual(params["keepalives"], "1")
        self.assertEqual(params["keepalives_idle"], "30")
        self.assertEqual(params["keepalives_interval"], "10")
        self.assertEqual(params["keepalives_count"], "3")
        self.assertEqual(self.backends(), {server_pid(conn)})
        pool.putconn(conn)

    def test_unnamed_pool(self):
        pool = ConnectionPool(self.layer.dsn)
        self.addCleanup(close_pool, self, pool)
        with pool.checkout() as conn:
            self.assertEqual(conn.get_dsn_parameters()["application_name"],
                             "zpgpool")

    def test_user_values_win(self):
        dsn = with_params(self.layer.dsn, connect_timeout=3,
                          application_name="mine", keepalives_idle=5)
        pool = self._makeOne(dsn)
        with pool.checkout() as conn:
            params = conn.get_dsn_parameters()
        self.assertEqual(params["connect_timeout"], "3")
        self.assertEqual(params["application_name"], "mine")
        self.assertEqual(params["keepalives_idle"], "5")
        self.assertEqual(params["keepalives"], "1")

    def test_options_and_connect_kwargs(self):
        pool = self._makeOne(connect_timeout=4, application_name="app",
                             connect_kwargs={"keepalives_count": 9})
        with pool.checkout() as conn:
            params = conn.get_dsn_parameters()
        self.assertEqual(params["connect_timeout"], "4")
        self.assertEqual(params["application_name"], "app")
        self.assertEqual(params["keepalives_count"], "9")

    def test_connect_timeout_zero_means_none(self):
        pool = self._makeOne(connect_timeout=0)
        with pool.checkout() as conn:
            self.assertNotIn("connect_timeout", conn.get_dsn_parameters())

    def test_connection_factory(self):
        from psycopg2.extras import LoggingConnection
        from psycopg2.extras import RealDictConnection
        from psycopg2.extras import RealDictCursor
        pool = self._makeOne(connect_kwargs={
            "connection_factory": LoggingConnection})
        with pool.checkout() as conn:
            self.assertIsInstance(conn, LoggingConnection)
            self.assertIsInstance(conn, zpgpool.pool.PooledConnection)
            log = io.StringIO()
            conn.initialize(log)
            with conn.cursor() as cur:
                cur.execute("SELECT 'logged'")
        # The factory's own cursor() is honoured: the query was logged.
        self.assertIn("SELECT 'logged'", log.getvalue())
        pool = self._makeOne(name=self.name + "a", connect_kwargs={
            "connection_factory": RealDictConnection})
        with pool.checkout() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 2 AS two")
                self.assertEqual(cur.fetchone(), {"two": 2})
        pool = self._makeOne(name=self.name + "b", connect_kwargs={
            "cursor_factory": RealDictCursor})
        with pool.checkout() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 AS one")
                self.assertEqual(cur.fetchone(), {"one": 1})

    def test_isolation_level_as_psycopg2_constant(self):
        pool = self._makeOne(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
            deferrable=True, readonly=True)
        with pool.checkout() as conn:
            with conn.cursor() as cur:
                cur.execute("SHOW transaction_isolation")
                self.assertEqual(cur.fetchone()[0], "serializable")
                cur.execute("SHOW transaction_deferrable")
                self.assertEqual(cur.fetchone()[0], "on")

    def test_session_characteristics(self):
        pool = self._makeOne(isolation_level="repeatable read",
                             readonly=True)
        with pool.checkout() as conn:
            with conn.cursor() as cur:
                cur.execute("SHOW transaction_isolation")
                self.assertEqual(cur.fetchone()[0], "repeatable read")
                cur.execute("SHOW transaction_read_only")
                self.assertEqual(cur.fetchone()[0], "on")


# -- statistics ---------------------------------------------------------------

class StatsTests(PoolTestBase):

    GAUGES = {"size", "idle", "bound_idle", "in_use", "waiting", "connecting",
              "minconn", "maxconn"}
    COUNTERS = {"checkouts", "waits", "wait_time", "timeouts",
                "connections_opened", "connections_failed",
                "connections_lost", "connections_discarded", "returned_bad"}

    def test_keys(self):
        pool = self._makeOne(minconn=0, maxconn=3)
        stats = pool.stats()
        self.assertEqual(set(stats), self.GAUGES | self.COUNTERS | {
            "outage_seconds",
            "name", "closed", "last_connect_error"})
        for key in self.COUNTERS:
            self.assertEqual(stats[key], 0, key)
        self.assertEqual(stats["name"], self.name)
        self.assertEqual((stats["minconn"], stats["maxconn"]), (0, 3))
        self.assertFalse(stats["closed"])

    def test_they_add_up(self):
        pool = self._makeOne(minconn=0, maxconn=3, timeout=0.05)
        a, b, c = (pool.getconn() for _ in range(3))
        with self.assertRaises(PoolTimeout):
            pool.getconn()
        a.cursor().execute("SELECT 1")          # in transaction
        pool.putconn(a)
        pool.putconn(b, close=True)
        stats = pool.stats()
        self.assertEqual(stats["checkouts"], 3)
        self.assertEqual((stats["waits"], stats["timeouts"]), (1, 1))
        self.assertGreater(stats["wait_time"], 0)
        self.assertEqual(stats["connections_opened"], 3)
        self.assertEqual(stats["connections_discarded"], 1)
        self.assertEqual(stats["returned_bad"], 1)
        self.assertEqual((stats["size"], stats["idle"], stats["in_use"]),
                         (2, 1, 1))
        self.assertEqual(stats["size"], stats["idle"] + stats["in_use"]
                         + stats["bound_idle"])
        self.assertEqual(stats["size"], stats["connections_opened"]
                         - stats["connections_discarded"])
        self.assertEqual(stats["connecting"], 0)
        pool.putconn(c)
        stats = pool.stats()
        self.assertEqual((stats["idle"], stats["in_use"]), (2, 0))
        pool.close()
        self.assertTrue(pool.stats()["closed"])
        self.assertEqual(pool.stats()["size"], 0)

    def test_connecting_gauge(self):
        pool = self._makeOne(minconn=0, maxconn=1)
        self.assertEqual(pool.stats()["connecting"], 0)
        with pool.checkout():
            self.assertEqual(pool.stats()["connecting"], 0)
            self.assertEqual(pool.stats()["in_use"], 1)


# -- leaks --------------------------------------------------------------------

def _leaky_worker(pool):
    """Take a connection and end without returning it."""
    return pool.getconn()


class LeakTests(PoolTestBase):

    def test_thread_dying_with_a_connection_leaks_it_and_logs(self):
        log = self.log
        pool = self._makeOne(maxconn=2, leak_threshold=0.1)
        conn = start(self, _leaky_worker, pool).finish(self)
        # Nobody gave it back: ConnectionPool.getconn does not bind to the
        # thread, so the connection stays out until someone returns it.
        self.assertEqual(pool.stats()["in_use"], 1)
        record = wait_for(lambda: next((r for r in log.records
                                        if "leak" in r.getMessage()), None),
                          "a leak warning")
        self.assertEqual(record.name, "zpgpool")
        self.assertEqual(record.levelname, "WARNING")
        msg = record.getMessage()
        self.assertIn(repr(self.name), msg)
        self.assertIn("_leaky_worker", msg)
        self.assertIn("leak threshold", msg)
        self.assertIn("return pool.getconn()", msg)
        # Warned once only.
        time.sleep(1.2)
        self.assertEqual(sum("leak" in r.getMessage() for r in log.records),
                         1)
        pool.putconn(conn)
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_each_checkout_is_warned_about_once(self):
        log = self.log
        pool = self._makeOne(maxconn=1, leak_threshold=0.1)
        for checkouts in (1, 2):
            conn = pool.getconn()
            time.sleep(0.2)             # held past the threshold
            pool._maintainer.run_once(pool)
            pool._maintainer.run_once(pool)
            self.assertEqual(sum("leak" in r.getMessage()
                                 for r in log.records), checkouts)
            pool.putconn(conn)

    def test_no_warning_without_threshold(self):
        log = self.log
        pool = self._makeOne(maxconn=2)
        conn = pool.getconn()
        pool._maintainer.run_once(pool)
        self.assertFalse(any("leak" in r.getMessage() for r in log.records))
        self.assertIsNone(conn._zp_stack)
        pool.putconn(conn)


# -- close --------------------------------------------------------------------

class CloseTests(PoolTestBase):

    def test_waiters_get_pool_closed(self):
        pool = self._makeOne(maxconn=1, timeout=WAIT)
        conn = pool.getconn()
        waiters = [start(self, pool.getconn) for _ in range(3)]
        wait_for(lambda: pool.stats()["waiting"] == 3, "three waiters")
        pool.close(timeout=0)
        # close() wakes them: a pool that left them to their 30 s timeout
        # misses this bound by far.
        for waiter in waiters:
            waiter.finish(self, timeout=5.0, expect_error=True)
            self.assertIsInstance(waiter.error, PoolClosed)
            self.assertIn("closed while waiting", str(waiter.error))
            self.assertIn(repr(self.name), str(waiter.error))
        # The connection in use is not closed under its user ...
        self.assertFalse(conn.closed)
        self.assertWorks(conn)
        # ... but when it comes back.
        pool.putconn(conn)
        self.assertTrue(conn.closed)
        self.assertEqual(pool.stats()["size"], 0)
        wait_for(lambda: not self.backends(), "no backends left")

    def test_close_waits_for_connections_in_use(self):
        pool = self._makeOne(maxconn=2)
        idle = pool.getconn()
        conn = pool.getconn()
        pool.putconn(idle)

        def give_back():
            time.sleep(0.2)
            pool.putconn(conn)
        returner = start(self, give_back)
        pool.close(timeout=WAIT)
        self.assertEqual(pool.stats()["in_use"], 0)
        self.assertTrue(idle.closed)
        self.assertTrue(conn.closed)
        returner.finish(self)

    def test_closeall_closes_connections_in_use(self):
        pool = self._makeOne(maxconn=2)
        conn = pool.getconn()
        idle = pool.getconn()
        pool.putconn(idle)
        pool.closeall()
        self.assertTrue(conn.closed)
        self.assertTrue(idle.closed)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["in_use"]), (0, 0))
        # As psycopg2: giving it back afterwards is an error.
        with self.assertRaises(PoolError) as cm:
            pool.putconn(conn)
        self.assertIn(repr(self.name), str(cm.exception))
        wait_for(lambda: not self.backends(), "no backends left")

    def test_close_waits_for_a_busy_maintainer(self):
        # Nothing of the pool's is left running behind the caller, even
        # when the maintainer is in the middle of a warm-up connect (its
        # configure callable takes a while) as the pool closes. (An idle
        # maintainer may end in time without being waited for, so only
        # a busy one shows that close() waits.)
        configuring = threading.Event()

        def slow_configure(conn):
            configuring.set()
            time.sleep(0.3)
        pool = self._makeOne(minconn=1, configure=slow_configure)
        pool.open()
        self.assertTrue(configuring.wait(WAIT))
        thread = pool._maintainer.thread
        pool.close(timeout=0)
        self.assertFalse(thread.is_alive())

    def test_use_after_close(self):
        pool = self._makeOne()
        pool.putconn(pool.getconn())
        pool.close()
        pool.close()   # twice is fine
        self.assertTrue(pool.closed)
        for call in (pool.getconn, pool.open,
                     lambda: pool.checkout().__enter__()):
            with self.assertRaises(PoolClosed) as cm:
                call()
            self.assertIn("%r is closed" % self.name, str(cm.exception))
        self.assertIn("closed", repr(pool))

    def test_one_maintenance_thread_however_many_callers(self):
        for round_ in range(5):
            name = "%s_%d" % (self.name, round_)
            pool = self._makeOne(name=name, minconn=0, maxconn=40,
                                 timeout=WAIT)
            barrier = threading.Barrier(40)

            def work():
                barrier.wait(WAIT)
                conn = pool.getconn()
                barrier.wait(WAIT)
                pool.putconn(conn)
            workers = [start(self, work) for _ in range(40)]
            for worker in workers:
                worker.finish(self)
            maintainers = [t for t in threading.enumerate()
                           if t.name == "zpgpool-maintainer-" + name]
            self.assertEqual(len(maintainers), 1)
            close_pool(self, pool)
            self.assertFalse(maintainers[0].is_alive())

    def test_maintenance_thread_ends(self):
        pool = self._makeOne(minconn=1)
        pool.open(wait=True, timeout=WAIT)
        thread = pool._maintainer.thread
        self.assertTrue(thread.is_alive())
        pool.close()
        thread.join(WAIT)
        self.assertFalse(thread.is_alive())


# -- fork ---------------------------------------------------------------------

class ForkTests(PoolTestBase):

    def test_child_uses_the_pool_and_parent_connections_survive(self):
        pool = self._makeOne(minconn=0, maxconn=4)
        held = pool.getconn()
        held_pid = server_pid(held)
        held.commit()
        idle = pool.getconn()
        idle_pid = server_pid(idle)
        idle.commit()
        pool.putconn(idle)

        def child():
            conn = pool.getconn()
            assert conn is not idle and conn is not held, "inherited"
            pid = server_pid(conn)
            assert pid not in (held_pid, idle_pid), "parent's backend"
            conn.commit()
            pool.putconn(conn)
            # What a careless child may do with what it inherited.
            held.close()
            idle.close()
            pool.closeall()
        self.assertEqual(run_in_child(child), (0, "ok"))
        # The parent's connections are untouched: same backends, working.
        self.assertEqual(server_pid(held), held_pid)
        self.assertWorks(held)
        again = pool.getconn()
        self.assertIs(again, idle)
        self.assertEqual(server_pid(again), idle_pid)
        self.assertWorks(again)
        wait_for(lambda: self.backends() == {held_pid, idle_pid},
                 "the child's backend to go")
        pool.putconn(held)
        pool.putconn(again)


    def test_child_does_not_take_back_the_forking_threads_connection(self):
        # The forking thread holds a connection of its own, in the middle of
        # a transaction. The child's fresh books must not receive it when
        # the thread's old claim on it ends in the child.
        pool = self._makeCompat(zpgpool.PersistentConnectionPool, 0, 2,
                                self.layer.dsn, name=self.name)
        conn = pool.getconn()
        pid = server_pid(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE forked (x int);"
                        " INSERT INTO forked VALUES (1)")

        def child():
            stats = pool.stats()
            assert (stats["size"], stats["in_use"], stats["idle"]) \
                == (0, 0, 0), stats
            mine = pool.getconn()
            assert mine is not conn, "the parent's connection"
            assert server_pid(mine) != pid, "the parent's backend"
            pool.putconn(mine)
        self.assertEqual(run_in_child(child), (0, "ok"))
        # The parent's transaction went on undisturbed.
        self.assertIs(pool.getconn(), conn)
        with conn.cursor() as cur:
            cur.execute("SELECT x FROM forked")
            self.assertEqual(cur.fetchall(), [(1,)])
        self.assertEqual(server_pid(conn), pid)
        pool.putconn(conn)

    def test_child_is_not_stuck_on_a_lock_held_at_the_fork(self):
        # Another thread of the parent is recording a connect failure (it
        # holds the connector's lock) when the process forks: the child's
        # copy of that lock would stay held for ever.
        pool = self._makeOne(minconn=0, maxconn=2)
        lock = pool._connector._lock
        lock.acquire()
        try:
            def child():
                conn = pool.getconn()
                self.assertWorks(conn)
                pool.putconn(conn)
            code, message = run_in_child(child)
        finally:
            lock.release()
        self.assertEqual((code, message), (0, "ok"))


# -- bad input ----------------------------------------------------------------

class BadInputTests(PoolTestBase):

    def assertInvalid(self, message, *args, **kw):
        kw.setdefault("name", self.name)
        with self.assertRaises(InvalidOption) as cm:
            ConnectionPool(*(args or (self.layer.dsn,)), **kw)
        self.assertIn(message, str(cm.exception))
        self.assertIn("zpgpool pool %r" % self.name, str(cm.exception))
        return str(cm.exception)

    def test_bad_options(self):
        self.assertInvalid("option 'maxconn' must be an integer >= 1, got "
                           "'20'", maxconn="20")
        self.assertInvalid("option 'maxconn' must be an integer >= 1, got 0",
                           maxconn=0)
        self.assertInvalid("option 'minconn' must be an integer >= 0, got "
                           "True", minconn=True)
        self.assertInvalid("minconn (5) must not be greater than maxconn (2)",
                           minconn=5, maxconn=2)
        self.assertInvalid("option 'timeout' must be a number of seconds >= 0"
                           ", got -1", timeout=-1)
        self.assertInvalid("option 'timeout' must be a number of seconds >= 0"
                           ", got nan", timeout=float("nan"))
        self.assertInvalid("option 'max_lifetime' must be a number of seconds"
                           " > 0 or None, got 0", max_lifetime=0)
        self.assertInvalid("option 'max_idle' must be a number of seconds > 0"
                           " or None, got '5'", max_idle="5")
        self.assertInvalid("option 'health_check_after' must be a number of "
                           "seconds >= 0 or None, got -0.5",
                           health_check_after=-0.5)
        self.assertInvalid("option 'leak_threshold'", leak_threshold=0)
        self.assertInvalid("option 'connect_timeout' must be an integer >= 0",
                           connect_timeout=1.5)
        self.assertInvalid("option 'reconnect_max_delay'",
                           reconnect_max_delay=None)
        self.assertInvalid("option 'twophase' must be True or False, got 1",
                           twophase=1)
        self.assertInvalid("option 'isolation_level' must be None or one of",
                           isolation_level="sometimes")
        self.assertInvalid("option 'application_name' must be a string",
                           application_name=5)
        self.assertInvalid("connection_factory must be a subclass",
                           connect_kwargs={"connection_factory": dict})
        self.assertInvalid("SlottedConnection declares __slots__, which",
                           connect_kwargs={
                               "connection_factory": SlottedConnection})
        with self.assertRaises(InvalidOption) as cm:
            ConnectionPool(self.layer.dsn, name=5)
        self.assertIn("option 'name' must be a string, got 5",
                      str(cm.exception))

    def test_unknown_option_lists_the_valid_ones(self):
        msg = self.assertInvalid("unknown option max_conn;", max_conn=3)
        for option in zpgpool.pool.DEFAULTS:
            self.assertIn(option, msg.split("valid options are:")[1])
        msg = self.assertInvalid("unknown options bar, foo;", foo=1, bar=2)

    def test_compat_bad_sizes(self):
        with self.assertRaises(InvalidOption) as cm:
            zpgpool.ThreadedConnectionPool("1", 2, self.layer.dsn)
        self.assertIn("option 'minconn' must be an integer", str(cm.exception))
        with self.assertRaises(InvalidOption) as cm:
            zpgpool.ThreadedConnectionPool(3, 2, self.layer.dsn)
        self.assertIn("must not be greater than maxconn", str(cm.exception))

    def test_dsn_must_be_a_string(self):
        for dsn in (None, 5, b"host=x"):
            self.assertInvalid("dsn must be a string, got %s"
                               % type(dsn).__name__, dsn)

    def test_dsn_syntax_is_checked_at_once(self):
        self.assertInvalid('invalid connection string', "host=x port")
        self.assertInvalid('invalid connection option "bogus"',
                           "host=x bogus=1")
        self.assertInvalid('invalid connection option "bogus"',
                           connect_kwargs={"bogus": 1})
        self.assertInvalid('invalid URI query parameter',
                           "postgresql://u@h/db?bogus=1")

    def assertStillServes(self, pool):
        with pool.checkout() as conn:
            self.assertWorks(conn)
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_putconn_of_a_foreign_connection(self):
        pool = self._makeOne()
        other = self._makeOne(name=self.name + "_other")
        plain = psycopg2.connect(self.layer.dsn)
        self.addCleanup(plain.close)
        theirs = other.getconn()
        mine = pool.getconn()
        for conn in (plain, theirs):
            with self.assertRaises(ConnectionMisuse) as cm:
                pool.putconn(conn)
            self.assertIn("does not belong to this pool", str(cm.exception))
            self.assertIn(repr(self.name), str(cm.exception))
        self.assertFalse(plain.closed)
        self.assertEqual(other.stats()["in_use"], 1)
        self.assertEqual(pool.stats()["in_use"], 1)
        other.putconn(theirs)
        pool.putconn(mine)
        self.assertStillServes(pool)

    def test_putconn_twice(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn(conn)
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(conn)
        self.assertIn("it was returned already", str(cm.exception))
        self.assertIn(repr(self.name), str(cm.exception))
        stats = pool.stats()
        self.assertEqual((stats["idle"], stats["in_use"]), (1, 0))
        self.assertStillServes(pool)

    def test_putconn_of_a_discarded_connection(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn(conn, close=True)
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(conn)
        self.assertIn("closed by the pool", str(cm.exception))
        self.assertStillServes(pool)

    def test_putconn_after_close(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn(conn)
        pool.close()
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(conn)
        self.assertIn("closed by the pool", str(cm.exception))
        self.assertIn(repr(self.name), str(cm.exception))


class PasswordTests(PoolTestBase):

    layer = PRIVATE_POSTGRES_LAYER
    SECRET = "s3cr3t-Passw0rd-xyz"

    def assertNoSecret(self, *texts):
        for text in texts + (self.log.text(),):
            self.assertNotIn(self.SECRET, text)

    def test_repr_and_dsn(self):
        server = self.layer.server
        pool = self._makeOne(server.dsn(password=self.SECRET))
        self.assertIn("password=***", pool.dsn)
        self.assertIn("password=***", repr(pool))
        self.assertNoSecret(repr(pool), pool.dsn, str(pool.stats()))
        uri = "postgresql://postgres:%s@127.0.0.1:%s/postgres" % (
            self.SECRET, server.port)
        pool = self._makeOne(uri)
        self.assertNoSecret(repr(pool), pool.dsn)
        pool = self._makeCompat(zpgpool.SimpleConnectionPool, 0, 1,
                                host="127.0.0.1", password=self.SECRET)
        self.assertNoSecret(repr(pool), pool.dsn)

    def test_wrong_password(self):
        pool = self._makeOne(self.layer.server.dsn(password=self.SECRET),
                             timeout=0.1)
        with self.assertRaises(ConnectError) as cm:
            pool.getconn()
        msg = str(cm.exception)
        self.assertIn("password authentication failed", msg)
        self.assertIn("user=postgres", msg)
        self.assertNoSecret(msg, repr(cm.exception), pool.stats()[
            "last_connect_error"])
        self.assertTrue(self.log.records)

    def test_wrong_port(self):
        dsn = self.layer.server.dsn(password=self.SECRET, port=closed_port())
        pool = self._makeOne(dsn, minconn=1, reconnect_max_delay=0.1,
                             timeout=1)
        with self.assertRaises(ConnectError) as cm:
            pool.getconn()
        with self.assertRaises(PoolTimeout) as cm2:
            pool.open(wait=True, timeout=0.2)
        self.assertNoSecret(str(cm.exception), str(cm2.exception))
        self.assertTrue(self.log.records)

    def test_invalid_dsn(self):
        for dsn in ("password=%s host=x port" % self.SECRET,
                    "postgresql://u:%s@[::1/db" % self.SECRET,
                    "postgresql://u:%s@h/db?bogus=1" % self.SECRET):
            with self.assertRaises(InvalidOption) as cm:
                ConnectionPool(dsn)
            self.assertIn("invalid connection string", str(cm.exception))
            self.assertNoSecret(str(cm.exception))

    def test_foreign_connection_error(self):
        pool = self._makeOne()
        plain = psycopg2.connect(self.layer.server.dsn())
        self.addCleanup(plain.close)
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(plain)
        self.assertNotIn(self.layer.server.password, str(cm.exception))


# -- nothing slow under the lock ----------------------------------------------

class NothingSlowUnderTheLockTests(PoolTestBase):
    """A server that hangs must not stop other threads using the pool.

    The server is made to hang for real: SIGSTOP freezes the postmaster (new
    connections hang after the TCP handshake) or one backend (its session
    stops answering). Only possible with a server on this machine, which
    PRIVATE_POSTGRES_LAYER always is.
    """

    layer = PRIVATE_POSTGRES_LAYER

    def freeze(self, pid):
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)

    def postmaster_pid(self):
        with open(os.path.join(self.layer.server.data_dir,
                               "postmaster.pid")) as f:
            return int(f.readline())

    def others_get_on(self, pool, conn):
        """From a third thread: return ``conn``, take it back, read stats."""
        def work():
            pool.putconn(conn)
            again = pool.getconn()
            stats = pool.stats()
            pool.putconn(again)
            return again, stats
        again, stats = start(self, work).finish(self)
        self.assertIs(again, conn)
        return stats

    def test_connecting(self):
        pool = self._makeOne(minconn=0, maxconn=3, connect_timeout=int(WAIT))
        conn = pool.getconn()
        conn.rollback()
        self.freeze(self.postmaster_pid())
        taker = start(self, pool.getconn)
        wait_for(lambda: is_connecting(taker),
                 "the thread to hang in psycopg2.connect")
        stats = self.others_get_on(pool, conn)
        self.assertEqual(stats["connecting"], 1)
        self.assertTrue(taker.is_alive())      # still connecting meanwhile
        self.assertTrue(is_connecting(taker))
        os.kill(self.postmaster_pid(), signal.SIGCONT)
        new = taker.finish(self)
        self.assertWorks(new)
        self.assertIsNot(new, conn)
        pool.putconn(new)

    def test_rolling_back(self):
        pool = self._makeOne(minconn=0, maxconn=3)
        stuck = pool.getconn()
        pid = server_pid(stuck)        # leaves stuck in a transaction
        other = pool.getconn()
        other.rollback()
        self.freeze(pid)
        returner = start(self, pool.putconn, stuck)
        wait_for(lambda: is_in(returner, "_reset_for_reuse"),
                 "the thread to hang in the rollback")
        self.others_get_on(pool, other)
        self.assertTrue(returner.is_alive())   # still rolling back
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(stuck)
        self.assertIn("being returned by another thread", str(cm.exception))
        os.kill(pid, signal.SIGCONT)
        returner.finish(self)
        self.assertEqual(stuck.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_IDLE)
        self.assertEqual(pool.stats()["idle"], 2)

    def test_pinging(self):
        pool = self._makeOne(minconn=0, maxconn=3, health_check_after=0)
        stuck = pool.getconn()
        pid = server_pid(stuck)
        stuck.rollback()
        other = pool.getconn()
        other.rollback()
        pool.putconn(stuck)
        self.freeze(pid)
        taker = start(self, pool.getconn)
        wait_for(lambda: is_in(taker, "run_statement", "zpgpool/connection.py"),
                 "the thread to hang pinging")
        # The third thread's getconn must not take the one being pinged;
        # with health_check_after=0 it pings ``other`` itself.
        self.others_get_on(pool, other)
        self.assertTrue(taker.is_alive())      # still pinging
        os.kill(pid, signal.SIGCONT)
        self.assertIs(taker.finish(self), stuck)
        pool.putconn(stuck)

    def test_timeout_names_the_last_connect_error(self):
        dsn = self.layer.new_database()
        dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
        pool = self._makeOne(dsn, minconn=0, maxconn=1,
                             connect_timeout=int(WAIT), timeout=1)
        query(self.layer.dsn, "ALTER DATABASE %s ALLOW_CONNECTIONS false"
              % dbname)
        with self.assertRaises(ConnectError) as cm:
            pool.getconn()
        self.assertIn("not currently accepting connections",
                      str(cm.exception))
        query(self.layer.dsn, "ALTER DATABASE %s ALLOW_CONNECTIONS true"
              % dbname)
        self.freeze(self.postmaster_pid())
        taker = start(self, pool.getconn)
        wait_for(lambda: is_connecting(taker),
                 "the thread to hang in psycopg2.connect")
        with self.assertRaises(PoolTimeout) as cm:
            pool.checkout(timeout=0.1).__enter__()
        msg = str(cm.exception)
        self.assertIn("maxconn=1, in use=0, connecting=1, waiting=0", msg)
        self.assertIn("last connect error: ", msg)
        self.assertIn("not currently accepting connections", msg)
        os.kill(self.postmaster_pid(), signal.SIGCONT)
        conn = taker.finish(self)
        self.assertWorks(conn)
        self.assertIsNone(pool.stats()["last_connect_error"])
        pool.putconn(conn)

    def test_closing_the_pool_while_connecting(self):
        pool = self._makeOne(minconn=0, maxconn=2, connect_timeout=int(WAIT))
        self.freeze(self.postmaster_pid())
        taker = start(self, pool.getconn)
        wait_for(lambda: is_connecting(taker),
                 "the thread to hang in psycopg2.connect")
        pool.close(timeout=0)
        self.assertTrue(pool.closed)
        os.kill(self.postmaster_pid(), signal.SIGCONT)
        taker.finish(self, expect_error=True)
        self.assertIsInstance(taker.error, PoolClosed)
        self.assertEqual(pool.stats()["size"], 0)
        wait_for(lambda: not self.backends(), "the late connection closed")


# -- behaviours a broken pool misses by far -----------------------------------
#
# Each test below names the bug in tests/mutations.toml it is there to catch
# (scripts/mutation plants them); the bounds are generous for a loaded
# machine and still far from what the broken version does.

class PlacePassingTests(PoolTestBase):

    def test_failed_connect_passes_its_place_to_the_next_waiter(self):
        proxy = self._silent_proxy()
        # A database that does not exist: a permanent failure, once the
        # server gets to answer.
        dsn = with_params(self.layer.dsn, dbname="no_such_db_" + self.name,
                          **proxy.dsn_params())
        pool = self._makeOne(dsn, minconn=0, maxconn=1, timeout=20.0)
        first = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["connecting"] == 1, "a connect")
        second = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
        healed = time.monotonic()
        proxy.heal()
        first.finish(self, expect_error=True)
        self.assertIsInstance(first.error, ConnectError)
        # The first caller's place went to the waiter, who tried itself and
        # failed as fast; left waiting, it would time out after 20 s.
        second.finish(self, timeout=10.0, expect_error=True)
        self.assertIsInstance(second.error, ConnectError)
        self.assertNotIsInstance(second.error, PoolTimeout)
        self.assertLess(time.monotonic() - healed, 10.0)
        self.assertEqual(pool.stats()["size"], 0)


    def _silent_proxy(self):
        from .faulthelpers import TcpProxy
        params = psycopg2.extensions.parse_dsn(self.layer.dsn)
        proxy = TcpProxy((params.get("host", "127.0.0.1"),
                          int(params.get("port", 5432))))
        self.addCleanup(proxy.close)
        proxy.silent()
        return proxy

    def test_failed_warm_up_passes_its_place_to_a_waiter(self):
        # The same for the maintainer's connect for minconn: the caller
        # waiting for the place it held gets it when that connect fails.
        proxy = self._silent_proxy()
        dsn = with_params(self.layer.dsn, dbname="no_such_db_" + self.name,
                          **proxy.dsn_params())
        pool = self._makeOne(dsn, minconn=1, maxconn=1, timeout=20.0)
        pool.open()
        wait_for(lambda: pool.stats()["connecting"] == 1, "the warm-up")
        waiter = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
        healed = time.monotonic()
        proxy.heal()
        waiter.finish(self, timeout=10.0, expect_error=True)
        self.assertIsInstance(waiter.error, ConnectError)
        self.assertNotIsInstance(waiter.error, PoolTimeout)
        self.assertLess(time.monotonic() - healed, 10.0)

    def test_warm_up_finished_after_close_is_closed(self):
        # The maintainer's connect for minconn outlives the pool's close():
        # the connection it brings is closed, not kept or handed out.
        proxy = self._silent_proxy()
        pool = self._makeOne(with_params(self.layer.dsn,
                                         **proxy.dsn_params()),
                             minconn=1, maxconn=1)
        pool.open()
        wait_for(lambda: pool.stats()["connecting"] == 1, "the warm-up")
        pool.close(timeout=0)
        proxy.heal()
        wait_for(lambda: pool.stats()["connecting"] == 0, "the warm-up done")
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["idle"]), (0, 0))
        wait_for(lambda: not self.backends(), "its session closed")

class BackoffResetTests(PoolTestBase):

    def test_after_a_success_a_new_failure_starts_from_the_short_delay(self):
        from .faulthelpers import TcpProxy
        params = psycopg2.extensions.parse_dsn(self.layer.dsn)
        proxy = TcpProxy((params.get("host", "127.0.0.1"),
                          int(params.get("port", 5432))))
        self.addCleanup(proxy.close)
        dsn = with_params(self.layer.dsn, **proxy.dsn_params())
        pool = self._makeOne(dsn, minconn=1, maxconn=2,
                             reconnect_max_delay=10.0)
        proxy.refuse()
        pool.open()
        # Five failures in a row: the next delay would be 3 to 6 s.
        wait_for(lambda: pool.stats()["connections_failed"] >= 5,
                 "five failed refills")
        proxy.heal()
        wait_for(lambda: pool.stats()["idle"] == 1, "the refill")
        conn = pool.getconn()
        proxy.refuse()
        before = pool.stats()["connections_failed"]
        pool.putconn(conn, close=True)      # wakes the maintainer at once
        time.sleep(3.0)
        # Started afresh: attempts after 0.1-0.2, 0.2-0.4, 0.4-0.8 s. A
        # back-off that kept counting would wait 6 s or more after the first.
        self.assertGreaterEqual(
            pool.stats()["connections_failed"] - before, 3)
        proxy.heal()


class DeadConnectionWatermarkTests(PoolTestBase):

    def test_newer_idle_connection_is_pinged_after_an_older_one_died(self):
        pool = self._makeOne(minconn=0, maxconn=3, health_check_after=None)
        older = pool.getconn()
        newer = pool.getconn()
        older.commit()
        newer.commit()
        pool.putconn(newer)
        for conn in (older, newer):
            query(self.layer.dsn, "SELECT pg_terminate_backend(%s)",
                  (server_pid(conn),))
        with self.assertRaises(psycopg2.OperationalError):
            older.cursor().execute("SELECT 1")
        pool.putconn(older)     # found dead: the newer one is suspect too
        conn = pool.getconn()
        # Pinged before use and replaced, not handed out dead.
        self.assertIsNot(conn, newer)
        self.assertWorks(conn)
        pool.putconn(conn)


class LendingTests(PoolTestBase):

    def test_the_connection_parked_longest_is_lent_to_a_waiter(self):
        import transaction
        pool = self._makeOne(minconn=0, maxconn=2)
        parked = []
        done = threading.Event()

        def park():
            conn = pool.connection()
            conn.cursor().execute("SELECT 1")
            transaction.commit()
            parked.append(conn)
            done.wait(WAIT)

        first = start(self, park)
        wait_for(lambda: len(parked) == 1, "the first to park")
        second = start(self, park)
        wait_for(lambda: len(parked) == 2, "the second to park")
        self.assertEqual(pool.stats()["bound_idle"], 2)
        lent = pool.getconn()
        self.assertIs(lent, parked[0])
        self.assertWorks(lent)
        pool.putconn(lent)
        done.set()
        first.finish(self)
        second.finish(self)

    def test_connection_used_from_another_thread_is_refused(self):
        import transaction
        pool = self._makeOne(minconn=0, maxconn=2)
        conn = pool.connection()
        conn.cursor().execute("SELECT 1")

        def use():
            conn.cursor().execute("SELECT 2")

        worker = start(self, use)
        worker.finish(self, expect_error=True)
        self.assertIsInstance(worker.error, ConnectionMisuse)
        self.assertIn(repr(self.name), str(worker.error))
        transaction.abort()


class ClosedByCallerTests(PoolTestBase):

    def test_only_the_closed_connection_goes(self):
        pool = self._makeOne(minconn=0, maxconn=3)
        a, b, c = pool.getconn(), pool.getconn(), pool.getconn()
        for conn in (a, b):
            conn.commit()
            pool.putconn(conn)
        c.close()
        pool.putconn(c)
        stats = pool.stats()
        # Its caller closed it, which says nothing about the server: the
        # others stay.
        self.assertEqual(stats["connections_lost"], 0)
        self.assertEqual(stats["idle"], 2)
        self.assertFalse(a.closed or b.closed)
        again = pool.getconn()
        self.assertIn(again, (a, b))
        pool.putconn(again)



class ThreadConnectionOwnershipTests(PoolTestBase):
    """PersistentConnectionPool hands a thread its remembered connection
    only while that thread still holds it."""

    def test_connection_returned_by_another_thread_is_not_given_back(self):
        pool = self._makeCompat(zpgpool.PersistentConnectionPool, 0, 3,
                                self.layer.dsn, name=self.name)
        taken, returned = threading.Event(), threading.Event()
        b_has_it, b_done = threading.Event(), threading.Event()

        held = []

        def first():
            conn = pool.getconn()
            held.append(conn)
            taken.set()
            returned.wait(WAIT)
            # Its connection went back to the pool (putconn(conn) from
            # another thread) and was lent out again since.
            b_has_it.wait(WAIT)
            again = pool.getconn()
            self.assertWorks(again)
            return conn, again

        def second():
            conn = pool.getconn()
            b_has_it.set()
            b_done.wait(WAIT)
            conn.rollback()
            pool.putconn()
            return conn

        a = start(self, first)
        taken.wait(WAIT)
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 1)
        # psycopg2's pools let any thread return a connection it names.
        pool.putconn(held[0])
        self.assertEqual(pool.stats()["in_use"], 0)
        b = start(self, second)
        returned.set()
        original, again = a.finish(self)
        b_done.set()
        b_conn = b.finish(self)
        self.assertIs(b_conn, original)     # the idle stack lent it again
        self.assertIsNot(again, b_conn,
                         "one connection given to two threads at once")

    def test_connection_closed_by_closeall_is_not_given_back(self):
        pool = self._makeCompat(zpgpool.PersistentConnectionPool, 0, 2,
                                self.layer.dsn, name=self.name)
        conn = pool.getconn()
        self.assertWorks(conn)
        pool.closeall()
        self.assertTrue(conn.closed)
        with self.assertRaises(PoolClosed) as cm:
            pool.getconn()
        self.assertIn(repr(self.name), str(cm.exception))
