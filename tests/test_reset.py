"""A connection that changes hands through getconn()/putconn() comes to
its next borrower as the pool handed it out: whatever its last borrower
did to its server session (settings, temporary tables, LISTEN, prepared
statements, held cursors, advisory locks, the client encoding) and to its
client side (typecasters, the notices and notifies lists, a two-phase
transaction psycopg2 still holds) is gone, and what the pool's own
``configure`` set is back.

Every test checks on the very connection (``assertIs``) and, for the
server side, asks the server itself. A hand-over cut short by an error
that is not the server's leaves no connection counted as in use.
"""
import collections
import json
import unittest

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from zpgpool import ConnectError
from zpgpool import ConnectionPool
from zpgpool.testing import POSTGRES_LAYER

from .poolhelpers import LogCapture
from .poolhelpers import query
from .poolhelpers import unique_name


# What the server session of a connection holds beyond its transaction,
# asked of the server; a fresh session answers FRESH.
_SESSION_STATE = """
    SELECT current_setting('work_mem'),
           current_setting('application_name'),
           current_user,
           (SELECT count(*) FROM pg_class
              WHERE relpersistence = 't' AND relname = 'reset_tmp'),
           (SELECT count(*) FROM pg_listening_channels()),
           (SELECT count(*) FROM pg_prepared_statements),
           (SELECT count(*) FROM pg_cursors),
           (SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
           current_setting('client_encoding')
"""

# Statements that each leave something in the session, with what that
# thing is called in the failure message.
_CHANGES = [
    ("a setting", "SET work_mem = '7MB'"),
    ("set_config", "SELECT set_config('work_mem', '9MB', false)"),
    ("a role", "SET ROLE reset_role"),
    ("a temporary table", "CREATE TEMPORARY TABLE reset_tmp (x int)"),
    ("LISTEN", "LISTEN reset_channel"),
    ("a prepared statement", "PREPARE reset_plan AS SELECT 1"),
    ("an advisory lock", "SELECT pg_advisory_lock(4711)"),
    ("a held cursor", "DECLARE reset_cur CURSOR WITH HOLD FOR SELECT 1"),
    ("the client encoding", "SET client_encoding TO 'LATIN1'"),
]


def _set_search_path(conn):
    """A pool's configure callable: a session setting meant to last."""
    with conn.cursor() as cur:
        cur.execute("SET search_path TO reset_schema, public")


def _load_json_as_text(conn):
    """A pool's configure callable: a typecaster on the connection."""
    psycopg2.extras.register_default_json(conn, loads=lambda s: "json:" + s)


def _use_latin1(conn):
    """A pool's configure callable: another client encoding."""
    conn.set_client_encoding("LATIN1")


class _Unconnected(psycopg2.extensions.connection):
    """A connection factory that forgets to connect."""

    def __init__(self, *args, **kw):
        pass


class _SkipsPooledInit(psycopg2.extensions.connection):
    """A connection factory that connects by calling psycopg2's __init__
    by name, so the PooledConnection mixed in after it never runs its own."""

    def __init__(self, *args, **kw):
        psycopg2.extensions.connection.__init__(self, *args, **kw)


class ResetTests(unittest.TestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        self.name = unique_name()
        self.log = LogCapture().install(self)
        query(self.layer.dsn, "DROP ROLE IF EXISTS reset_role")
        query(self.layer.dsn, "CREATE ROLE reset_role")
        self.addCleanup(query, self.layer.dsn, "DROP ROLE reset_role")
        self.fresh = self.session_state(psycopg2.connect(self.layer.dsn))

    def _makeOne(self, **kw):
        kw.setdefault("name", self.name)
        kw.setdefault("maxconn", 1)
        pool = ConnectionPool(self.layer.dsn, **kw)
        self.addCleanup(pool.closeall)
        return pool

    def session_state(self, conn, close=True):
        try:
            with conn.cursor() as cur:
                cur.execute(_SESSION_STATE)
                state = list(cur.fetchone())
            conn.rollback()
        finally:
            if close:
                conn.close()
        # The pool's connections have an application_name of their own.
        state[1] = None
        return state

    def answer(self, conn, statement, params=None):
        """The first row ``statement`` answers on ``conn``, rolled back."""
        with conn.cursor() as cur:
            cur.execute(statement, params)
            row = cur.fetchone()
        conn.rollback()
        return row

    def hand_over(self, pool, conn):
        """Return ``conn`` and take the pool's only connection again."""
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        return again

    def test_each_session_change_is_undone(self):
        pool = self._makeOne()
        for what, statement in _CHANGES:
            for autocommit in (False, True):
                conn = pool.getconn()
                conn.autocommit = autocommit
                with conn.cursor() as cur:
                    cur.execute(statement)
                if not autocommit:
                    conn.commit()
                self.assertNotEqual(self.session_state(conn, close=False),
                                    self.fresh, what)
                conn = self.hand_over(pool, conn)
                self.assertFalse(conn.autocommit)
                self.assertEqual(self.session_state(conn, close=False),
                                 self.fresh, (what, autocommit))
                pool.putconn(conn)

    def test_all_changes_together_and_left_in_a_transaction(self):
        pool = self._makeOne()
        conn = pool.getconn()
        with conn.cursor() as cur:
            for _, statement in _CHANGES:
                cur.execute(statement)
        # Left open: the rollback undoes most of it, the reset the rest
        # (the advisory lock and the held cursor outlive a rollback).
        conn = self.hand_over(pool, conn)
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_IDLE)
        self.assertEqual(self.session_state(conn, close=False), self.fresh)
        with conn.cursor() as cur:
            for _, statement in _CHANGES:
                cur.execute(statement)
        conn.commit()
        conn = self.hand_over(pool, conn)
        self.assertEqual(self.session_state(conn, close=False), self.fresh)
        pool.putconn(conn)

    def test_every_way_to_send_a_statement_is_seen(self):
        pool = self._makeOne()
        ways = [
            ("bytes", lambda cur: cur.execute(b"SET work_mem = '7MB'")),
            ("composable", lambda cur: cur.execute(
                sql.SQL("SET work_mem = {}").format(sql.Literal("7MB")))),
            ("parameters", lambda cur: cur.execute(
                "SELECT set_config('work_mem', %s, false)", ("7MB",))),
            ("executemany", lambda cur: cur.executemany(
                "SELECT set_config('work_mem', %s, false)", [("7MB",)])),
            ("keyword", lambda cur: cur.execute(
                query="SET work_mem = '7MB'")),
            ("callproc", lambda cur: cur.callproc(
                "set_config", ("work_mem", "7MB", False))),
            ("callproc, schema-qualified", lambda cur: cur.callproc(
                "pg_catalog.pg_advisory_lock", (4711,))),
        ]
        factories = [None, psycopg2.extras.DictCursor,
                     psycopg2.extras.RealDictCursor,
                     psycopg2.extras.NamedTupleCursor]
        for what, send in ways:
            for factory in factories:
                conn = pool.getconn()
                with conn.cursor(cursor_factory=factory) as cur:
                    if factory is not None:
                        self.assertIsInstance(cur, factory)
                    send(cur)
                conn.commit()
                conn = self.hand_over(pool, conn)
                self.assertEqual(self.session_state(conn, close=False),
                                 self.fresh, (what, factory))
                pool.putconn(conn)
        # A named cursor held past its transaction.
        conn = pool.getconn()
        cur = conn.cursor("reset_named", withhold=True)
        cur.execute("SELECT generate_series(1, 3)")
        self.assertEqual(cur.fetchone(), (1,))
        conn.commit()
        conn = self.hand_over(pool, conn)
        self.assertEqual(self.session_state(conn, close=False), self.fresh)
        pool.putconn(conn)

    def test_configure_s_settings_come_back(self):
        query(self.layer.dsn, "CREATE SCHEMA IF NOT EXISTS reset_schema")
        self.addCleanup(query, self.layer.dsn, "DROP SCHEMA reset_schema")
        pool = self._makeOne(configure=_set_search_path)
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SHOW search_path")
            self.assertEqual(cur.fetchone(), ("reset_schema, public",))
            cur.execute("SET work_mem = '7MB'")
            cur.execute("SET search_path TO public")
        conn.commit()
        conn = self.hand_over(pool, conn)
        self.assertEqual(
            self.answer(conn, "SELECT current_setting('search_path'), "
                        "current_setting('work_mem')"),
            ("reset_schema, public", self.fresh[0]))
        pool.putconn(conn)

    def test_typecasters_registered_by_a_borrower_are_dropped(self):
        pool = self._makeOne()
        conn = pool.getconn()
        psycopg2.extensions.register_type(psycopg2.extensions.BYTES, conn)
        self.assertEqual(self.answer(conn, "SELECT 'x'::text"), (b"x",))
        conn = self.hand_over(pool, conn)
        self.assertEqual(self.answer(conn, "SELECT 'x'::text"), ("x",))
        pool.putconn(conn)

    def test_typecasters_configure_registered_stay(self):
        pool = self._makeOne(configure=_load_json_as_text)
        conn = pool.getconn()
        psycopg2.extras.register_default_json(conn, loads=json.loads)
        psycopg2.extensions.register_type(psycopg2.extensions.BYTES, conn)
        conn = self.hand_over(pool, conn)
        self.assertEqual(
            self.answer(conn, """SELECT '{"a": 1}'::json, 'x'::text"""),
            ('json:{"a": 1}', "x"))
        # Also after a reset of the server session, which runs configure
        # again (with typecasters of its own).
        with conn.cursor() as cur:
            cur.execute("SET work_mem = '7MB'")
        conn.commit()
        conn = self.hand_over(pool, conn)
        self.assertEqual(self.answer(conn, """SELECT '{"a": 1}'::json"""),
                         ('json:{"a": 1}',))
        pool.putconn(conn)

    def test_client_encoding_comes_back_on_both_sides(self):
        pool = self._makeOne()
        conn = pool.getconn()
        fresh_encoding = conn.encoding
        conn.set_client_encoding("LATIN1")
        self.assertEqual(conn.encoding, "LATIN1")
        conn = self.hand_over(pool, conn)
        self.assertEqual(conn.encoding, fresh_encoding)
        self.assertEqual(self.session_state(conn, close=False), self.fresh)
        text = "\u00e9t\u00e9 \u20ac"
        self.assertEqual(self.answer(conn, "SELECT %s", (text,)), (text,))
        pool.putconn(conn)

    def test_configure_s_client_encoding_survives_a_reset(self):
        # configure set LATIN1 through psycopg2; a borrower's SET makes the
        # return reset the server session, which also resets the server's
        # client_encoding: psycopg2 still says LATIN1, so the server must
        # be told again.
        pool = self._makeOne(configure=_use_latin1)
        conn = pool.getconn()
        self.assertEqual(conn.encoding, "LATIN1")
        with conn.cursor() as cur:
            cur.execute("SET work_mem = '7MB'")
        conn.commit()
        conn = self.hand_over(pool, conn)
        self.assertEqual(conn.encoding, "LATIN1")
        self.assertEqual(
            self.answer(conn, "SELECT current_setting('client_encoding'), "
                        "%s", ("\u00e9t\u00e9",)),
            ("LATIN1", "\u00e9t\u00e9"))
        pool.putconn(conn)

    def test_replaced_message_lists_come_back(self):
        pool = self._makeOne()
        conn = pool.getconn()
        notices, notifies = conn.notices, conn.notifies
        # Each alone: nothing else sends the connection down the slow
        # return, which puts them back.
        conn.notifies = None
        conn = self.hand_over(pool, conn)
        self.assertIs(conn.notifies, notifies)
        conn.notices = collections.deque(maxlen=2)
        conn = self.hand_over(pool, conn)
        self.assertIs(conn.notices, notices)
        self.assertEqual((conn.notices, conn.notifies), ([], []))
        pool.putconn(conn)

    def test_a_two_phase_transaction_left_begun_is_rolled_back(self):
        table = "reset_tpc_" + self.name
        query(self.layer.dsn, "CREATE TABLE %s (v int)" % table)
        self.addCleanup(query, self.layer.dsn, "DROP TABLE %s" % table)
        pool = self._makeOne()
        conn = pool.getconn()
        conn.tpc_begin(conn.xid(1, "reset-" + self.name, "b"))
        with conn.cursor() as cur:
            cur.execute("INSERT INTO %s VALUES (1)" % table)
        conn = self.hand_over(pool, conn)
        self.assertEqual(self.answer(conn, "SELECT count(*) FROM %s" % table),
                         (0,))
        pool.putconn(conn)
        self.assertEqual(pool.stats()["connections_discarded"], 0)

    def test_a_prepared_transaction_left_closes_the_connection(self):
        table = "reset_tpc_" + self.name
        query(self.layer.dsn, "CREATE TABLE %s (v int)" % table)
        self.addCleanup(query, self.layer.dsn, "DROP TABLE %s" % table)
        gid = "reset-prepared-" + self.name
        pool = self._makeOne(maxconn=2)
        other = pool.getconn()
        conn = pool.getconn()
        self.addCleanup(self._finish_prepared, gid)
        conn.tpc_begin(conn.xid(1, gid, "b"))
        with conn.cursor() as cur:
            cur.execute("INSERT INTO %s VALUES (1)" % table)
        conn.tpc_prepare()
        pool.putconn(conn)
        # psycopg2 would refuse every statement on it: closed, not lent.
        self.assertTrue(conn.closed)
        self.assertIn("prepared two-phase transaction", self.log.text())
        # The transaction is its borrower's to finish, and still there.
        self.assertEqual(self._prepared(gid), 1)
        # Not a lost session: the other connection is not retired.
        pool.putconn(other)
        self.assertIs(pool.getconn(), other)
        fresh = pool.getconn()
        self.assertIsNot(fresh, conn)
        with fresh.cursor() as cur:
            cur.execute("SELECT 1")
        fresh.rollback()

    def _prepared(self, gid, finish=False):
        """How many transactions psycopg2 prepared under ``gid``."""
        conn = psycopg2.connect(self.layer.dsn)
        try:
            found = [xid for xid in conn.tpc_recover() if xid.gtrid == gid]
            for xid in found if finish else ():
                conn.tpc_rollback(xid)
            return len(found)
        finally:
            conn.close()

    def _finish_prepared(self, gid):
        self._prepared(gid, finish=True)

    def test_an_unconnected_connection_factory_is_a_clear_error(self):
        pool = self._makeOne(
            connect_kwargs={"connection_factory": _Unconnected})
        with self.assertRaises(ConnectError) as caught:
            pool.getconn()
        message = str(caught.exception)
        self.assertIn(self.name, message)
        self.assertIn("_Unconnected", message)
        self.assertIn("connection.__init__", message)
        self.assertTrue(caught.exception.permanent)

    def test_a_factory_that_skips_the_pools_init_still_works(self):
        pool = self._makeOne(
            connect_kwargs={"connection_factory": _SkipsPooledInit})
        conn = pool.getconn()
        self.assertIsInstance(conn, _SkipsPooledInit)
        with conn.cursor() as cur:
            cur.execute("SET application_name TO 'changed'")
        conn.commit()
        pool.putconn(conn)
        again = pool.getconn()
        self.assertIs(again, conn)
        with again.cursor() as cur:
            cur.execute("SHOW application_name")
            self.assertNotEqual(cur.fetchone()[0], "changed")
        pool.putconn(again)
        self.assertEqual(pool.stats()["in_use"], 0)


def _failing_wait(conn):
    """A wait callback that fails, as a green library's may."""
    raise ZeroDivisionError("the wait callback failed")


class InterruptedHandOverTests(unittest.TestCase):
    """A hand-over cut short by an error that is not the server's (a wait
    callback raising, Ctrl-C, an event subscriber's bug) reaches the
    caller, and no connection stays counted as in use."""

    layer = POSTGRES_LAYER

    def setUp(self):
        self.name = unique_name()
        self.log = LogCapture().install(self)

    def _makeOne(self, **kw):
        pool = ConnectionPool(self.layer.dsn, name=self.name, maxconn=1,
                              **kw)
        self.addCleanup(pool.closeall)
        return pool

    def failing_waits(self):
        psycopg2.extensions.set_wait_callback(_failing_wait)
        self.addCleanup(psycopg2.extensions.set_wait_callback, None)

    def assertServes(self, pool, not_this=None):
        self.assertEqual(pool.stats()["in_use"], 0)
        conn = pool.getconn()
        if not_this is not None:
            self.assertIsNot(conn, not_this)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            self.assertEqual(cur.fetchone(), (1,))
        conn.rollback()
        pool.putconn(conn)

    def test_a_failed_rollback_on_return(self):
        pool = self._makeOne()
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        self.failing_waits()
        with self.assertRaises(ZeroDivisionError):
            pool.putconn(conn)
        psycopg2.extensions.set_wait_callback(None)
        self.assertTrue(conn.closed)
        self.assertServes(pool, not_this=conn)

    def test_a_failed_health_check_on_checkout(self):
        pool = self._makeOne(health_check_after=0)   # a ping every time
        conn = pool.getconn()
        pool.putconn(conn)
        self.failing_waits()
        with self.assertRaises(ZeroDivisionError):
            pool.getconn()
        psycopg2.extensions.set_wait_callback(None)
        self.assertTrue(conn.closed)
        self.assertServes(pool, not_this=conn)

    def test_a_failing_checkout_subscriber(self):
        import zope.event
        from zpgpool.interfaces import IConnectionCheckedOut

        def subscriber(event):
            if IConnectionCheckedOut.providedBy(event):
                raise ZeroDivisionError("the subscriber failed")
        pool = self._makeOne()
        for first_checkout in (True, False):    # connecting, and reusing
            zope.event.subscribers.append(subscriber)
            try:
                with self.assertRaises(ZeroDivisionError):
                    pool.getconn()
            finally:
                zope.event.subscribers.remove(subscriber)
            # The connection it made is the pool's again, and sound.
            self.assertEqual(pool.stats()["size"], 1, first_checkout)
            self.assertServes(pool)
