"""Two-phase pools on two PostgreSQL servers and ZODB in one transaction:
all commit or none, also when a process dies between the PREPAREs, and
``zpgpool recover --zodb`` resolves what each server was left holding."""
import os
import shutil
import tempfile
import unittest

import psycopg2
import psycopg2.errors
import transaction

from zpgpool.testing import POSTGRES_LAYER
from zpgpool.testing import PostgresLayer

from tests.poolhelpers import crash_in_commit
from tests.poolhelpers import query
from tests.poolhelpers import run_cli


#: A second server beside the shared one.
TWO_SERVERS_LAYER = PostgresLayer("TWO_SERVERS_LAYER", private=True,
                                  bases=(POSTGRES_LAYER,), module=__name__)

JOIN_TIMEOUT = 60

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:zpgpool="http://namespaces.zope.org/zpgpool">
  <include package="zpgpool" />
  <zpgpool:pool name="first" dsn="{first}" twophase="true" />
  <zpgpool:pool name="second" dsn="{second}" twophase="true" />
</configure>
"""


class SeveralServersTests(unittest.TestCase):

    layer = TWO_SERVERS_LAYER

    def setUp(self):
        transaction.abort()
        self.dsns = [POSTGRES_LAYER.dsn, TWO_SERVERS_LAYER.dsn]
        self.assertNotEqual(self.dsns[0], self.dsns[1])
        for dsn in self.dsns:
            query(dsn, "DROP TABLE IF EXISTS ss_items")
            query(dsn, "CREATE TABLE ss_items (value text UNIQUE DEFERRABLE "
                       "INITIALLY DEFERRED)")
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        self.tmp = tmp
        self.path = os.path.join(tmp, "Data.fs")
        self.pools = []
        self.addCleanup(transaction.abort)

    def tearDown(self):
        transaction.abort()
        for pool in self.pools:
            pool.closeall()
        for dsn in self.dsns:
            for (gid,) in query(dsn, "SELECT gid FROM pg_prepared_xacts"):
                query(dsn, "ROLLBACK PREPARED %s", (gid,))

    def _pools(self):
        from zpgpool import ConnectionPool
        pools = [ConnectionPool(dsn, name=name, twophase=True)
                 for dsn, name in zip(self.dsns, ("first", "second"))]
        self.pools.extend(pools)
        return pools

    def _db(self):
        import ZODB
        import ZODB.FileStorage
        db = ZODB.DB(ZODB.FileStorage.FileStorage(self.path))
        self.addCleanup(db.close)
        return db

    def rows(self):
        return [[v for (v,) in query(dsn, "SELECT value FROM ss_items "
                                          "ORDER BY value")]
                for dsn in self.dsns]

    def prepared(self):
        return [query(dsn, "SELECT count(*) FROM pg_prepared_xacts")[0][0]
                for dsn in self.dsns]

    def zodb_value(self, db):
        conn = db.open()
        try:
            return conn.root().get("value")
        finally:
            conn.close()

    def insert(self, pool, value):
        pool.connection().cursor().execute(
            "INSERT INTO ss_items (value) VALUES (%s)", (value,))

    def test_both_servers_and_zodb_commit(self):
        db = self._db()
        first, second = self._pools()
        zconn = db.open()
        zconn.root()["value"] = "all"
        self.insert(first, "all")
        self.insert(second, "all")
        transaction.commit()
        zconn.close()
        self.assertEqual(self.rows(), [["all"], ["all"]])
        self.assertEqual(self.zodb_value(db), "all")
        self.assertEqual(self.prepared(), [0, 0])

    def test_second_servers_prepare_fails(self):
        db = self._db()
        first, second = self._pools()
        zconn = db.open()
        zconn.root()["value"] = "none"
        self.insert(first, "none")
        self.insert(second, "dup")
        self.insert(second, "dup")   # deferred unique: its PREPARE fails
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            transaction.commit()
        transaction.abort()
        zconn.close()
        self.assertEqual(self.rows(), [[], []])
        self.assertIsNone(self.zodb_value(db))
        # The first server had prepared; the failure rolled that back.
        self.assertEqual(self.prepared(), [0, 0])

    def test_first_servers_prepare_fails(self):
        first, second = self._pools()
        self.insert(first, "dup")
        self.insert(first, "dup")
        self.insert(second, "none")
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            transaction.commit()
        transaction.abort()
        self.assertEqual(self.rows(), [[], []])
        self.assertEqual(self.prepared(), [0, 0])

    def _crash(self, killer_key, phase):
        """Kill, at *killer_key* in *phase* of its commit, a process that
        writes "crash" through the pools "first" and "second" on the two
        servers and in a FileStorage, all in one transaction."""
        import ZODB.FileStorage
        ZODB.FileStorage.FileStorage(self.path).close()   # an empty one
        crash_in_commit(self, zip(("first", "second"), self.dsns),
                        "ss_items", killer_key, phase, zodb_path=self.path,
                        timeout=JOIN_TIMEOUT)

    def _recover(self):
        zcml = os.path.join(self.tmp, "site.zcml")
        with open(zcml, "w") as f:
            f.write(SITE_ZCML.format(first=self.dsns[0], second=self.dsns[1]))
        status, out, err = run_cli("recover", "--zcml", zcml, "--zodb",
                                   self.path, "--older-than", "0")
        self.assertEqual(status, 0, err)
        return out

    def test_killed_between_the_prepares_is_rolled_back(self):
        # "~zpgpool:first" < "~zpgpool:m" < "~zpgpool:second": the process
        # dies after the first server prepared, before the second did.
        self._crash("~zpgpool:m", "tpc_vote")
        self.assertEqual(self.prepared(), [1, 0])
        out = self._recover()
        self.assertIn("rolled back", out)
        self.assertIn("ZODB did not commit it", out)
        self.assertEqual(self.prepared(), [0, 0])
        self.assertEqual(self.rows(), [[], []])
        self.assertIsNone(self.zodb_value(self._db()))

    def test_killed_after_zodb_committed_is_committed_on_both(self):
        # After ZODB's tpc_finish (its key is the storage's path), before
        # either server's COMMIT PREPARED.
        self._crash("}", "tpc_finish")
        self.assertEqual(self.prepared(), [1, 1])
        out = self._recover()
        self.assertEqual(out.count("ZODB committed it"), 2, out)
        self.assertEqual(self.prepared(), [0, 0])
        self.assertEqual(self.rows(), [["crash"], ["crash"]])
        self.assertEqual(self.zodb_value(self._db()), "crash")

    def test_killed_between_the_commit_prepareds(self):
        # The first server committed, the second is left prepared.
        self._crash("~zpgpool:m", "tpc_finish")
        self.assertEqual(self.prepared(), [0, 1])
        self._recover()
        self.assertEqual(self.prepared(), [0, 0])
        self.assertEqual(self.rows(), [["crash"], ["crash"]])
