"""zpgpool behind a transaction-mode PgBouncer: nothing one client does to
its session reaches the next client of the same server connection, every
pool option works per transaction, and BEGIN still travels with the first
statement.

Everything talks to a real PgBouncer (zpgpool.testing.PgBouncer) in front
of a real server; threads are real threads.
"""
import random
import re
import threading
import time
import unittest

import psycopg2
import psycopg2.errors
import psycopg2.extras
import transaction

from zpgpool import ConnectionPool
from zpgpool.testing import PostgresLayer
from zpgpool.testing import PgBouncerLayer

from tests.poolhelpers import READ_ONLY_VOTE
from tests.poolhelpers import WAIT
from tests.poolhelpers import close_pool
from tests.poolhelpers import prepared_after_the_check
from tests.poolhelpers import query
from tests.poolhelpers import unique_name
from tests.poolhelpers import wait_for
from tests.scaleouthelpers import PROBE
from tests.scaleouthelpers import SESSION_CHANGES
from tests.scaleouthelpers import ensure_role
from tests.scaleouthelpers import leaked
from tests.scaleouthelpers import report as _report
from tests.scaleouthelpers import run_threads


def report(message):
    _report("test_pgbouncer", message)


#: One server connection for every client: whoever comes next gets the
#: very session the previous transaction ran on.
ONE_SERVER_LAYER = PgBouncerLayer("ONE_SERVER_LAYER", default_pool_size=1)

#: Four server connections shared by many clients.
FOUR_SERVERS_LAYER = PgBouncerLayer("FOUR_SERVERS_LAYER", default_pool_size=4)

#: A server that logs every statement, behind a PgBouncer with one server
#: connection, to count the messages a transaction sends.
_LOGGING_SERVER = PostgresLayer(
    "PGBOUNCER_STATEMENT_LOG_SERVER", private=True,
    settings={"log_statement": "all", "log_min_messages": "log"})
STATEMENT_LOG_BOUNCER_LAYER = PgBouncerLayer(
    "STATEMENT_LOG_BOUNCER_LAYER", postgres_layer=_LOGGING_SERVER,
    default_pool_size=1,
    # No health-check query of PgBouncer's own in the log.
    settings={"server_check_delay": 3600})


class _Base(unittest.TestCase):

    def setUp(self):
        transaction.abort()
        self.addCleanup(transaction.abort)
        ensure_role(self.layer.postgres_dsn)

    def _makeOne(self, dsn=None, **kw):
        kw.setdefault("name", unique_name("pgb"))
        kw.setdefault("minconn", 0)
        pool = ConnectionPool(dsn or self.layer.dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool


class HandOffTests(_Base):
    """The deterministic repro: with one server connection, client A
    changes its session in a transaction while client B waits for that
    connection; B's first statement runs on A's session right after A's
    COMMIT (or ROLLBACK) and must see none of A's changes."""

    layer = ONE_SERVER_LAYER

    def hand_off(self, changes, end="commit", fail=False):
        pool = self._makeOne(maxconn=2)
        a_ready, a_go = threading.Event(), threading.Event()
        seen = {}

        def client_a():
            tm = transaction.manager
            tm.begin()
            cur = pool.connection().cursor()
            cur.execute("SELECT pg_backend_pid()")
            seen["a_pid"] = cur.fetchone()[0]
            for change in changes:
                if callable(change):
                    change(cur)
                else:
                    cur.execute(SESSION_CHANGES[change](1))
            cur.execute(PROBE)
            seen["a_sees"] = cur.fetchone()
            if fail:
                # A failed statement: the transaction can only roll back.
                try:
                    cur.execute("SELECT 1 / 0")
                except psycopg2.errors.DivisionByZero:
                    pass
            a_ready.set()
            a_go.wait(WAIT)
            if end == "commit":
                tm.commit()
            else:
                tm.abort()

        def client_b():
            a_ready.wait(WAIT)
            tm = transaction.manager
            tm.begin()
            cur = pool.connection().cursor()
            # Waits in PgBouncer until A's transaction ends.
            cur.execute(PROBE)
            row = cur.fetchone()
            tm.commit()
            return row

        def release_a():
            a_ready.wait(WAIT)
            bouncer = self.layer.bouncer
            wait_for(lambda: bouncer.show_pool()["cl_waiting"] >= 1,
                     "client B waiting in PgBouncer")
            a_go.set()

        _, row, _ = run_threads([client_a, client_b, release_a])
        # A really changed its session, and B really ran on it.
        self.assertIsNotNone(leaked(seen["a_sees"]), seen["a_sees"])
        self.assertEqual(row[-1], seen["a_pid"], "not the same session")
        self.assertIsNone(leaked(row), "B saw A's session state: %s"
                          % leaked(row))
        self.assertEqual(pool.stats()["in_use"], 0)
        return row

    def test_set_after_commit(self):
        self.hand_off(["set"])

    def test_set_role_after_commit(self):
        self.hand_off(["role"])

    def test_temp_table_after_commit(self):
        self.hand_off(["temp"])

    def test_advisory_lock_after_commit(self):
        self.hand_off(["lock"])

    def test_prepared_statement_after_commit(self):
        self.hand_off(["prepare"])

    def test_everything_after_commit(self):
        self.hand_off(["set", "temp", "lock", "prepare", "role"])

    def test_callproc_set_config_after_commit(self):
        self.hand_off([lambda cur: cur.callproc(
            "set_config", ("zp.test", "client-1", False))])

    def test_callproc_advisory_lock_after_commit(self):
        self.hand_off([lambda cur: cur.callproc("pg_advisory_lock", (7001,))])

    def test_set_after_abort(self):
        self.hand_off(["set"], end="abort")

    def test_set_role_after_abort(self):
        self.hand_off(["role"], end="abort")

    def test_temp_table_after_abort(self):
        self.hand_off(["temp"], end="abort")

    def test_advisory_lock_after_abort(self):
        self.hand_off(["lock"], end="abort")

    def test_prepared_statement_after_abort(self):
        self.hand_off(["prepare"], end="abort")

    def test_everything_after_abort(self):
        self.hand_off(["set", "temp", "lock", "prepare", "role"],
                      end="abort")

    def test_everything_after_a_failed_statement(self):
        # PostgreSQL refuses every statement of a failed transaction but
        # ROLLBACK, and ROLLBACK keeps advisory locks and prepared
        # statements: they must still be gone before B gets the session.
        self.hand_off(["set", "temp", "lock", "prepare", "role"],
                      end="abort", fail=True)

    def test_advisory_lock_after_a_failed_statement(self):
        self.hand_off(["lock"], end="abort", fail=True)

    def test_configure_session_settings_do_not_stick(self):
        # A configure callable runs outside any transaction: behind a
        # transaction-mode PgBouncer its SET lands on whichever server
        # connection is free then, and reaches other clients; the pool's
        # own options and client-side adapters are the way.
        def configure(conn):
            with conn.cursor() as cur:
                cur.execute("SET zp.test = 'from-configure'")
            psycopg2.extras.register_default_json(
                conn, loads=lambda text: ("decoded", text))
        pool = self._makeOne(maxconn=1, configure=configure)
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute("SELECT '{}'::json")
        self.assertEqual(cur.fetchone()[0], ("decoded", "{}"),
                         "a client-side adapter sticks")
        transaction.abort()
        other = psycopg2.connect(self.layer.dsn)
        try:
            other.autocommit = True
            with other.cursor() as c:
                c.execute("SELECT current_setting('zp.test', true)")
                self.assertEqual(c.fetchone()[0], "from-configure",
                                 "configure's SET is another client's now")
                c.execute("RESET zp.test")
        finally:
            other.close()
        report("a configure() SET reached another PgBouncer client; a "
               "client-side adapter stayed with the pool's connection")


class ManyClientsTests(_Base):
    """32 threads on 4 server connections, random session changes in
    every transaction: no transaction sees another client's state."""

    layer = FOUR_SERVERS_LAYER

    THREADS = 32
    PER_THREAD = 50

    def test_no_transaction_sees_another_clients_state(self):
        pool = self._makeOne(maxconn=self.THREADS, timeout=WAIT)
        lock = threading.Lock()
        counts = {"transactions": 0, "saw_other": 0, "aborted": 0,
                  "failed": 0}
        pids = set()
        examples = []

        def client(mark):
            rnd = random.Random(mark)
            tm = transaction.manager
            for _ in range(self.PER_THREAD):
                tm.begin()
                cur = pool.connection().cursor()
                cur.execute(PROBE)
                row = cur.fetchone()
                found = leaked(row)
                names = rnd.sample(sorted(SESSION_CHANGES),
                                   rnd.randint(1, len(SESSION_CHANGES)))
                try:
                    for name in names:
                        cur.execute(SESSION_CHANGES[name](mark))
                except psycopg2.Error as exc:
                    # "prepared statement zp_s already exists", "relation
                    # zp_tmp already exists": another client's leftovers.
                    found = "%s: %s" % (type(exc).__name__, exc)
                    tm.abort()
                    with lock:
                        counts["transactions"] += 1
                        counts["saw_other"] += 1
                        examples.append(found)
                    continue
                cur.execute("SELECT current_setting('zp.test', true)")
                mine = cur.fetchone()[0]
                ending = rnd.random()
                if ending < 0.1:
                    try:
                        cur.execute("SELECT 1 / 0")
                    except psycopg2.errors.DivisionByZero:
                        pass
                    tm.abort()
                elif ending < 0.25:
                    tm.abort()
                else:
                    tm.commit()
                with lock:
                    counts["transactions"] += 1
                    counts["aborted"] += ending < 0.25
                    counts["failed"] += ending < 0.1
                    pids.add(row[-1])
                    if found:
                        counts["saw_other"] += 1
                        examples.append(found)
                    if "set" in names and mine != "client-%d" % mark:
                        examples.append("own SET not seen: %r" % mine)

        start = time.monotonic()
        run_threads([lambda m=m: client(m) for m in range(self.THREADS)])
        elapsed = time.monotonic() - start
        report("%d threads on %d server connections: %d transactions "
               "(%d rolled back, %d of them after a failed statement) in "
               "%.1f s; %d saw another client's session state"
               % (self.THREADS, len(pids), counts["transactions"],
                  counts["aborted"], counts["failed"], elapsed,
                  counts["saw_other"]))
        self.assertEqual(counts["transactions"],
                         self.THREADS * self.PER_THREAD)
        self.assertEqual(examples[:5], [])
        self.assertEqual(counts["saw_other"], 0)
        self.assertLessEqual(len(pids), 4)
        self.assertEqual(pool.stats()["in_use"], 0)


class OptionsTests(_Base):
    """Every pool option works per transaction through PgBouncer, and
    leaves nothing behind on the server connection."""

    layer = ONE_SERVER_LAYER

    SEE = ("SELECT current_setting('transaction_isolation'), "
           "current_setting('transaction_read_only'), "
           "current_setting('transaction_deferrable')")

    def setUp(self):
        super().setUp()
        query(self.layer.postgres_dsn,
              "CREATE TABLE IF NOT EXISTS pgb_items (v text)")
        query(self.layer.postgres_dsn, "TRUNCATE pgb_items")

    def see(self, pool):
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute(self.SEE)
        row = cur.fetchone()
        transaction.abort()
        return row

    def test_transaction_characteristics(self):
        plain = self._makeOne(maxconn=1)
        cases = [
            (dict(isolation_level="SERIALIZABLE"),
             ("serializable", "off", "off")),
            (dict(isolation_level="REPEATABLE READ", readonly=True),
             ("repeatable read", "on", "off")),
            (dict(isolation_level="SERIALIZABLE", readonly=True,
                  deferrable=True), ("serializable", "on", "on")),
        ]
        for options, expected in cases:
            pool = self._makeOne(maxconn=1, **options)
            self.assertEqual(self.see(pool), expected, options)
            # The next client of the one server connection gets the
            # server's defaults again.
            self.assertEqual(self.see(plain),
                             ("read committed", "off", "off"), options)

    def test_readonly_refuses_writes(self):
        pool = self._makeOne(maxconn=1, readonly=True)
        transaction.begin()
        cur = pool.connection().cursor()
        with self.assertRaises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("INSERT INTO pgb_items VALUES ('no')")
        transaction.abort()

    def test_two_phase(self):
        self.assertGreater(int(query(
            self.layer.postgres_dsn,
            "SHOW max_prepared_transactions")[0][0]), 0)
        pool = self._makeOne(maxconn=1, twophase=True)
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute("SET zp.test = 'two-phase'")
        cur.execute("INSERT INTO pgb_items VALUES ('2pc')")
        gid = pool.thread_local.state.dm.xid
        transaction.commit()
        self.assertEqual(query(self.layer.postgres_dsn,
                               "SELECT v FROM pgb_items"), [("2pc",)])
        self.assertEqual(query(self.layer.postgres_dsn,
                               "SELECT gid FROM pg_prepared_xacts "
                               "WHERE gid = %s", (gid,)), [])
        # Rolled back after PREPARE: nothing stays either.
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO pgb_items VALUES ('vetoed')")
        dm = pool.thread_local.state.dm
        dm.tpc_begin(transaction.get())
        dm.tpc_vote(transaction.get())
        self.assertEqual(len(query(self.layer.postgres_dsn,
                                   "SELECT gid FROM pg_prepared_xacts "
                                   "WHERE gid = %s", (dm.xid,))), 1)
        transaction.abort()
        self.assertEqual(query(self.layer.postgres_dsn,
                               "SELECT count(*) FROM pg_prepared_xacts"),
                         [(0,)])
        self.assertEqual(query(self.layer.postgres_dsn,
                               "SELECT v FROM pgb_items"), [("2pc",)])
        plain = self._makeOne(maxconn=1)
        transaction.begin()
        cur = plain.connection().cursor()
        cur.execute(PROBE)
        self.assertIsNone(leaked(cur.fetchone()))
        transaction.abort()

    def test_savepoints(self):
        pool = self._makeOne(maxconn=1)
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO pgb_items VALUES ('kept')")
        savepoint = transaction.savepoint()
        cur.execute("INSERT INTO pgb_items VALUES ('undone')")
        savepoint.rollback()
        cur.execute("INSERT INTO pgb_items VALUES ('after')")
        transaction.commit()
        self.assertEqual(sorted(query(self.layer.postgres_dsn,
                                      "SELECT v FROM pgb_items")),
                         [("after",), ("kept",)])


class BankTests(_Base):
    """Money moves between accounts under SERIALIZABLE, with conflicts
    retried by ``transaction.manager.attempts()`` as Zope's publisher
    would: the total never changes."""

    layer = FOUR_SERVERS_LAYER

    ACCOUNTS = 4
    THREADS = 16
    TRANSFERS = 15

    def test_total_unchanged_under_serializable_retries(self):
        dsn = self.layer.postgres_dsn
        query(dsn, "DROP TABLE IF EXISTS pgb_bank")
        query(dsn, "CREATE TABLE pgb_bank (id int PRIMARY KEY, "
                   "balance int NOT NULL)")
        query(dsn, "INSERT INTO pgb_bank SELECT n, 100 FROM "
                   "generate_series(1, %s) n", (self.ACCOUNTS,))
        pool = self._makeOne(maxconn=self.THREADS,
                             isolation_level="SERIALIZABLE")
        lock = threading.Lock()
        counts = {"transfers": 0, "retries": 0}

        def client(mark):
            rnd = random.Random(mark)
            for _ in range(self.TRANSFERS):
                a, b = rnd.sample(range(1, self.ACCOUNTS + 1), 2)
                amount = rnd.randint(1, 20)
                tries = 0
                for attempt in transaction.manager.attempts(50):
                    with attempt:
                        tries += 1
                        cur = pool.connection().cursor()
                        cur.execute("SELECT balance FROM pgb_bank "
                                    "WHERE id = %s", (a,))
                        balance = cur.fetchone()[0]
                        cur.execute("UPDATE pgb_bank SET balance = %s "
                                    "WHERE id = %s", (balance - amount, a))
                        cur.execute("UPDATE pgb_bank SET balance = "
                                    "balance + %s WHERE id = %s",
                                    (amount, b))
                with lock:
                    counts["transfers"] += 1
                    counts["retries"] += tries - 1

        run_threads([lambda m=m: client(m) for m in range(self.THREADS)])
        (total, count), = query(dsn, "SELECT sum(balance), count(*) "
                                     "FROM pgb_bank")
        report("bank: %d transfers by %d threads over %d accounts, %d "
               "serialization retries; total %d (was %d)"
               % (counts["transfers"], self.THREADS, self.ACCOUNTS,
                  counts["retries"], total, 100 * self.ACCOUNTS))
        self.assertEqual(counts["transfers"], self.THREADS * self.TRANSFERS)
        self.assertEqual((total, count), (100 * self.ACCOUNTS,
                                          self.ACCOUNTS))
        self.assertGreater(counts["retries"], 0,
                           "no conflict happened: the test shows nothing")


_STATEMENT_LINE = re.compile(r"\[(\d+)\] \S*@\S* LOG:  statement: (.*)$")


class MessageCountTests(_Base):
    """The message counts of tests/test_roundtrips.py, through PgBouncer:
    the server's statement log shows what reached it."""

    layer = STATEMENT_LOG_BOUNCER_LAYER

    def setUp(self):
        super().setUp()
        query(self.layer.postgres_dsn,
              "CREATE TABLE IF NOT EXISTS pgb_rt (v text)")

    def mark(self, pool):
        """Warm ``pool`` up; remember the one server backend and where
        the log ends."""
        transaction.begin()
        cur = pool.connection().cursor()
        cur.execute("SELECT pg_backend_pid()")
        self.pid = cur.fetchone()[0]
        transaction.commit()
        log_file = self.layer.postgres_layer.server.log_file
        with open(log_file, encoding="utf-8") as f:
            f.seek(0, 2)
            self.offset = f.tell()

    def sent(self):
        log_file = self.layer.postgres_layer.server.log_file
        with open(log_file, encoding="utf-8") as f:
            f.seek(self.offset)
            lines = f.read().splitlines()
        return [m.group(2) for m in map(_STATEMENT_LINE.search, lines)
                if m and int(m.group(1)) == self.pid]

    def test_one_statement_is_two_messages(self):
        pool = self._makeOne(maxconn=1)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO pgb_rt VALUES ('a')")
        transaction.commit()
        sent = self.sent()
        report("through PgBouncer, one statement and COMMIT: %d messages"
               % len(sent))
        self.assertEqual(sent, ["BEGIN; INSERT INTO pgb_rt VALUES ('a')",
                                "COMMIT"])

    def test_two_phase_is_three_messages(self):
        pool = self._makeOne(maxconn=1, twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO pgb_rt VALUES ('b')")
        gid = pool.thread_local.state.dm.xid
        transaction.commit()
        sent = self.sent()
        report("through PgBouncer, one statement, two-phase: %d messages"
               % len(sent))
        self.assertEqual(sent, [
            "BEGIN; INSERT INTO pgb_rt VALUES ('b')",
            "PREPARE TRANSACTION '%s'" % gid,
            "COMMIT PREPARED '%s'" % gid])

    def test_two_phase_that_only_read_commits_at_once(self):
        pool = self._makeOne(maxconn=1, twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SELECT count(*) FROM pgb_rt")
        transaction.commit()
        sent = self.sent()
        report("through PgBouncer, one read, two-phase: %d messages"
               % len(sent))
        self.assertEqual(sent, [
            "BEGIN; SELECT count(*) FROM pgb_rt",
            READ_ONLY_VOTE])

    def test_two_phase_read_that_wrote_is_prepared(self):
        # The check fails inside the transaction; the savepoint it set
        # keeps the transaction (and so PgBouncer's server connection)
        # for the PREPARE that follows.
        pool = self._makeOne(maxconn=1, twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SELECT txid_current()")
        gid = pool.thread_local.state.dm.xid
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN; SELECT txid_current()",
            READ_ONLY_VOTE] + prepared_after_the_check(gid))
        self.assertEqual(query(self.layer.postgres_dsn, "SELECT count(*) "
                               "FROM pg_prepared_xacts"), [(0,)])

    def test_session_change_is_undone_in_the_commit_s_message(self):
        # The reset and COMMIT as one message: PgBouncer cannot hand the
        # server connection to another client between them.
        pool = self._makeOne(maxconn=1)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SET zp.test = 'x'")
        transaction.commit()
        sent = self.sent()
        self.assertEqual(len(sent), 2, sent)
        self.assertEqual(sent[0], "BEGIN; SET zp.test = 'x'")
        self.assertIn("RESET ALL", sent[1])
        self.assertTrue(sent[1].endswith("; COMMIT"), sent)
