"""A server that goes away and comes back: callers wait through a short
outage, fail at once on a permanent refusal or in a long outage, health
checks are bounded, and the log says it once, not per attempt.
Also the per-connection ``configure`` callable, run on each new
connection and after every session reset."""
import threading
import time
import unittest

import psycopg2
import psycopg2.extras
import transaction

from zpgpool import ConnectError
from zpgpool import ConnectionPool
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.testing import PRIVATE_POSTGRES_LAYER

from tests.poolhelpers import WAIT
from tests.poolhelpers import LogCapture
from tests.poolhelpers import close_pool
from tests.poolhelpers import closed_port
from tests.poolhelpers import start
from tests.poolhelpers import unique_name
from tests.poolhelpers import wait_for
from tests.poolhelpers import with_params


class _Base(unittest.TestCase):

    def setUp(self):
        self.log = LogCapture().install(self)
        self.name = unique_name()

    def _makeOne(self, dsn=None, **kw):
        kw.setdefault("name", self.name)
        pool = ConnectionPool(self.layer.dsn if dsn is None else dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def warnings(self, text="cannot connect"):
        return [r.getMessage() for r in self.log.records
                if r.levelname == "WARNING" and text in r.getMessage()]

    def assertFailsAtOnce(self, dsn):
        """A pool on *dsn* gives up on its first attempt to connect, well
        within its time-out, with a permanent ConnectError; return the
        pool and the error."""
        pool = self._makeOne(dsn, minconn=0, timeout=WAIT)
        begun = time.monotonic()
        with self.assertRaises(ConnectError) as caught:
            pool.getconn()
        self.assertLess(time.monotonic() - begun, WAIT / 2)
        self.assertTrue(caught.exception.permanent)
        return pool, caught.exception


class OutageTests(_Base):

    layer = PRIVATE_POSTGRES_LAYER

    def tearDown(self):
        if not self.layer.server.is_running():
            self.layer.server.start()

    def test_caller_waits_through_a_restart(self):
        server = self.layer.server
        pool = self._makeOne(minconn=0, maxconn=2, timeout=WAIT,
                             connect_timeout=2)
        server.stop("immediate")
        started = threading.Event()

        def take():
            started.set()
            with pool.checkout() as conn:
                cur = conn.cursor()
                cur.execute("SELECT 42")
                return cur.fetchone()[0]

        taker = start(self, take)
        started.wait(WAIT)
        wait_for(lambda: pool.stats()["connections_failed"] >= 2,
                 "the caller to try and fail twice")
        self.assertTrue(taker.is_alive())   # still trying, not failed
        server.start()
        self.assertEqual(taker.finish(self), 42)
        stats = pool.stats()
        self.assertIsNone(stats["last_connect_error"])
        self.assertEqual(stats["outage_seconds"], 0.0)

    def test_error_after_the_time_out_says_how_long_it_tried(self):
        pool = self._makeOne(with_params(self.layer.dsn, port=closed_port()),
                             minconn=0, timeout=3.0)
        begun = time.monotonic()
        with self.assertRaises(ConnectError) as caught:
            pool.getconn()
        took = time.monotonic() - begun
        message = str(caught.exception)
        self.assertRegex(message, r"tried for [0-9.]+ s, \d+ attempts")
        self.assertIn("Connection refused", message)
        self.assertFalse(caught.exception.permanent)
        # It kept trying (far longer than one refused connect), and gave
        # up near its time-out, not after a multiple of it.
        self.assertGreater(took, 1.5)
        self.assertLess(took, 30)

    def test_long_outage_fails_new_callers_at_once(self):
        server = self.layer.server
        # A time-out long enough that a caller who waits it out is far
        # from the bound below, even on a loaded machine.
        pool = self._makeOne(minconn=0, maxconn=16, timeout=4.0,
                             connect_timeout=2)
        server.stop("fast")
        with self.assertRaises(ConnectError):
            pool.getconn()          # waited out its whole time-out
        wait_for(lambda: pool.stats()["outage_seconds"] > 4.0,
                 "the outage to outlast the pool's timeout")
        durations = []
        errors = []

        def ask():
            begun = time.monotonic()
            try:
                pool.getconn()
            except ConnectError as exc:
                errors.append(str(exc))
            durations.append(time.monotonic() - begun)

        workers = [start(self, ask) for _ in range(16)]
        for worker in workers:
            worker.finish(self)
        self.assertEqual(len(errors), 16)
        # One of them may probe the server once (a refused connect is
        # quick); none waits a time-out.
        self.assertLess(max(durations), 2.0, durations)
        self.assertTrue(any("longer than the pool's timeout" in e
                            for e in errors), errors)
        server.start()
        # The first request after the server is back succeeds.
        conn = pool.getconn()
        pool.putconn(conn)
        self.assertEqual(pool.stats()["outage_seconds"], 0.0)

    def test_warnings_are_rate_limited(self):
        pool = self._makeOne(with_params(self.layer.dsn, port=closed_port()),
                             minconn=0, maxconn=8, timeout=1.5)

        def fail():
            with self.assertRaises(ConnectError):
                pool.getconn()

        workers = [start(self, fail) for _ in range(4)]
        for worker in workers:
            worker.finish(self)
        self.assertGreater(pool.stats()["connections_failed"], 8)
        # One warning for the first failure; the others are counted into
        # the next one, which is due only after ten seconds.
        self.assertEqual(len(self.warnings()), 1, self.warnings())


class PermanentFailureTests(_Base):

    layer = POSTGRES_LAYER

    def test_missing_database_fails_at_once(self):
        pool, error = self.assertFailsAtOnce(
            with_params(self.layer.dsn, dbname="no_such_db"))
        self.assertIn('database "no_such_db" does not exist', str(error))
        self.assertEqual(pool.stats()["connections_failed"], 1)

    def test_missing_role_fails_at_once(self):
        self.assertFailsAtOnce(with_params(self.layer.dsn,
                                           user="no_such_role"))


class MissingRoleTests(_Base):

    # Over TCP the server answers a missing role as a wrong password (it
    # must not tell who exists); only where it trusts the client (the unix
    # socket here) does it say "role ... does not exist".
    layer = PRIVATE_POSTGRES_LAYER

    def test_missing_role_without_password_fails_at_once(self):
        pool, error = self.assertFailsAtOnce(
            self.layer.server.socket_dsn(user="no_such_role"))
        self.assertIn('role "no_such_role" does not exist', str(error))
        self.assertEqual(pool.stats()["connections_failed"], 1)


def _search_path(conn):
    cur = conn.cursor()
    cur.execute("SET search_path TO zp_configured, public")
    cur.close()


def _failing(conn):
    raise RuntimeError("no such role as the callable expects")


class ConfigureTests(_Base):

    layer = POSTGRES_LAYER

    def setUp(self):
        super().setUp()
        transaction.abort()
        self.addCleanup(transaction.abort)

    def show(self, conn):
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        return cur.fetchone()[0]

    def test_runs_on_every_new_connection_before_use(self):
        calls = []

        def configure(conn):
            calls.append(conn)
            _search_path(conn)
            psycopg2.extras.register_uuid(conn_or_curs=conn)

        pool = self._makeOne(minconn=0, maxconn=2, configure=configure)
        first, second = pool.getconn(), pool.getconn()
        self.assertEqual(calls, [first, second])
        for conn in (first, second):
            self.assertEqual(self.show(conn), "zp_configured, public")
            conn.rollback()
            pool.putconn(conn)
        again = pool.getconn()
        self.assertEqual(len(calls), 2)     # not again for a kept one
        pool.putconn(again)

    def test_runs_again_after_a_session_reset(self):
        calls = []
        pool = self._makeOne(minconn=0, maxconn=1,
                             configure=lambda c: (calls.append(1),
                                                  _search_path(c)))
        cur = pool.connection().cursor()
        cur.execute("SET work_mem = '8MB'")    # the session is reset
        transaction.commit()
        self.assertEqual(len(calls), 2)
        conn = pool.connection()
        self.assertEqual(self.show(conn), "zp_configured, public")
        cur = conn.cursor()
        cur.execute("SHOW work_mem")
        self.assertNotEqual(cur.fetchone()[0], "8MB")
        transaction.commit()
        self.assertEqual(len(calls), 2)     # nothing to undo this time

    def test_failing_configure_discards_and_names_the_callable(self):
        pool = self._makeOne(minconn=0, maxconn=1, configure=_failing)
        with self.assertRaises(ConnectError) as caught:
            pool.getconn()
        message = str(caught.exception)
        self.assertIn("tests.test_outage._failing", message)
        self.assertIn("no such role as the callable expects", message)
        self.assertTrue(caught.exception.permanent)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["in_use"]), (0, 0))

    def test_new_outage_after_a_success_is_warned_about_at_once(self):
        # Each failure of configure is a failed connect; a success in
        # between ends the outage, so the next failure starts a new one,
        # warned about at once, not after the old one's ten seconds.
        outcomes = iter([False, True, False])

        def flaky(conn):
            if not next(outcomes):
                raise RuntimeError("flaky configure")

        pool = self._makeOne(minconn=0, maxconn=2, configure=flaky)
        with self.assertRaises(ConnectError):
            pool.getconn()
        self.assertEqual(len(self.warnings()), 1, self.warnings())
        first = pool.getconn()
        self.assertEqual(pool.stats()["last_connect_error"], None)
        with self.assertRaises(ConnectError):
            pool.getconn()           # a second connection: a new failure
        self.assertEqual(len(self.warnings()), 2, self.warnings())
        self.assertIn("flaky configure", self.warnings()[1])
        pool.putconn(first)

    def test_configure_through_zcml(self):
        import zope.component
        import zope.component.testing
        from zope.configuration import xmlconfig
        from zope.configuration.exceptions import ConfigurationError
        from zpgpool.interfaces import IConnectionPool
        from zpgpool.zcml import close_registered_pools
        zope.component.testing.setUp(self)
        self.addCleanup(zope.component.testing.tearDown, self)
        self.addCleanup(close_registered_pools)
        template = """
            <configure xmlns="http://namespaces.zope.org/zope"
                       xmlns:zpgpool="http://namespaces.zope.org/zpgpool">
              <include package="zpgpool" />
              <zpgpool:pool name="%s" dsn="%s" configure="%s"
                            validation_timeout="2" />
            </configure>"""
        xmlconfig.string(template % ("configured", self.layer.dsn,
                                     "tests.test_outage._search_path"))
        pool = zope.component.getUtility(IConnectionPool, name="configured")
        self.assertEqual(pool.validation_timeout, 2.0)
        conn = pool.getconn()
        self.assertEqual(self.show(conn), "zp_configured, public")
        conn.rollback()
        pool.putconn(conn)
        with self.assertRaises(ConfigurationError) as caught:
            xmlconfig.string(template % ("bad", self.layer.dsn,
                                         "tests.test_outage.no_such_thing"))
        self.assertIn("configure must be the dotted name of a callable",
                      str(caught.exception))

    def test_configure_must_be_callable(self):
        from zpgpool import InvalidOption
        with self.assertRaises(InvalidOption) as caught:
            ConnectionPool(self.layer.dsn, name="x", configure="nope")
        self.assertIn("option 'configure' must be None or a callable",
                      str(caught.exception))


class BoundedPingTests(_Base):
    """The socket limit a health check runs under (its effect on a dropped
    network is shown with nftables in test_partition.py)."""

    layer = POSTGRES_LAYER

    def _user_timeout(self, conn):
        import os
        import socket
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            return sock.getsockopt(socket.IPPROTO_TCP,
                                   socket.TCP_USER_TIMEOUT)
        finally:
            sock.close()

    def test_limit_is_set_for_the_block_and_restored(self):
        from zpgpool.connection import unacknowledged_limit
        conn = psycopg2.connect(self.layer.dsn + " tcp_user_timeout=30000")
        self.addCleanup(conn.close)
        self.assertEqual(self._user_timeout(conn), 30000)
        with unacknowledged_limit(conn, 1.5):
            self.assertEqual(self._user_timeout(conn), 1500)
            cur = conn.cursor()
            cur.execute("SELECT 1")
            self.assertEqual(cur.fetchone(), (1,))
        self.assertEqual(self._user_timeout(conn), 30000)
        # The connection is still libpq's, and works.
        cur = conn.cursor()
        cur.execute("SELECT 2")
        self.assertEqual(cur.fetchone(), (2,))

    def test_unix_socket_and_closed_connection_are_left_alone(self):
        from zpgpool.connection import unacknowledged_limit
        conn = psycopg2.connect(self.layer.server.socket_dsn())
        self.addCleanup(conn.close)
        with unacknowledged_limit(conn, 1.0):
            cur = conn.cursor()
            cur.execute("SELECT 1")
            self.assertEqual(cur.fetchone(), (1,))
        closed = psycopg2.connect(self.layer.dsn)
        closed.close()
        ran = []
        with unacknowledged_limit(closed, 1.0):
            ran.append(True)
        self.assertEqual(ran, [True])
