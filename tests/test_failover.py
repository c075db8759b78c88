"""Fail-over under load: the primary dies, its synchronous standby is
promoted, and a pool on a multi-host DSN follows.

Real servers (zpgpool.testing.STANDBY_LAYER: a primary and a synchronous
streaming standby, rebuilt before each test that broke them), real
threads retrying as Zope's publisher does, with
``transaction.manager.attempts()``.
"""
import collections
import threading
import time
import unittest

import psycopg2
import transaction
import transaction.interfaces

from zpgpool import CommitUnknown
from zpgpool import ConnectionPool
from zpgpool import SessionLost
from zpgpool.testing import STANDBY_LAYER
from zpgpool.testing import StandbyServer
from zpgpool.testing import multihost_dsn

from tests.poolhelpers import WAIT
from tests.poolhelpers import close_pool
from tests.poolhelpers import query
from tests.poolhelpers import unique_name
from tests.poolhelpers import wait_for
from tests.scaleouthelpers import report as _report


def report(message):
    _report("test_failover", message)


class Writers:
    """``threads`` threads inserting one row per request until stopped,
    each request retried by ``attempts()`` on a TransientError."""

    def __init__(self, pool, threads=16):
        self.pool = pool
        self._stop = threading.Event()
        self._lock = threading.Lock()   # protects everything below
        self.acknowledged = []          # tokens whose commit returned
        self.unknown = []               # tokens whose COMMIT was cut off
        self.failed = []                # (token, error) of other failures
        self.retries = collections.Counter()   # retried errors, by kind
        self.requests = 0
        self.successes = []             # (monotonic time, thread)
        self.threads = [threading.Thread(target=self._run, args=(n,),
                                         daemon=True, name="writer-%d" % n)
                        for n in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _request(self, token):
        tm = transaction.manager
        for attempt in tm.attempts(10):
            with attempt:
                try:
                    cur = self.pool.connection().cursor()
                    cur.execute("INSERT INTO fo_rows (token) VALUES (%s)",
                                (token,))
                    tm.commit()
                except transaction.interfaces.TransientError as exc:
                    with self._lock:
                        self.retries[
                            "SessionLost" if isinstance(exc, SessionLost)
                            else type(exc).__name__] += 1
                    raise

    def _run(self, n):
        for i in range(100000):
            if self._stop.is_set():
                return
            token = "%d-%d" % (n, i)
            try:
                self._request(token)
            except CommitUnknown:
                with self._lock:
                    self.requests += 1
                    self.unknown.append(token)
            except Exception as exc:
                with self._lock:
                    self.requests += 1
                    self.failed.append((token, repr(exc)))
                time.sleep(0.01)
            else:
                with self._lock:
                    self.requests += 1
                    self.acknowledged.append(token)
                    self.successes.append((time.monotonic(), n))
            finally:
                transaction.abort()

    def first_success_after(self, since):
        with self._lock:
            times = [t for t, _ in self.successes if t >= since]
        return min(times) - since if times else None

    def everyone_succeeded_after(self, since):
        with self._lock:
            return len({n for t, n in self.successes if t >= since}) \
                == len(self.threads)

    def stop(self, testcase):
        self._stop.set()
        for t in self.threads:
            t.join(WAIT)
        testcase.assertEqual([t.name for t in self.threads if t.is_alive()],
                             [], "writer threads hang")


def in_recovery(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), inet_server_port()")
        return cur.fetchone()


class FailoverTests(unittest.TestCase):

    layer = STANDBY_LAYER

    def setUp(self):
        transaction.abort()
        self.primary = self.layer.primary
        self.standby = self.layer.standby
        self.primary.execute("DROP TABLE IF EXISTS fo_rows")
        self.primary.execute("CREATE TABLE fo_rows (token text NOT NULL)")

    def _makeOne(self, dsn, **kw):
        kw.setdefault("name", unique_name("fo"))
        pool = ConnectionPool(dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def backends(self, server, pool):
        return query(server.dsn(), "SELECT count(*) FROM pg_stat_activity "
                     "WHERE application_name = %s",
                     ("zpgpool:%s" % pool.name,))[0][0]

    def test_writers_survive_a_failover(self):
        pool = self._makeOne(self.layer.dsn, minconn=0, maxconn=16,
                             timeout=30, connect_timeout=2)
        writers = Writers(pool).start()
        self.addCleanup(writers.stop, self)
        wait_for(lambda: len(writers.acknowledged) >= 200,
                 "writes before the failover")
        killed = time.monotonic()
        self.primary.stop("immediate")
        time.sleep(1.0)
        promoting = time.monotonic()
        self.standby.promote()
        promoted = time.monotonic()
        wait_for(lambda: writers.everyone_succeeded_after(promoted),
                 "every writer committing on the new primary")
        time.sleep(0.5)
        writers.stop(self)
        # promote() returns once the server takes writes, and the writers
        # may be first: measured from the moment it was called.
        first = writers.first_success_after(promoting)

        rows = dict(query(self.standby.dsn(), "SELECT token, count(*) FROM "
                                              "fo_rows GROUP BY token"))
        lost = [t for t in writers.acknowledged if t not in rows]
        twice = {t: c for t, c in rows.items() if c > 1}
        unknown_committed = sum(1 for t in writers.unknown if t in rows)
        report("fail-over under 16 writers: %d requests, %d acknowledged, "
               "%d SessionLost retries, %d other retries, %d CommitUnknown "
               "(%d of them committed), %d other failures; acknowledged rows "
               "lost: %d; kill to promote() %.2f s, promote() took %.2f s; "
               "first commit %.2f s after promote() was called"
               % (writers.requests, len(writers.acknowledged),
                  writers.retries["SessionLost"],
                  sum(writers.retries.values())
                  - writers.retries["SessionLost"],
                  len(writers.unknown), unknown_committed,
                  len(writers.failed), len(lost), promoting - killed,
                  promoted - promoting, first))
        self.assertEqual(lost, [], "acknowledged rows lost")
        self.assertEqual(twice, {}, "rows committed twice")
        self.assertEqual(writers.failed[:5], [], "requests that failed")
        self.assertEqual(len(writers.failed), 0)
        self.assertGreater(writers.retries["SessionLost"]
                           + len(writers.unknown), 0,
                           "the failover hit no request: it shows nothing")
        self.assertLess(first, 5.0, "writes resumed late")
        # Every connection the pool holds is on the new primary.
        wait_for(lambda: pool.stats()["in_use"] == 0, "in_use back to 0")
        stats = pool.stats()
        self.assertEqual(self.backends(self.standby, pool), stats["size"])
        self.assertFalse(self.primary.is_running())
        self.assertEqual(query(self.standby.dsn(), "SELECT count(*) FROM "
                                                   "pg_prepared_xacts"),
                         [(0,)])
        report("after the fail-over: pool size %d, all on the new primary "
               "(port %d); connections opened %d, failed connects %d"
               % (stats["size"], self.standby.port,
                  stats["connections_opened"], stats["connections_failed"]))

    def test_read_pool_follows_the_standbys(self):
        # The old primary's address gets the new standby, as when the
        # failed host is rebuilt as a standby of the promoted server.
        old_primary_port = self.primary.port
        read_dsn = multihost_dsn([self.primary, self.standby],
                                 target_session_attrs="prefer-standby")
        pool = self._makeOne(read_dsn, minconn=0, maxconn=2, timeout=30,
                             connect_timeout=2, readonly=True,
                             health_check_after=0.5)

        def where():
            transaction.begin()
            try:
                return in_recovery(pool.connection())
            finally:
                transaction.abort()

        self.assertEqual(where(), (True, self.standby.port))
        self.primary.stop("immediate")
        self.standby.promote()
        after_promotion = where()
        report("read pool (prefer-standby) after the promotion: "
               "in recovery %s, port %s (the promoted server is %s)"
               % (after_promotion + (self.standby.port,)))
        self.assertEqual(after_promotion, (False, self.standby.port),
                         "reads go on, on the only server left")

        again = StandbyServer(self.standby, name="rebuilt",
                              port=old_primary_port).start()
        self.addCleanup(again.cleanup)
        attached = time.monotonic()
        seen = []

        def on_a_standby():
            seen.append(where())
            return seen[-1] == (True, old_primary_port)
        try:
            wait_for(on_a_standby, "the read pool on the new standby",
                     timeout=10 * 0.5)
        finally:
            report("read pool after a new standby was attached on port %d: "
                   "%s after %.1f s (last seen: in recovery %s, port %s)"
                   % (old_primary_port,
                      "on it" if seen and seen[-1][0] else "NOT on it",
                      time.monotonic() - attached,
                      seen[-1][0] if seen else None,
                      seen[-1][1] if seen else None))


class OutageTests(unittest.TestCase):
    """No standby promoted in time: callers wait up to the pool's
    ``timeout``, then fail at once until a server takes writes again."""

    layer = STANDBY_LAYER

    def test_long_outage_fails_fast_then_recovers(self):
        self.layer.primary.stop("immediate")
        # A time-out long enough that a caller who waits it out is far
        # from the "at once" bound below, even on a loaded machine.
        pool = ConnectionPool(self.layer.dsn, name=unique_name("fo"),
                              minconn=0, maxconn=4, timeout=4.0,
                              connect_timeout=2)
        self.addCleanup(close_pool, self, pool)

        def request():
            start = time.monotonic()
            try:
                with pool.checkout() as conn:
                    conn.cursor().execute("SELECT 1")
            except psycopg2.Error as exc:
                return time.monotonic() - start, exc
            return time.monotonic() - start, None

        waited, first_error = request()
        self.assertIsNotNone(first_error)
        wait_for(lambda: pool.stats()["outage_seconds"] > 4.0,
                 "the outage to outlast the pool's timeout")
        later = [request() for _ in range(5)]
        self.assertTrue(all(error is not None for _, error in later))
        self.layer.standby.promote()
        promoted = time.monotonic()
        wait_for(lambda: request()[1] is None, "a request on the new primary",
                 timeout=10)
        resumed = time.monotonic() - promoted
        report("outage longer than timeout=4: the first caller failed after "
               "%.2f s (%s), the next %d at most %.3f s each; after the "
               "promotion a request succeeded within %.2f s"
               % (waited, type(first_error).__name__, len(later),
                  max(t for t, _ in later), resumed))
        # It kept trying while another attempt fitted in its timeout.
        self.assertIn("attempts)", str(first_error))
        self.assertLess(waited, 4 + 2 + 1, "waited past its timeout")
        # At most one connect attempt each (a probe), never a wait up to
        # the timeout.
        self.assertLess(max(t for t, _ in later), 2.0,
                        "a long outage should fail callers at once")
        self.assertLess(resumed, 5.0)
