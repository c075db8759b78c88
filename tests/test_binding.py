"""Tests for zpgpool.binding: connections bound to threads.

PersistentConnectionPool gives each thread its own connection and takes it
back when the thread ends; the transaction integration parks a thread's
connection between transactions and lends it to other threads when they
would otherwise wait. All against the real throwaway server.
"""
import sys
import threading
import time
import unittest

import psycopg2
import psycopg2.extensions
import psycopg2.pool

from zpgpool import ConnectionMisuse
from zpgpool import ConnectionPool
from zpgpool import PersistentConnectionPool
from zpgpool import binding
from zpgpool.testing import POSTGRES_LAYER

from .poolhelpers import WAIT
from .poolhelpers import LogCapture
from .poolhelpers import TableChecks
from .poolhelpers import close_pool
from .poolhelpers import run_in_child
from .poolhelpers import server_pid
from .poolhelpers import start
from .poolhelpers import terminate
from .poolhelpers import unique_name
from .poolhelpers import wait_for


IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


class BindingTestBase(TableChecks, unittest.TestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        self.name = unique_name()
        self.log = LogCapture().install(self)
        # A finalizer that fails when a thread ends only shows up here.
        self.unraisable = []
        hook = sys.unraisablehook
        sys.unraisablehook = self.unraisable.append
        self.addCleanup(setattr, sys, "unraisablehook", hook)

    def tearDown(self):
        self.assertEqual([u.exc_value for u in self.unraisable], [])

    def _makeOne(self, minconn=0, maxconn=5, **kw):
        kw.setdefault("name", self.name)
        pool = PersistentConnectionPool(minconn, maxconn, self.layer.dsn,
                                        **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def _makePool(self, **kw):
        kw.setdefault("name", self.name)
        pool = ConnectionPool(self.layer.dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def released(self, pool, in_use=0):
        """Wait until the pool counts ``in_use`` connections out."""
        return wait_for(lambda: pool.stats()["in_use"] == in_use,
                        "%d connection(s) in use" % in_use)


class PersistentConnectionPoolTests(BindingTestBase):

    def test_one_connection_per_thread(self):
        pool = self._makeOne()
        mine = pool.getconn()
        self.assertIs(pool.getconn(), mine)
        theirs = start(self, lambda: (pool.getconn(), pool.getconn())
                       ).finish(self)
        self.assertIs(theirs[0], theirs[1])
        self.assertIsNot(theirs[0], mine)
        self.assertWorks(mine)
        pool.putconn()

    def test_putconn(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn()
        self.assertEqual(pool.stats()["in_use"], 0)
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn()
        self.assertIn("this thread holds no connection", str(cm.exception))
        self.assertIn(repr(self.name), str(cm.exception))
        again = pool.getconn()
        self.assertIs(again, conn)      # from the idle stack
        pool.putconn(again)             # explicitly
        self.assertEqual(pool.stats()["in_use"], 0)
        third = pool.getconn()
        pool.putconn(third, close=True)
        self.assertTrue(third.closed)

    def test_putconn_of_a_foreign_connection(self):
        pool = self._makeOne()
        plain = psycopg2.connect(self.layer.dsn)
        self.addCleanup(plain.close)
        mine = pool.getconn()
        with self.assertRaises(ConnectionMisuse) as cm:
            pool.putconn(plain)
        self.assertIn("does not belong to this pool", str(cm.exception))
        self.assertIs(pool.getconn(), mine)
        pool.putconn()

    def test_keys_are_refused(self):
        pool = self._makeOne()
        for call in (lambda: pool.getconn(0), lambda: pool.getconn("k"),
                     lambda: pool.putconn(key="k")):
            with self.assertRaises(ConnectionMisuse) as cm:
                call()
            self.assertIn("keys connections by thread", str(cm.exception))
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_fails_fast_when_exhausted_as_psycopg2(self):
        pool = self._makeOne(maxconn=1)
        release = threading.Event()

        def hold():
            pool.getconn()
            release.wait(WAIT)
        holder = start(self, hold)
        self.released(pool, 1)
        with self.assertRaises(psycopg2.pool.PoolError) as cm:
            pool.getconn()
        self.assertIn("connection pool exhausted", str(cm.exception))
        # Given a timeout, it waits for the holder's thread to end.
        threading.Timer(0.1, release.set).start()
        self.assertWorks(pool.getconn(timeout=WAIT))
        holder.finish(self)
        pool.putconn()

    def test_connection_released_when_its_thread_ends(self):
        pool = self._makeOne()
        conn = start(self, pool.getconn).finish(self)
        self.released(pool)
        stats = pool.stats()
        self.assertEqual((stats["idle"], stats["size"]), (1, 1))
        self.assertFalse(conn.closed)
        self.assertIs(pool.getconn(), conn)
        pool.putconn()

    def test_thread_dying_in_a_transaction_is_rolled_back(self):
        table = self.make_table()
        pool = self._makeOne()

        def work():
            conn = pool.getconn()
            conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
            return conn
        conn = start(self, work).finish(self)
        self.released(pool)
        self.assertEqual(conn.get_transaction_status(), IDLE)
        self.assertEqual(self.rows(table), [])
        self.assertEqual(pool.stats()["returned_bad"], 1)

    def test_new_thread_never_inherits_a_dead_threads_connection(self):
        # psycopg2#848: keyed by get_ident(), which the system hands to the
        # next thread, psycopg2's pool gave a new thread the dead thread's
        # connection, still in the dead thread's transaction.
        table = self.make_table()
        pool = self._makeOne()

        def first():
            conn = pool.getconn()
            conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
            return threading.get_ident(), conn

        def second():
            conn = pool.getconn()
            status = conn.get_transaction_status()
            stats = pool.stats()
            conn.commit()
            same = pool.getconn() is conn
            return threading.get_ident(), conn, status, stats, same
        _, conn1 = start(self, first).finish(self)
        _, conn2, status, stats, same = start(self, second).finish(self)
        # Whether or not the ident was reused (it usually is) and whether
        # or not the same connection object came back from the idle stack:
        # it was handed back first, rolled back, and taken out once.
        self.assertEqual(status, IDLE)
        self.assertEqual(stats["in_use"], 1)
        self.assertTrue(same)
        self.assertEqual(self.rows(table), [])
        self.released(pool)
        self.assertEqual(pool.stats()["size"], 1)
        self.assertIs(conn2, conn1)   # the one connection, reused properly

    def test_many_threads(self):
        pool = self._makeOne(maxconn=4, timeout=WAIT)

        def work(i):
            conn = pool.getconn()
            assert pool.getconn() is conn
            with conn.cursor() as cur:
                cur.execute("SELECT %s", (i,))
                assert cur.fetchone() == (i,)
            conn.commit()
            if i % 2:
                pool.putconn()     # the others just end
            return i
        workers = [start(self, work, i) for i in range(24)]
        self.assertEqual([w.finish(self) for w in workers], list(range(24)))
        self.released(pool)
        stats = pool.stats()
        self.assertLessEqual(stats["connections_opened"], 4)
        self.assertEqual(stats["timeouts"], 0)

    def test_closeall_before_the_thread_ends(self):
        pool = self._makeOne()
        taken, release = threading.Event(), threading.Event()

        def work():
            conn = pool.getconn()
            taken.set()
            release.wait(WAIT)
            return conn
        worker = start(self, work)
        taken.wait(WAIT)
        pool.closeall()
        release.set()
        conn = worker.finish(self)
        self.assertTrue(conn.closed)
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["in_use"]), (0, 0))
        # tearDown checks that the thread's end raised nothing.

    def test_psycopg2_style_code(self):
        # As documented for psycopg2.pool.PersistentConnectionPool.
        pool = self._makeOne(1, 3)
        conn = pool.getconn()
        cur = conn.cursor()
        cur.execute("SELECT 1")
        conn.commit()
        pool.putconn(conn)
        pool.closeall()
        self.assertTrue(pool.closed)
        self.assertTrue(conn.closed)


class ForkTests(BindingTestBase):

    def test_child_leaves_the_parents_thread_connection_alone(self):
        # The parent's thread-bound connection is in a transaction when the
        # process forks; the child uses the pool and exits. The parent's
        # transaction must still be there to commit.
        table = self.make_table()
        pool = self._makeOne()
        conn = pool.getconn()
        pid = server_pid(conn)
        conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)

        def child():
            mine = pool.getconn()
            assert mine is not conn, "got the parent's connection"
            assert server_pid(mine) != pid, "on the parent's backend"
            mine.rollback()
            pool.putconn()
            pool.closeall()
        self.assertEqual(run_in_child(child), (0, "ok"))
        self.assertEqual(server_pid(conn), pid)
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_INTRANS)
        conn.commit()
        self.assertEqual(self.rows(table), [1])
        self.assertIs(pool.getconn(), conn)
        pool.putconn()


class ParkingTests(BindingTestBase):
    """The binding the transaction integration uses (datamanager.py):
    ``take``/``put`` and parking between transactions."""

    def test_holder_is_per_thread(self):
        pool = self._makePool()
        holder = binding.holder_for(pool)
        self.assertIs(binding.holder_for(pool), holder)
        other = start(self, binding.holder_for, pool).finish(self)
        self.assertIsNot(other, holder)
        self.assertIsNone(holder.conn)

    def test_take_park_take(self):
        pool = self._makePool(maxconn=2)
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        self.assertIs(holder.conn, conn)
        self.assertTrue(pool.park(conn, holder))
        stats = pool.stats()
        self.assertEqual((stats["bound_idle"], stats["in_use"],
                          stats["idle"]), (1, 0, 0))
        self.assertIs(binding.take(pool, holder), conn)
        stats = pool.stats()
        self.assertEqual((stats["bound_idle"], stats["in_use"]), (0, 1))
        binding.put(pool, holder)
        self.assertIsNone(holder.conn)
        stats = pool.stats()
        self.assertEqual((stats["idle"], stats["in_use"]), (1, 0))
        binding.put(pool, holder)   # nothing held: nothing happens

    def test_park_refuses_an_open_transaction(self):
        table = self.make_table()
        pool = self._makePool()
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
        self.assertFalse(pool.park(conn, holder))
        self.assertEqual(conn.get_transaction_status(), IDLE)
        self.assertEqual(self.rows(table), [])
        stats = pool.stats()
        self.assertEqual((stats["bound_idle"], stats["idle"]), (0, 1))

    def test_parked_connection_is_lent_to_a_thread_that_would_wait(self):
        pool = self._makePool(minconn=0, maxconn=1, timeout=WAIT)
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        pool.park(conn, holder)
        # Another thread needs a connection and there is no room: it gets
        # the parked one at once instead of waiting.
        checkouts = pool.stats()["checkouts"]
        lent = start(self, pool.getconn).finish(self)
        self.assertIs(lent, conn)
        stats = pool.stats()
        self.assertEqual((stats["waits"], stats["bound_idle"]), (0, 0))
        self.assertEqual(stats["checkouts"], checkouts + 1)
        # The owner notices at its next take and waits for a connection.
        owner = start(self, binding.take, pool, holder)
        wait_for(lambda: pool.stats()["waiting"] == 1, "the owner waiting")
        pool.putconn(lent)
        self.assertIs(owner.finish(self), conn)
        self.assertIs(holder.conn, conn)
        binding.put(pool, holder)
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_a_lent_connection_parked_by_its_new_thread_stays_its(self):
        # A's parked connection is lent to B, whose thread parks it in
        # turn. A, looking for its old connection, must leave B's parking
        # alone: every connection stays counted, and B gets it back.
        pool = self._makePool(minconn=0, maxconn=1, timeout=WAIT)
        holder_a = binding.holder_for(pool)
        conn = binding.take(pool, holder_a)
        pool.park(conn, holder_a)
        holder_b = binding.Holder()

        def b_takes_and_parks():
            taken = binding.take(pool, holder_b)
            pool.park(taken, holder_b)
            return taken
        self.assertIs(start(self, b_takes_and_parks).finish(self), conn)
        self.assertFalse(pool.unpark(conn, holder_a))
        stats = pool.stats()
        self.assertEqual((stats["size"], stats["bound_idle"],
                          stats["in_use"], stats["idle"]), (1, 1, 0, 0))
        self.assertTrue(pool.unpark(conn, holder_b))
        pool.release(conn)
        self.assertEqual(pool.stats()["idle"], 1)

    def test_parking_hands_over_to_a_waiter(self):
        pool = self._makePool(minconn=0, maxconn=1, timeout=WAIT)
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        waiter = start(self, pool.getconn)
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiter")
        self.assertFalse(pool.park(conn, holder))
        self.assertIs(waiter.finish(self), conn)
        # No longer the holder's: giving back what it holds (its thread
        # ending, say) leaves the waiter's connection alone.
        binding.put(pool, holder)
        self.assertEqual(pool.stats()["in_use"], 1)
        pool.putconn(conn)
        # The holder's next take gets a connection the ordinary way.
        self.assertIs(binding.take(pool, holder), conn)
        binding.put(pool, holder)

    def test_thread_ending_with_a_parked_connection(self):
        pool = self._makePool()

        def work():
            holder = binding.holder_for(pool)
            conn = binding.take(pool, holder)
            pool.park(conn, holder)
            return conn
        conn = start(self, work).finish(self)
        wait_for(lambda: pool.stats()["bound_idle"] == 0, "the release")
        stats = pool.stats()
        self.assertEqual((stats["idle"], stats["in_use"]), (1, 0))
        self.assertIs(pool.getconn(), conn)
        pool.putconn(conn)

    def test_thread_ending_after_its_connection_was_lent(self):
        pool = self._makePool(minconn=0, maxconn=1, timeout=WAIT)
        parked, release = threading.Event(), threading.Event()

        def work():
            holder = binding.holder_for(pool)
            conn = binding.take(pool, holder)
            pool.park(conn, holder)
            parked.set()
            release.wait(WAIT)
        worker = start(self, work)
        parked.wait(WAIT)
        lent = pool.getconn()
        release.set()
        worker.finish(self)
        # The ended thread does not take back what was lent away.
        self.assertEqual(pool.stats()["in_use"], 1)
        self.assertWorks(lent)
        pool.putconn(lent)
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_parked_connections_shrink_like_idle_ones(self):
        pool = self._makePool(minconn=0, max_idle=0.1)
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        pool.park(conn, holder)
        # The maintainer forgets it under the lock and closes it after.
        wait_for(lambda: pool.stats()["size"] == 0 and conn.closed,
                 "the parked one to go")
        self.assertTrue(conn.closed)
        again = binding.take(pool, holder)
        self.assertIsNot(again, conn)
        self.assertWorks(again)
        binding.put(pool, holder)

    def test_parked_connection_past_its_lifetime_is_replaced(self):
        pool = self._makePool(max_lifetime=0.1)
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        pool.park(conn, holder)
        wait_for(lambda: conn._zp_expires < time.monotonic(),
                 "the lifetime to pass")
        again = binding.take(pool, holder)
        self.assertIsNot(again, conn)
        self.assertTrue(conn.closed)
        binding.put(pool, holder)
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_pool_closed_with_parked_connections(self):
        pool = self._makePool()
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        pool.park(conn, holder)
        pool.close()
        self.assertTrue(conn.closed)
        binding.put(pool, holder)    # nothing to give back; no error
        self.assertEqual(pool.stats()["size"], 0)


class ParkedConnectionBookTests(BindingTestBase):
    """What parking and taking back do to a connection's record: the
    checks its thread's next transaction runs, and the pool's counters."""

    def terminate(self, *conns):
        terminate(self.layer.dsn, *conns)

    def found_dead(self, pool, conn):
        """Let the pool find ``conn`` dead, as a request would."""
        with self.assertRaises(psycopg2.OperationalError):
            conn.cursor().execute("SELECT 1")
        pool.putconn(conn)

    def test_a_lent_connection_is_checked_first(self):
        # Its session died while it was parked: the thread it is lent to
        # gets a connection that works instead.
        pool = self._makePool(minconn=0, maxconn=1, timeout=WAIT,
                              health_check_after=0.1)
        holder = binding.holder_for(pool)
        mine = binding.take(pool, holder)
        self.assertTrue(pool.park(mine, holder))
        self.terminate(mine)
        time.sleep(0.2)
        lent = start(self, pool.getconn).finish(self)
        self.assertIsNot(lent, mine)
        self.assertWorks(lent)
        self.assertEqual(pool.stats()["connections_lost"], 1)
        pool.putconn(lent)

    def test_parked_longer_than_health_check_after(self):
        # Its session died while it was parked (a server restart in the
        # night): pinged before its thread's next transaction, and replaced.
        pool = self._makePool(health_check_after=0.1)
        holder = binding.holder_for(pool)
        mine = binding.take(pool, holder)
        self.assertTrue(pool.park(mine, holder))
        self.terminate(mine)
        time.sleep(0.2)
        again = binding.take(pool, holder)
        self.assertIsNot(again, mine)
        self.assertWorks(again)
        self.assertEqual(pool.stats()["connections_lost"], 1)
        binding.put(pool, holder)

    def test_parked_after_a_loss_but_opened_before_it(self):
        # A thread's connection, opened before one found dead, is parked
        # after the loss without having been used since (an empty
        # transaction): it may have died with the other (a server
        # restart), so its thread does not get it back unchecked.
        pool = self._makePool(maxconn=3)
        holder = binding.holder_for(pool)
        mine = binding.take(pool, holder)
        other = pool.getconn()
        self.terminate(mine, other)
        self.found_dead(pool, other)
        self.assertTrue(pool.park(mine, holder))
        again = binding.take(pool, holder)
        self.assertIsNot(again, mine)
        self.assertTrue(mine.closed)
        self.assertWorks(again)
        binding.put(pool, holder)
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_parked_before_a_loss_and_opened_after_it(self):
        # Opened after the connection found dead, so not retired with it;
        # but parked before the loss and unused since: pinged before its
        # thread's next transaction, found dead, and replaced.
        pool = self._makePool(maxconn=3)
        other = pool.getconn()
        holder = binding.holder_for(pool)
        mine = binding.take(pool, holder)
        self.assertTrue(pool.park(mine, holder))
        self.terminate(mine, other)
        self.found_dead(pool, other)
        again = binding.take(pool, holder)
        self.assertIsNot(again, mine)
        self.assertWorks(again)
        stats = pool.stats()
        self.assertEqual(stats["connections_lost"], 2)
        binding.put(pool, holder)

    def test_a_connection_in_steady_use_is_not_idle(self):
        # A thread that runs a transaction now and then parks its
        # connection each time; it counts as used at each, so max_idle
        # does not take it away from a thread that keeps using it.
        pool = self._makePool(minconn=0, max_idle=0.2)
        holder = binding.holder_for(pool)
        conn = binding.take(pool, holder)
        time.sleep(0.3)     # a transaction longer than max_idle
        self.assertTrue(pool.park(conn, holder))
        pool._maintainer.run_once(pool)
        self.assertIs(binding.take(pool, holder), conn)
        self.assertFalse(conn.closed)
        stats = pool.stats()
        self.assertEqual((stats["connections_opened"],
                          stats["connections_discarded"]), (1, 0))
        binding.put(pool, holder)

    def test_taking_back_a_parked_connection_is_a_checkout(self):
        pool = self._makePool()
        holder = binding.holder_for(pool)
        for _ in range(3):
            conn = binding.take(pool, holder)
            self.assertTrue(pool.park(conn, holder))
        stats = pool.stats()
        self.assertEqual((stats["checkouts"], stats["connections_opened"]),
                         (3, 1))
        binding.put(pool, holder)


class ThreadEndTests(BindingTestBase):
    """What a thread's end does to the transaction integration's state."""

    def test_dead_threads_transaction_no_longer_reaches_the_connection(self):
        import transaction
        table = self.make_table()
        pool = self._makePool(maxconn=1, timeout=WAIT)

        def work():
            conn = pool.connection()
            conn.cursor().execute("INSERT INTO %s VALUES (1)" % table)
            # The thread ends in its transaction; someone keeps it.
            return transaction.get(), conn
        txn, conn = start(self, work).finish(self)
        self.released(pool)
        self.assertEqual(self.rows(table), [])
        # The one connection now serves this thread's transaction.
        mine = pool.connection()
        self.assertIs(mine, conn)
        mine.cursor().execute("INSERT INTO %s VALUES (2)" % table)
        # Aborting the dead thread's transaction must not touch it.
        txn.abort()
        transaction.commit()
        self.assertEqual(self.rows(table), [2])
        self.assertEqual(pool.stats()["in_use"], 0)

    def test_living_threads_do_not_keep_a_dropped_pool_alive(self):
        import gc
        import weakref
        pool = PersistentConnectionPool(0, 2, self.layer.dsn,
                                        name=self.name)
        done, release = threading.Event(), threading.Event()

        def work():
            pool.getconn()
            pool.putconn()      # the thread keeps only its (empty) claim
            done.set()
            release.wait(WAIT)
        worker = start(self, work)
        self.addCleanup(worker.finish, self)
        self.addCleanup(release.set)
        done.wait(WAIT)
        pool.closeall()
        ref = weakref.ref(pool)
        del pool
        gc.collect()
        self.assertIsNone(ref())
