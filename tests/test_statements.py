"""Tests for statements.py: what a statement does beyond its transaction."""
import unittest

import psycopg2
from psycopg2 import sql

from zpgpool import statements
from zpgpool.testing import POSTGRES_LAYER


class StatementEffectTests(unittest.TestCase):

    layer = POSTGRES_LAYER

    def test_forms_of_a_query(self):
        conn = psycopg2.connect(self.layer.dsn)
        self.addCleanup(conn.close)
        self.assertTrue(statements.changes_session(
            sql.SQL("SET {} = 1").format(sql.Identifier("x")), conn))
        self.assertFalse(statements.changes_session(
            sql.SQL("SELECT {}").format(sql.Literal(1)), conn))
        self.assertTrue(statements.changes_session(b"RESET ALL", conn))
        self.assertFalse(statements.changes_session(b"SELECT 1", conn))
        # Something that is not a query: assumed to change the session,
        # since a reset too many costs a round trip and one too few leaks.
        self.assertTrue(statements.changes_session(object(), conn))

    def test_the_answers_cache_stays_bounded(self):
        for n in range(2500):
            statements.statement_effect("SELECT %d" % n)
        self.assertLessEqual(len(statements._effects), 2001)
        self.assertEqual(statements.statement_effect("SET a.b = 1"),
                         statements.CHANGES_SESSION | statements.WRITES)
        self.assertEqual(statements.statement_effect("LISTEN x"),
                         statements.CHANGES_SESSION | statements.LISTENS
                         | statements.WRITES)
        self.assertEqual(statements.statement_effect("  commit"),
                         statements.CONTROLS_TRANSACTION | statements.WRITES)

    def test_long_statements_are_answered_but_not_kept(self):
        # An execute_values page carries its values in its text: caching
        # 2000 of those could hold hundreds of megabytes.
        statements._effects.clear()
        page = "INSERT INTO t VALUES " + ", ".join(
            "(%d, 'some text')" % n for n in range(1000))
        self.assertGreater(len(page), 4096)
        self.assertEqual(statements.statement_effect(page),
                         statements.WRITES)
        long_set = "SET application_name = '%s'" % ("x" * 5000)
        self.assertEqual(statements.statement_effect(long_set.encode()),
                         statements.CHANGES_SESSION | statements.WRITES)
        self.assertEqual(statements._effects, {})
        self.assertEqual(statements.statement_effect("SELECT 1"),
                         statements.KEEPS_SESSION)
        self.assertEqual(list(statements._effects), ["SELECT 1"])

    def test_what_counts_as_only_reading(self):
        # A two-phase transaction of only these asks the server whether it
        # wrote before it prepares; any other statement skips the question.
        for query in ("SELECT 1", "  select * from t FOR UPDATE",
                      "show work_mem", "VALUES (1)", "TABLE t",
                      "FETCH 10 FROM c", "CLOSE c", 'SAVEPOINT "s"',
                      "SELECT set_config('a.b', '1', false)", b"SELECT 2"):
            self.assertFalse(statements.statement_effect(query)
                             & statements.WRITES, query)
        for query in ("INSERT INTO t VALUES (1)", "update t set a = 1",
                      "DELETE FROM t", "WITH x AS (DELETE FROM t) SELECT 1",
                      "CREATE TABLE t (a int)", "COPY t FROM STDIN",
                      "CALL p()", "DO $$BEGIN END$$", "NOTIFY c",
                      "SELECT pg_notify('c', 'x')", "SET a.b = 1",
                      "EXPLAIN ANALYZE DELETE FROM t", "ROLLBACK",
                      "-- a comment first\nSELECT 1", b"INSERT INTO t"):
            self.assertTrue(statements.statement_effect(query)
                            & statements.WRITES, query)
