"""A silent network partition: packets to and from the server are dropped
(no RST, no FIN), as when a switch or a firewall in between fails.

The server listens on 127.0.0.1 port P; an nftables table of this test's
own drops loopback packets to and from P on the output hook, in both
directions. The table is removed whatever happens. This needs root and the
``nft`` program (CI has both): without them the tests fail, saying so;
they are never skipped.
"""
import os
import shutil
import subprocess
import threading
import time
import unittest

import psycopg2
import transaction

from zpgpool import ConnectionPool
from zpgpool import SessionLost
from zpgpool.testing import PRIVATE_POSTGRES_LAYER

from tests.poolhelpers import WAIT
from tests.poolhelpers import backend_pids
from tests.poolhelpers import close_pool
from tests.poolhelpers import query
from tests.poolhelpers import unique_name
from tests.poolhelpers import wait_for
from tests.scaleouthelpers import report as _report


def report(message):
    _report("test_partition", message)


def _nft(*args):
    return subprocess.run(("nft",) + args, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=30,
                          check=False)


class Partition:
    """Drops every packet to and from 127.0.0.1 port ``port`` while
    active; ``heal()`` lets them through again. Only loopback traffic,
    only a table of its own (named after the process)."""

    def __init__(self, port):
        self.port = int(port)
        self.table = "zpgpool_test_%d" % os.getpid()

    @staticmethod
    def unavailable():
        """Why partitions cannot be made here, or None."""
        if os.geteuid() != 0:
            return "it must run as root (nftables rules)"
        if shutil.which("nft") is None:
            return ("the nft program is missing: install nftables "
                    "(apt-get install nftables)")
        return None

    def drop(self):
        self.heal()
        steps = [
            ("add", "table", "inet", self.table),
            ("add", "chain", "inet", self.table, "out",
             "{ type filter hook output priority 0 ; policy accept ; }"),
            ("add", "rule", "inet", self.table, "out", "ip", "daddr",
             "127.0.0.1", "tcp", "dport", str(self.port), "drop"),
            ("add", "rule", "inet", self.table, "out", "ip", "saddr",
             "127.0.0.1", "tcp", "sport", str(self.port), "drop"),
        ]
        for step in steps:
            done = _nft(*step)
            if done.returncode != 0:
                self.heal()
                raise AssertionError("nft %s failed: %s"
                                     % (" ".join(step), done.stdout.strip()))

    def heal(self):
        """Remove the table; never fails for one that is gone."""
        if self.table in _nft("list", "tables").stdout.split():
            _nft("delete", "table", "inet", self.table)


class PartitionTests(unittest.TestCase):

    layer = PRIVATE_POSTGRES_LAYER

    def setUp(self):
        why = Partition.unavailable()
        if why is not None:
            self.fail("The network partition tests cannot run: %s." % why)
        transaction.abort()
        self.addCleanup(transaction.abort)
        self.server = self.layer.server
        self.partition = Partition(self.server.port)
        self.addCleanup(self.partition.heal)
        self.name = unique_name("part")
        # A backend whose client vanished while the path was down, and
        # that has nothing to send, notices only by the server's own
        # keepalives (the system's default: after two hours).
        self.server.configure(tcp_keepalives_idle=1,
                              tcp_keepalives_interval=1,
                              tcp_keepalives_count=3)
        self.addCleanup(self.server.configure, tcp_keepalives_idle=None,
                        tcp_keepalives_interval=None,
                        tcp_keepalives_count=None)

    def _makeOne(self, **dsn_params):
        dsn = self.server.dsn(connect_timeout=2, **dsn_params)
        pool = ConnectionPool(dsn, name=self.name, minconn=0, maxconn=2,
                              health_check_after=0.5)
        self.addCleanup(close_pool, self, pool)
        return pool

    def check_recovery(self, pool):
        """After the partition heals: service resumes, nothing leaked."""
        self.partition.heal()
        start = time.monotonic()
        with pool.checkout(timeout=10) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                self.assertEqual(cur.fetchone(), (1,))
        report("after the partition healed, the next checkout took %.2f s"
               % (time.monotonic() - start))
        stats = pool.stats()
        self.assertEqual(stats["in_use"], 0)
        self.assertEqual(query(self.server.socket_dsn(), "SELECT count(*) "
                               "FROM pg_prepared_xacts"), [(0,)])
        # The backends whose clients vanished end, found by the server's
        # keepalives or retransmissions.
        app = "zpgpool:%s" % self.name
        wait_for(lambda: len(backend_pids(self.server.socket_dsn(), app))
                 <= stats["size"], "the server's dead backends gone",
                 timeout=WAIT)
        report("the server's backends of the lost connections ended %.1f s "
               "after the partition healed" % (time.monotonic() - start))
        self.assertLessEqual(stats["size"], pool.maxconn)

    def test_checkout_of_a_stale_connection_is_bounded(self):
        pool = self._makeOne()
        with pool.checkout() as conn:
            conn.cursor().execute("SELECT 1")
        time.sleep(0.6)          # past health_check_after
        self.partition.drop()
        start = time.monotonic()
        with self.assertRaises(psycopg2.Error) as caught:
            with pool.checkout(timeout=2):
                pass
        elapsed = time.monotonic() - start
        report("checkout(timeout=2) of an idle connection behind a silent "
               "partition (connect_timeout=2): %s after %.2f s"
               % (type(caught.exception).__name__, elapsed))
        self.assertIn(self.name, str(caught.exception))
        self.assertLess(elapsed, 2 + 2 + 1.5, "the checkout was not bounded")
        self.check_recovery(pool)

    def test_statement_sent_into_the_partition_fails(self):
        # tcp_user_timeout bounds how long sent data may stay
        # unacknowledged; the pool's default is 30 s.
        pool = self._makeOne(tcp_user_timeout=3000)
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute("SELECT 1")
        self.partition.drop()
        start = time.monotonic()
        with self.assertRaises(SessionLost) as caught:
            cur.execute("SELECT 2")
        elapsed = time.monotonic() - start
        transaction.abort()
        report("statement sent into a silent partition "
               "(tcp_user_timeout=3000): %s after %.2f s"
               % ("SessionLost", elapsed))
        self.assertIsInstance(caught.exception, psycopg2.OperationalError)
        self.assertLess(elapsed, 3 + 5, "not bounded by tcp_user_timeout")
        self.check_recovery(pool)

    def test_statement_waiting_for_its_answer_fails(self):
        # A statement already sent waits for an answer with nothing
        # unacknowledged: keepalive probes find the dead path, and
        # tcp_user_timeout bounds how long they may go unanswered.
        pool = self._makeOne(tcp_user_timeout=3000, keepalives_idle=1,
                             keepalives_interval=1, keepalives_count=3)
        outcome = {}

        def request():
            transaction.begin()
            cur = pool.connection().cursor()
            try:
                cur.execute("SELECT pg_sleep(1)")
            except Exception as exc:
                outcome["error"] = exc
                outcome["at"] = time.monotonic()
            finally:
                transaction.abort()

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        wait_for(lambda: query(
            self.server.socket_dsn(), "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND query LIKE %s",
            ("zpgpool:%s" % self.name, "%pg_sleep%"))[0][0],
            "the statement running on the server")
        self.partition.drop()
        dropped = time.monotonic()
        thread.join(WAIT)
        self.assertFalse(thread.is_alive(), "the statement hangs")
        error = outcome.get("error")
        self.assertIsInstance(error, SessionLost)
        elapsed = outcome["at"] - dropped
        report("statement waiting for its answer when the partition began "
               "(keepalives 1 s x 3, tcp_user_timeout=3000): %s after %.2f s"
               % ("SessionLost" if isinstance(error, SessionLost)
                  else repr(error), elapsed))
        self.assertLess(elapsed, 3 + 1 + 5, "not bounded by the keepalives")
        self.check_recovery(pool)
