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
                         statements.CHANGES_SESSION)
        self.assertEqual(statements.statement_effect("LISTEN x"),
                         statements.CHANGES_SESSION | statements.LISTENS)
        self.assertEqual(statements.statement_effect("  commit"),
                         statements.CONTROLS_TRANSACTION)
