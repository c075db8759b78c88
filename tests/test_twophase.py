"""Tests for zpgpool.twophase: transaction ids and the recovery of
transactions left prepared, against a real PostgreSQL server.

Prepared transactions are made here with plain psycopg2 connections and
``new_gid()``, as a process that died after PREPARE TRANSACTION would leave
them, so that several pools' and databases' in-doubt transactions can sit
side by side.
"""
import os
import unittest

import psycopg2
import transaction

from zpgpool import ConnectionPool
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.twophase import gid_prefix
from zpgpool.twophase import list_prepared
from zpgpool.twophase import new_gid
from zpgpool.twophase import recover
from zpgpool.twophase import resolve_prepared

from tests.poolhelpers import query
from tests.poolhelpers import run_in_child


class TwoPhaseTestBase(unittest.TestCase):

    layer = POSTGRES_LAYER
    table = "tp_items"

    def setUp(self):
        transaction.abort()
        self.dsn = self.layer.dsn
        self.sql("DROP TABLE IF EXISTS %s" % self.table)
        self.sql("CREATE TABLE %s (value text)" % self.table)
        self.addCleanup(self.sql, "DROP TABLE IF EXISTS %s" % self.table)
        self.addCleanup(self._rollback_leftovers)
        self.addCleanup(transaction.abort)

    def sql(self, statement, params=None, dsn=None):
        return query(dsn or self.dsn, statement, params)

    def _rollback_leftovers(self):
        for (gid,) in self.sql("SELECT gid FROM pg_prepared_xacts WHERE "
                               "database = current_database() AND gid LIKE "
                               "'zpgpool:%%'"):
            self.sql("ROLLBACK PREPARED %s", (gid,))

    def _makeOne(self, name, **kw):
        pool = ConnectionPool(self.dsn, name=name, **kw)
        self.addCleanup(pool.closeall)
        return pool

    def prepare(self, pool, value, dsn=None):
        """Leave a prepared transaction of ``pool`` inserting ``value``."""
        gid = new_gid(pool)
        conn = psycopg2.connect(dsn or self.dsn)
        try:
            cur = conn.cursor()
            cur.execute("INSERT INTO %s (value) VALUES (%%s)" % self.table,
                        (value,))
            cur.execute("PREPARE TRANSACTION %s", (gid,))
        finally:
            conn.close()
        return gid

    def values(self):
        return [v for (v,) in self.sql("SELECT value FROM %s ORDER BY value"
                                       % self.table)]

    def prepared(self):
        return {gid for (gid,) in self.sql(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'zpgpool:%%'")}


class GidTests(TwoPhaseTestBase):

    def test_gids_are_unique(self):
        pool = self._makeOne("uniq")
        gids = {new_gid(pool) for _ in range(100)}
        self.assertEqual(len(gids), 100)
        self.assertTrue(all(g.startswith("zpgpool:uniq:") for g in gids))

    def test_gids_need_no_quoting_whatever_the_names(self):
        # The data manager writes the gid into PREPARE TRANSACTION and
        # COMMIT/ROLLBACK PREPARED between single quotes as it is.
        for name in ("it's", "back\\slash", "per%cent", "Zürich 2",
                     "semi;colon", "", "x" * 300):
            gid = new_gid(self._makeOne(name))
            self.assertRegex(gid, r"\Azpgpool:[A-Za-z0-9_.~:-]+\Z")

    def test_a_forked_child_names_its_own_gids(self):
        # The child starts with the parent's counter: only its process id
        # keeps the two from preparing the same gid.
        pool = self._makeOne("forked")
        parent = new_gid(pool)
        self.assertIn(":%d:" % os.getpid(), parent)

        def child():
            gid = new_gid(pool)
            assert ":%d:" % os.getpid() in gid, gid
            assert ":%d:" % os.getppid() not in gid, gid
        code, message = run_in_child(child)
        self.assertEqual((code, message), (0, "ok"))

    def test_long_names_are_shortened_and_still_commit(self):
        # PostgreSQL allows gids of at most 200 bytes.
        for length in (41, 150, 400):
            name = "n" * length
            pool = self._makeOne(name, twophase=True)
            prefix = gid_prefix(pool)
            self.assertLess(len(prefix), 50, prefix)
            self.assertNotIn(name, prefix)
            cur = pool.connection().cursor()
            cur.execute("INSERT INTO tp_items (value) VALUES (%s)",
                        (str(length),))
            transaction.commit()
        self.assertEqual(self.values(), ["150", "400", "41"])
        self.assertEqual(self.prepared(), set())

    def test_long_names_differing_at_the_end_get_distinct_prefixes(self):
        a = self._makeOne("p" * 60 + "a")
        b = self._makeOne("p" * 60 + "b")
        self.assertNotEqual(gid_prefix(a), gid_prefix(b))

    def test_long_name_with_replaced_characters_still_commits(self):
        name = "a pool, named at length: " * 8
        pool = self._makeOne(name, twophase=True)
        self.assertLess(len(gid_prefix(pool)), 50)
        cur = pool.connection().cursor()
        cur.execute("INSERT INTO tp_items (value) VALUES ('odd')")
        transaction.commit()
        self.assertEqual(self.values(), ["odd"])


class RecoveryTests(TwoPhaseTestBase):

    def test_pools_with_similar_names_keep_apart(self):
        # "a b", "a_b" and "a:b" differ only in a replaced character; "dm"
        # is a prefix of "dm2". Each pool lists and resolves only its own.
        pools = [self._makeOne(n) for n in ("a b", "a_b", "dm", "dm2",
                                            "a:b")]
        gids = {pool.name: self.prepare(pool, pool.name) for pool in pools}
        self.assertEqual(len({gid_prefix(p) for p in pools}), 5)
        for pool in pools:
            self.assertEqual([row[0] for row in list_prepared(pool, 0)],
                             [gids[pool.name]])
        done = recover(pools[0], older_than=0, commit=False)
        self.assertEqual(done, [(gids["a b"], "rollback")])
        done = recover(pools[2], older_than=0, commit=True)
        self.assertEqual(done, [(gids["dm"], "commit")])
        self.assertEqual(self.prepared(),
                         {gids["a_b"], gids["dm2"], gids["a:b"]})
        self.assertEqual(self.values(), ["dm"])

    def test_oldest_first_and_only_older_than_asked(self):
        pool = self._makeOne("order")
        gids = [self.prepare(pool, str(n)) for n in range(3)]
        self.assertEqual([row[0] for row in list_prepared(pool, 0)], gids)
        self.assertEqual(list_prepared(pool, older_than=3600), [])
        self.assertEqual(recover(pool, older_than=3600, commit=True), [])
        self.assertEqual(self.prepared(), set(gids))
        # With neither commit nor decide: listed, left alone.
        self.assertEqual(recover(pool, older_than=0),
                         [(gid, "listed") for gid in gids])
        self.assertEqual(self.prepared(), set(gids))

    def test_other_databases_are_left_alone(self):
        other_db = "tp_other_db"
        self.sql("DROP DATABASE IF EXISTS %s" % other_db)
        self.sql("CREATE DATABASE %s" % other_db)
        self.addCleanup(self.sql, "DROP DATABASE IF EXISTS %s" % other_db)
        other_dsn = self.dsn + " dbname=%s" % other_db
        self.sql("CREATE TABLE tp_items (value text)", dsn=other_dsn)
        pool = self._makeOne("dbs")
        theirs = self.prepare(pool, "other db", dsn=other_dsn)
        self.addCleanup(self.sql, "ROLLBACK PREPARED %s", (theirs,),
                        other_dsn)
        mine = self.prepare(pool, "this db")
        self.assertEqual([row[0] for row in list_prepared(pool, 0)], [mine])
        self.assertEqual(recover(pool, older_than=0, commit=True),
                         [(mine, "commit")])
        self.assertEqual(self.values(), ["this db"])
        self.assertEqual(self.sql("SELECT gid FROM pg_prepared_xacts"),
                         [(theirs,)])

    def test_resolving_twice_skips_what_is_gone(self):
        pool = self._makeOne("twice")
        gid = self.prepare(pool, "once")
        self.assertEqual(resolve_prepared(pool, [gid], commit=True), [gid])
        self.assertEqual(resolve_prepared(pool, [gid], commit=True), [])
        self.assertEqual(resolve_prepared(pool, [gid], commit=False), [])
        self.assertEqual(self.values(), ["once"])

    def test_resolved_meanwhile_by_someone_else_is_not_reported(self):
        pool = self._makeOne("race")
        gids = [self.prepare(pool, "first"), self.prepare(pool, "second")]

        def decide(gid):
            if gid == gids[0]:
                # Another process (an operator, another zpgpool) resolves
                # it between listing and resolving.
                self.sql("COMMIT PREPARED %s", (gid,))
            return True
        self.assertEqual(recover(pool, older_than=0, decide=decide),
                         [(gids[1], "commit")])
        self.assertEqual(self.values(), ["first", "second"])
        self.assertEqual(self.prepared(), set())

    def test_decide_chooses_per_gid(self):
        pool = self._makeOne("decide")
        keep = self.prepare(pool, "keep")
        drop = self.prepare(pool, "drop")
        done = recover(pool, older_than=0, decide=lambda gid: gid == keep)
        self.assertEqual(done, [(keep, "commit"), (drop, "rollback")])
        self.assertEqual(self.values(), ["keep"])
        self.assertEqual(self.prepared(), set())
