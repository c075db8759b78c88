"""What a managed transaction sends to the server, message by message.

The transaction's BEGIN travels in the same message as its first
statement; COMMIT, PREPARE TRANSACTION and COMMIT PREPARED are one message
each, and a two-phase transaction that only read asks whether it wrote in
its COMMIT's message. The server counts: every test reads the statements
it logged (``log_statement = all``) for the pool's backend.
"""
import re
import threading
import time
import unittest

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import psycopg2.extras
from psycopg2 import sql
import transaction

from zpgpool.connection import KIND_QUERIES
from zpgpool.statements import ONE_PHASE_SESSION_RESET
from zpgpool.statements import SESSION_RESET
from zpgpool.testing import PostgresLayer

from tests.poolhelpers import READ_ONLY_VOTE
from tests.poolhelpers import WAIT
from tests.poolhelpers import prepared_after_the_check
from tests.poolhelpers import start
from tests.poolhelpers import wait_for


STATEMENT_LOG_LAYER = PostgresLayer(
    "STATEMENT_LOG_LAYER", private=True,
    settings={"log_statement": "all", "log_min_messages": "error"},
    module=__name__)

_STATEMENT_LINE = re.compile(r"\[(\d+)\] \S*@\S* LOG:  statement: (.*)$")
_ERROR_LINE = re.compile(r"\[(\d+)\] \S*@\S* ERROR:  (.*)$")


class _Base(unittest.TestCase):

    layer = STATEMENT_LOG_LAYER

    def setUp(self):
        from zpgpool import ConnectionPool
        transaction.abort()
        self.dsn = self.layer.dsn
        admin = psycopg2.connect(self.dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS rt_items")
            cur.execute("CREATE TABLE rt_items (id serial PRIMARY KEY, "
                        "value text)")
        admin.close()
        self.pool = ConnectionPool(self.dsn, name="rt", maxconn=2)
        self.addCleanup(self.pool.closeall)
        self.addCleanup(transaction.abort)

    def _makeOne(self, **kw):
        from zpgpool import ConnectionPool
        kw.setdefault("name", "rt2")
        pool = ConnectionPool(self.dsn, **kw)
        self.addCleanup(pool.closeall)
        return pool

    def mark(self, pool=None):
        """Start counting what ``pool``'s connection sends from now."""
        conn = (pool or self.pool).connection()
        transaction.abort()
        self.pid = conn.get_backend_pid()
        with open(self.layer.server.log_file, encoding="utf-8") as f:
            f.seek(0, 2)
            self.offset = f.tell()

    def _logged(self):
        with open(self.layer.server.log_file, encoding="utf-8") as f:
            f.seek(self.offset)
            return f.read().splitlines()

    def errors(self):
        """The errors the server logged for the marked backend since
        mark()."""
        return [match.group(2) for match in map(_ERROR_LINE.search,
                                                self._logged())
                if match and int(match.group(1)) == self.pid]

    def sent(self):
        """The messages the marked backend sent since mark(), as logged."""
        lines = self._logged()
        found = []
        for line in lines:
            match = _STATEMENT_LINE.search(line)
            if match and int(match.group(1)) == self.pid:
                found.append(match.group(2))
            elif found and not re.match(r"\d{4}-\d\d-\d\d ", line):
                found[-1] += "\n" + line.strip()   # a statement's next line
        return found


class MessageCountTests(_Base):

    def test_one_statement_is_two_messages(self):
        self.mark()
        cur = self.pool.connection().cursor()
        cur.execute("INSERT INTO rt_items (value) VALUES ('a')")
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN; INSERT INTO rt_items (value) VALUES ('a')", "COMMIT"])

    def test_k_statements_are_k_plus_one_messages(self):
        self.mark()
        cur = self.pool.connection().cursor()
        for n in range(5):
            cur.execute("INSERT INTO rt_items (value) VALUES (%s)", (str(n),))
        transaction.commit()
        sent = self.sent()
        self.assertEqual(len(sent), 6, sent)
        self.assertTrue(sent[0].startswith("BEGIN; INSERT"), sent)
        self.assertEqual(sent[-1], "COMMIT")

    def test_two_phase_is_three_messages(self):
        pool = self._makeOne(twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO rt_items (value) VALUES ('2pc')")
        gid = pool.thread_local.state.dm.xid
        self.assertEqual(transaction.get().extension["zpgpool:rt2:gid"], gid)
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN; INSERT INTO rt_items (value) VALUES ('2pc')",
            "PREPARE TRANSACTION '%s'" % gid, "COMMIT PREPARED '%s'" % gid])

    def test_two_phase_that_only_read_is_two_messages_no_prepare(self):
        # The server is asked whether the transaction wrote, in the message
        # of its COMMIT; it did not, so it commits at once (no PREPARE, no
        # COMMIT PREPARED): as many messages as one-phase.
        pool = self._makeOne(twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SELECT count(*) FROM rt_items")
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN; SELECT count(*) FROM rt_items",
            READ_ONLY_VOTE])
        self.assertEqual(self.errors(), [])

    def test_two_phase_read_that_wrote_is_four_messages(self):
        # Only when a statement that looks like a read wrote after all
        # (here: it takes a transaction id) does the question cost one:
        # its answer stops the message before COMMIT, and the PREPARE
        # first rolls back to the savepoint the question set.
        pool = self._makeOne(twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SELECT txid_current()")
        gid = pool.thread_local.state.dm.xid
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN; SELECT txid_current()",
            READ_ONLY_VOTE] + prepared_after_the_check(gid))
        # The check's answer, in the server's log.
        self.assertEqual(self.errors(), ["division by zero"])

    def test_two_phase_session_change_is_undone_in_prepare_s_message(self):
        pool = self._makeOne(twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SET zp.test = 'x'")
        gid = pool.thread_local.state.dm.xid
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN; SET zp.test = 'x'",
            SESSION_RESET + "; PREPARE TRANSACTION '%s'" % gid,
            "COMMIT PREPARED '%s'" % gid])
        cur = pool.connection().cursor()
        cur.execute("SELECT current_setting('zp.test', true)")
        self.assertEqual(cur.fetchone(), ("",))

    def test_two_phase_held_cursor_over_a_read_that_wrote(self):
        # A named cursor is held, so the transaction changed the session;
        # its query looks like a read, so the vote checks whether it wrote.
        # The reset comes before the check's savepoint: rolling back to
        # that savepoint for the PREPARE keeps it done.
        pool = self._makeOne(twophase=True)
        self.mark(pool)
        cur = pool.connection().cursor("held")
        cur.execute("SELECT txid_current()")
        self.assertEqual(len(cur.fetchall()), 1)
        gid = pool.thread_local.state.dm.xid
        transaction.commit()
        sent = self.sent()
        self.assertEqual(sent[0], "BEGIN")
        self.assertTrue(sent[1].startswith('DECLARE "held" CURSOR WITH HOLD'),
                        sent)
        self.assertEqual(sent[-3:], [SESSION_RESET + "; " + READ_ONLY_VOTE]
                         + prepared_after_the_check(gid))
        cur = pool.connection().cursor()
        cur.execute("SELECT count(*) FROM pg_cursors")
        self.assertEqual(cur.fetchone(), (0,))

    def test_empty_transaction_sends_nothing(self):
        self.mark()
        self.pool.connection()
        transaction.commit()
        self.assertEqual(self.sent(), [])

    def test_abort_is_one_rollback(self):
        self.mark()
        cur = self.pool.connection().cursor()
        cur.execute("INSERT INTO rt_items (value) VALUES ('gone')")
        transaction.abort()
        self.assertEqual(self.sent(), [
            "BEGIN; INSERT INTO rt_items (value) VALUES ('gone')",
            "ROLLBACK"])

    def test_transaction_options_travel_with_begin(self):
        pool = self._makeOne(isolation_level="SERIALIZABLE", readonly=True,
                             deferrable=True)
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SELECT current_setting('transaction_isolation'), "
                    "current_setting('transaction_read_only'), "
                    "current_setting('transaction_deferrable')")
        self.assertEqual(cur.fetchone(), ("serializable", "on", "on"))
        with self.assertRaises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("INSERT INTO rt_items (value) VALUES ('no')")
        transaction.abort()
        sent = self.sent()
        self.assertTrue(sent[0].startswith(
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE; "
            "SELECT current_setting"), sent)
        # Never as session settings.
        self.assertFalse([s for s in sent if s.startswith("SET")], sent)

    def test_savepoint_as_first_statement(self):
        self.mark()
        conn = self.pool.connection()
        savepoint = transaction.savepoint()
        cur = conn.cursor()
        cur.execute("INSERT INTO rt_items (value) VALUES ('undone')")
        savepoint.rollback()
        cur.execute("INSERT INTO rt_items (value) VALUES ('kept')")
        transaction.commit()
        sent = self.sent()
        self.assertTrue(re.match(r"BEGIN; SAVEPOINT \"zpgpool_sp_\d+\"$",
                                 sent[0]), sent)
        self.assertEqual(len(sent), 5, sent)
        cur = self.pool.connection().cursor()
        cur.execute("SELECT value FROM rt_items")
        self.assertEqual(cur.fetchall(), [("kept",)])


class StatementKindTests(_Base):
    """The caller sees its own statement's results, whatever its form."""

    def _cursor(self, **kw):
        self.mark()
        return self.pool.connection().cursor(**kw)

    def test_parameters(self):
        cur = self._cursor()
        cur.execute("SELECT %s::int + %s, %s", (1, 2, "x%s"))
        self.assertEqual(cur.fetchone(), (3, "x%s"))
        transaction.abort()
        cur = self._cursor()
        cur.execute("SELECT %(a)s::text || %(a)s", {"a": "ab"})
        self.assertEqual(cur.fetchone(), ("abab",))
        self.assertEqual(cur.rowcount, 1)
        self.assertEqual(cur.statusmessage, "SELECT 1")
        self.assertEqual([d.name for d in cur.description], ["?column?"])
        self.assertEqual(len(self.sent()), 1)

    def test_bytes_and_composable(self):
        cur = self._cursor()
        cur.execute(b"SELECT 'bytes'")
        self.assertEqual(cur.fetchone(), ("bytes",))
        transaction.abort()
        cur = self._cursor()
        cur.execute(sql.SQL("SELECT {} FROM {}").format(
            sql.Literal("composed"), sql.Identifier("rt_items")))
        self.assertEqual(cur.fetchall(), [])
        self.assertEqual(cur.rowcount, 0)
        transaction.abort()
        self.assertEqual(self.sent()[0],
                         "BEGIN; SELECT 'composed' FROM \"rt_items\"")

    def test_rowcount_and_statusmessage_of_a_write(self):
        cur = self._cursor()
        cur.execute("INSERT INTO rt_items (value) SELECT g::text FROM "
                    "generate_series(1, 3) g")
        self.assertEqual(cur.rowcount, 3)
        self.assertEqual(cur.statusmessage, "INSERT 0 3")
        self.assertIsNone(cur.description)
        transaction.commit()

    def test_cursor_factories(self):
        for factory, expected in (
                (psycopg2.extras.DictCursor, lambda r: r["v"] == 7),
                (psycopg2.extras.RealDictCursor, lambda r: r == {"v": 7}),
                (psycopg2.extras.NamedTupleCursor, lambda r: r.v == 7)):
            cur = self._cursor(cursor_factory=factory)
            cur.execute("SELECT 7 AS v")
            row = cur.fetchone()
            self.assertTrue(expected(row), (factory, row))
            self.assertIsInstance(cur, factory)
            transaction.abort()
            self.assertEqual(self.sent(), ["BEGIN; SELECT 7 AS v",
                                           "ROLLBACK"])

    def test_a_factory_s_own_execute_arguments_reach_it(self):
        # A cursor class whose execute takes more than psycopg2's gets
        # them, positional or by keyword, with BEGIN still in the message.
        seen = []

        class Tagged(psycopg2.extensions.cursor):
            def execute(self, query, vars=None, tag=None):
                seen.append(tag)
                return super().execute(query, vars)

        cur = self._cursor(cursor_factory=Tagged)
        cur.execute("SELECT %s", (1,), "first")
        cur.execute("SELECT %s", (2,), tag="second")
        self.assertEqual(cur.fetchone(), (2,))
        transaction.abort()
        self.assertEqual(seen, ["first", "second"])
        self.assertEqual(self.sent(), ["BEGIN; SELECT 1", "SELECT 2",
                                       "ROLLBACK"])

    def test_a_changed_cursor_factory_is_followed(self):
        # conn.cursor() makes a cursor of the connection's cursor_factory
        # whenever it changes, managed all the same (BEGIN with the first
        # statement, inside the transaction manager's transaction).
        self.mark()
        conn = self.pool.connection()
        self.addCleanup(setattr, conn, "cursor_factory", None)
        conn.cursor_factory = psycopg2.extras.RealDictCursor
        cur = conn.cursor()
        cur.execute("SELECT 7 AS v")
        self.assertEqual(cur.fetchone(), {"v": 7})
        conn.cursor_factory = None
        cur = conn.cursor()
        cur.execute("SELECT 8 AS v")
        self.assertEqual(cur.fetchone(), (8,))
        transaction.commit()
        conn.cursor_factory = psycopg2.extras.NamedTupleCursor
        cur = self.pool.connection().cursor()
        cur.execute("SELECT 9 AS v")
        self.assertEqual(cur.fetchone().v, 9)
        transaction.abort()
        self.assertEqual(self.sent(), [
            "BEGIN; SELECT 7 AS v", "SELECT 8 AS v", "COMMIT",
            "BEGIN; SELECT 9 AS v", "ROLLBACK"])

    def test_connection_factories_choose_the_cursor(self):
        # A connection_factory's own cursor() is honoured on a managed
        # connection too, as on one from getconn(), and BEGIN still goes
        # with the first statement.
        import io
        pool = self._makeOne(name="rt_dict", connect_kwargs={
            "connection_factory": psycopg2.extras.RealDictConnection})
        self.mark(pool)
        cur = pool.connection().cursor()
        cur.execute("SELECT 7 AS v")
        self.assertEqual(cur.fetchone(), {"v": 7})
        transaction.commit()
        self.assertEqual(self.sent(), ["BEGIN; SELECT 7 AS v", "COMMIT"])
        pool = self._makeOne(name="rt_log", connect_kwargs={
            "connection_factory": psycopg2.extras.LoggingConnection})
        log = io.StringIO()
        pool.connection().initialize(log)
        cur = pool.connection().cursor()
        cur.execute("SELECT 'logged'")
        transaction.commit()
        self.assertIn("SELECT 'logged'", log.getvalue())

    def test_error_class_pgcode_and_diag_are_the_statements(self):
        cur = self._cursor()
        with self.assertRaises(psycopg2.errors.DivisionByZero) as caught:
            cur.execute("SELECT 1 / 0")
        self.assertEqual(caught.exception.pgcode, "22012")
        self.assertEqual(caught.exception.diag.message_primary,
                         "division by zero")
        conn = self.pool.connection()
        self.assertEqual(conn.get_transaction_status(),
                         ext.TRANSACTION_STATUS_INERROR)
        transaction.abort()

    def test_syntax_error_in_the_first_statement(self):
        cur = self._cursor()
        with self.assertRaises(psycopg2.errors.SyntaxError):
            cur.execute("SELEC 1")
        # The message was refused whole, BEGIN with it.
        transaction.abort()
        cur = self.pool.connection().cursor()
        cur.execute("SELECT 2")
        self.assertEqual(cur.fetchone(), (2,))
        transaction.commit()

    def test_notices_reach_the_connection(self):
        cur = self._cursor()
        conn = self.pool.connection()
        del conn.notices[:]
        cur.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        self.assertEqual(len(conn.notices), 1, conn.notices)
        self.assertIn("hello", conn.notices[0])
        transaction.abort()

    def test_query_shows_the_begin(self):
        cur = self._cursor()
        cur.execute("SELECT 1")
        self.assertEqual(cur.query, b"BEGIN; SELECT 1")
        cur.execute("SELECT 2")
        self.assertEqual(cur.query, b"SELECT 2")
        transaction.abort()

    def test_managed_connection_reads_as_not_autocommit(self):
        conn = self.pool.connection()
        self.assertFalse(conn.autocommit)
        transaction.abort()


class SeparateBeginTests(_Base):
    """Where the statement cannot carry it, BEGIN goes alone first."""

    def test_executemany(self):
        self.mark()
        cur = self.pool.connection().cursor()
        cur.executemany("INSERT INTO rt_items (value) VALUES (%s)",
                        [("a",), ("b",)])
        transaction.commit()
        self.assertEqual(self.sent(), [
            "BEGIN", "INSERT INTO rt_items (value) VALUES ('a')",
            "INSERT INTO rt_items (value) VALUES ('b')", "COMMIT"])

    def test_callproc(self):
        self.mark()
        cur = self.pool.connection().cursor()
        cur.callproc("upper", ("abc",))
        self.assertEqual(cur.fetchone(), ("ABC",))
        transaction.abort()
        sent = self.sent()
        self.assertEqual(sent[0], "BEGIN")
        self.assertEqual(len(sent), 3, sent)

    def test_copy(self):
        import io
        self.mark()
        cur = self.pool.connection().cursor()
        cur.copy_expert("COPY rt_items (value) FROM STDIN",
                        io.StringIO("x\ny\n"))
        out = io.StringIO()
        cur.copy_to(out, "rt_items", columns=("value",))
        transaction.commit()
        self.assertEqual(out.getvalue(), "x\ny\n")
        self.assertEqual(self.sent()[0], "BEGIN")

    def test_query_of_a_str_subclass_is_read_as_a_str(self):
        # Its BEGIN joins it, and the session change it makes is undone.
        class Query(str):
            pass

        self.mark()
        cur = self.pool.connection().cursor()
        cur.execute(Query("SET zp.test = 'x'"))
        transaction.commit()
        self.assertEqual(self.sent(), ["BEGIN; SET zp.test = 'x'",
                                       ONE_PHASE_SESSION_RESET + "; COMMIT"])

    def test_named_cursor(self):
        self.mark()
        conn = self.pool.connection()
        cur = conn.cursor("big")
        cur.execute("SELECT g FROM generate_series(1, 10) g")
        self.assertEqual(cur.fetchmany(3), [(1,), (2,), (3,)])
        self.assertEqual(len(cur.fetchall()), 7)
        transaction.commit()
        sent = self.sent()
        self.assertEqual(sent[0], "BEGIN")
        self.assertTrue(sent[1].startswith('DECLARE "big" CURSOR WITH HOLD'),
                        sent)
        # Closed before COMMIT (by the session reset in COMMIT's message,
        # which begins CLOSE ALL), as a cursor without hold would be by it.
        self.assertEqual(sent[-1], ONE_PHASE_SESSION_RESET + "; COMMIT")
        cur = self.pool.connection().cursor()
        cur.execute("SELECT count(*) FROM pg_cursors")
        self.assertEqual(cur.fetchone(), (0,))

    def test_statement_that_controls_the_transaction(self):
        self.mark()
        cur = self.pool.connection().cursor()
        cur.execute("START TRANSACTION")
        transaction.abort()
        self.assertEqual(self.sent(), ["BEGIN", "START TRANSACTION",
                                       "ROLLBACK"])


class HandBackTests(_Base):
    """A managed connection that leaves the transaction integration is a
    plain psycopg2 connection again."""

    def test_lent_parked_connection_is_transactional_for_getconn(self):
        pool = self._makeOne(maxconn=1, timeout=5)
        done = threading.Event()

        def use():
            cur = pool.connection().cursor()
            cur.execute("SELECT 1")
            transaction.commit()    # parked, bound to this thread
            done.set()

        thread = threading.Thread(target=use)
        thread.start()
        self.assertTrue(done.wait(WAIT))
        conn = pool.getconn()       # lent by the parked thread
        self.assertFalse(conn.autocommit)
        cur = conn.cursor()
        cur.execute("INSERT INTO rt_items (value) VALUES ('rolled back')")
        conn.rollback()
        cur.execute("SELECT count(*) FROM rt_items")
        self.assertEqual(cur.fetchone(), (0,))
        conn.rollback()
        pool.putconn(conn)
        thread.join(WAIT)

    def test_thread_ending_mid_transaction_rolls_back(self):
        pool = self._makeOne(maxconn=1, timeout=5)

        def use():
            cur = pool.connection().cursor()
            cur.execute("INSERT INTO rt_items (value) VALUES ('never')")

        thread = threading.Thread(target=use)
        thread.start()
        thread.join(WAIT)
        conn = pool.getconn()
        self.assertEqual(conn.get_transaction_status(),
                         ext.TRANSACTION_STATUS_IDLE)
        self.assertFalse(conn.autocommit)
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM rt_items")
        self.assertEqual(cur.fetchone(), (0,))
        conn.rollback()
        pool.putconn(conn)


class GetconnReturnTests(_Base):
    """What a return through putconn() sends: nothing, unless the borrower
    changed its server session; then one DISCARD ALL (and what the pool's
    configure sends again)."""

    def borrow(self, pool, statements, commit=True):
        """Run ``statements`` on ``pool``'s only connection, return it,
        and give what the server logged for it from the first statement
        on, return included."""
        conn = pool.getconn()
        self.pid = conn.get_backend_pid()
        with open(self.layer.server.log_file, encoding="utf-8") as f:
            f.seek(0, 2)
            self.offset = f.tell()
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
        if commit:
            conn.commit()
        pool.putconn(conn)
        return self.sent()

    def test_a_return_that_changed_nothing_sends_nothing(self):
        pool = self._makeOne(maxconn=1)
        work = ["SET LOCAL work_mem = '7MB'", "SELECT 1"]
        self.assertEqual(self.borrow(pool, work),
                         ["BEGIN"] + work + ["COMMIT"])
        self.assertEqual(self.borrow(pool, ["SELECT 1"], commit=False),
                         ["BEGIN", "SELECT 1", "ROLLBACK"])

    def test_a_changed_session_is_reset_once(self):
        pool = self._makeOne(maxconn=1)
        work = ["SET work_mem = '7MB'", "CREATE TEMP TABLE rt_tmp (x int)"]
        self.assertEqual(self.borrow(pool, work),
                         ["BEGIN"] + work + ["COMMIT", "DISCARD ALL"])
        self.assertEqual(self.borrow(pool, work, commit=False),
                         ["BEGIN"] + work + ["ROLLBACK", "DISCARD ALL"])
        # The next borrower that changes nothing pays nothing.
        self.assertEqual(self.borrow(pool, ["SELECT 1"]),
                         ["BEGIN", "SELECT 1", "COMMIT"])

    def test_configure_s_own_settings_are_no_change(self):
        pool = self._makeOne(maxconn=1, configure=_set_work_mem)
        self.assertEqual(self.borrow(pool, ["SELECT 1"]),
                         ["BEGIN", "SELECT 1", "COMMIT"])
        # A borrower's change: the reset, then configure's statement again.
        self.assertEqual(self.borrow(pool, ["SET search_path TO public"]),
                         ["BEGIN", "SET search_path TO public", "COMMIT",
                          "DISCARD ALL", "SET work_mem = '5MB'"])
        self.assertEqual(self.borrow(pool, ["SHOW work_mem"]),
                         ["BEGIN", "SHOW work_mem", "COMMIT"])
        # And the next change is seen again.
        self.assertEqual(self.borrow(pool, ["SET search_path TO public"]),
                         ["BEGIN", "SET search_path TO public", "COMMIT",
                          "DISCARD ALL", "SET work_mem = '5MB'"])


class KindRecheckTests(_Base):
    """A pool that asks for a kind of server (target_session_attrs) pings
    a connection idle longer than health_check_after before handing it
    out, and one in steady use as often, since its server may change kind
    (a failover) while it is in use: as often, and not more."""

    ping = KIND_QUERIES["read-write"]

    def _makeKindPool(self, **kw):
        from zpgpool import ConnectionPool
        pool = ConnectionPool(
            ext.make_dsn(self.dsn, target_session_attrs="read-write"),
            name="rt-kind", maxconn=1, health_check_after=0.3, **kw)
        self.addCleanup(pool.closeall)
        return pool

    def count_from_here(self, conn):
        self.pid = conn.get_backend_pid()
        with open(self.layer.server.log_file, encoding="utf-8") as f:
            f.seek(0, 2)
            self.offset = f.tell()

    def test_checked_once_then_not_again_at_once(self):
        pool = self._makeKindPool()
        conn = pool.getconn()
        self.count_from_here(conn)
        pool.putconn(conn)
        time.sleep(0.4)     # idle past health_check_after
        for _ in range(3):
            pool.putconn(pool.getconn())
        self.assertEqual(self.sent(), [self.ping])

    def test_a_connection_in_steady_use_is_rechecked(self):
        pool = self._makeKindPool()
        conn = pool.getconn()
        self.count_from_here(conn)
        pool.putconn(conn)
        # Never idle for health_check_after, for over three times that.
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            pool.putconn(pool.getconn())
            time.sleep(0.05)
        self.assertIn(self.ping, self.sent())

    def test_a_threads_connection_in_steady_use_is_rechecked(self):
        # The same for the connection a thread keeps between its
        # transactions (parked, and taken back at each).
        pool = self._makeKindPool()
        self.count_from_here(pool.connection())
        transaction.abort()
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            pool.connection().cursor().execute("SELECT 1")
            transaction.commit()
            time.sleep(0.05)
        self.assertIn(self.ping, self.sent())

    def test_a_connection_handed_from_caller_to_waiter_is_rechecked(self):
        # The same for a connection that never rests: each return hands it
        # straight to a caller waiting for it.
        pool = self._makeKindPool(timeout=WAIT)
        conn = pool.getconn()
        self.count_from_here(conn)
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            taker = start(self, pool.getconn)
            wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
            time.sleep(0.05)
            pool.putconn(conn)
            conn = taker.finish(self)
        pool.putconn(conn)
        self.assertIn(self.ping, self.sent())


def _set_work_mem(conn):
    """A pool's configure callable that changes the session."""
    with conn.cursor() as cur:
        cur.execute("SET work_mem = '5MB'")
