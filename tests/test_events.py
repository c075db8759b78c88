"""The pool's events: their classes, ``notify``, and what a real pool
publishes while it works."""
import copy
import threading
import unittest

import zope.event
from zope.interface.verify import verifyObject

from zpgpool import events
from zpgpool import interfaces
from zpgpool.testing import POSTGRES_LAYER


PASSWORD = "s3cret-Pa55"


def _makePool(dsn="host=127.0.0.1 port=9 dbname=app password=" + PASSWORD,
              **kw):
    from zpgpool.pool import ConnectionPool
    kw.setdefault("name", "main")
    return ConnectionPool(dsn, **kw)


class _SubscribersSaved:
    # zope.event.subscribers is process-wide; each test starts with it
    # empty and leaves it as it found it.

    def setUp(self):
        saved = zope.event.subscribers[:]
        zope.event.subscribers[:] = []

        def restore():
            zope.event.subscribers[:] = saved
        self.addCleanup(restore)


class EventClassTests(unittest.TestCase):

    def setUp(self):
        self.pool = _makePool()
        self.addCleanup(self.pool.close, 0)
        self.connection = object()  # events only carry it

    def _check(self, iface, event, **attrs):
        verifyObject(iface, event)
        self.assertTrue(iface.extends(interfaces.IPoolEvent))
        self.assertIs(event.pool, self.pool)
        for name, value in attrs.items():
            self.assertEqual(getattr(event, name), value)
        # A repr ends up in logs: it names the pool, never its DSN.
        self.assertTrue(repr(event).startswith(
            "<%s pool='main'" % type(event).__name__), repr(event))
        self.assertNotIn(PASSWORD, repr(event))
        self.assertNotIn("host=", repr(event))
        # Compared and hashed by identity: a subscriber may keep events in
        # a set, and two alike are still two.
        twin = copy.copy(event)
        self.assertNotEqual(event, twin)
        self.assertEqual(len({event, twin}), 2)

    def test_ConnectionCreated(self):
        event = events.ConnectionCreated(self.pool, self.connection, 0.25)
        self._check(interfaces.IConnectionCreated, event,
                    connection=self.connection, connect_time=0.25)
        self.assertEqual(repr(event),
                         "<ConnectionCreated pool='main' connect_time=0.250>")

    def test_ConnectionCheckedOut(self):
        event = events.ConnectionCheckedOut(self.pool, self.connection, 1.5)
        self._check(interfaces.IConnectionCheckedOut, event,
                    connection=self.connection, wait_time=1.5)
        self.assertEqual(repr(event),
                         "<ConnectionCheckedOut pool='main' wait_time=1.500>")

    def test_ConnectionReturned(self):
        event = events.ConnectionReturned(self.pool, self.connection)
        self._check(interfaces.IConnectionReturned, event,
                    connection=self.connection)
        self.assertEqual(repr(event), "<ConnectionReturned pool='main'>")

    def test_ConnectionDiscarded(self):
        event = events.ConnectionDiscarded(self.pool, self.connection,
                                           "broken")
        self._check(interfaces.IConnectionDiscarded, event,
                    connection=self.connection, reason="broken")
        self.assertEqual(repr(event),
                         "<ConnectionDiscarded pool='main' reason='broken'>")

    def test_PoolExhausted(self):
        event = events.PoolExhausted(self.pool, 3)
        self._check(interfaces.IPoolExhausted, event, waiting=3)
        self.assertEqual(repr(event), "<PoolExhausted pool='main' waiting=3>")

    def test_PoolClosed(self):
        event = events.PoolClosed(self.pool)
        self._check(interfaces.IPoolClosed, event)
        self.assertEqual(repr(event), "<PoolClosed pool='main'>")


class NotifyTests(_SubscribersSaved, unittest.TestCase):

    def test_builds_nothing_without_subscribers(self):
        built = []

        def factory(*args):
            built.append(args)  # pragma: no cover - must not run

        events.notify(factory, "pool", 1)
        self.assertEqual(built, [])

    def test_builds_and_publishes_with_a_subscriber(self):
        received = []
        zope.event.subscribers.append(received.append)
        pool = _makePool()
        self.addCleanup(pool.close, 0)
        events.notify(events.PoolExhausted, pool, 2)
        [event] = received
        self.assertIsInstance(event, events.PoolExhausted)
        self.assertEqual((event.pool, event.waiting), (pool, 2))


    def test_component_dispatch_alone_builds_only_for_a_handler(self):
        # In a Zope site zope.component's dispatcher is always subscribed;
        # events are built only when a handler for them is registered.
        import zope.component.event
        import zope.component.testing
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        zope.event.subscribers.append(zope.component.event.dispatch)
        built = []

        class Probe(events.PoolExhausted):
            def __init__(self, *args):
                built.append(args)
                super().__init__(*args)

        pool = _makePool()
        self.addCleanup(pool.close, 0)
        # Asked again, the kept answer is still no.
        events.notify(Probe, pool, 1)
        events.notify(Probe, pool, 1)
        self.assertEqual(built, [])
        received = []
        zope.component.provideHandler(received.append,
                                      (interfaces.IPoolExhausted,))
        events.notify(Probe, pool, 2)
        self.assertEqual(built, [(pool, 2)])
        self.assertEqual([e.waiting for e in received], [2])
        # The answer is kept, but not past a change of the registry.
        zope.component.getGlobalSiteManager().unregisterHandler(
            received.append, (interfaces.IPoolExhausted,))
        events.notify(Probe, pool, 3)
        events.notify(Probe, pool, 3)
        self.assertEqual(built, [(pool, 2)])

    def test_a_plain_subscriber_beside_the_component_dispatch(self):
        # A plain zope.event subscriber added in a Zope site, after the
        # pool has asked who listens, gets every event, whether or not a
        # handler is registered; once it is gone, nobody listens again.
        import zope.component.event
        import zope.component.testing
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        zope.event.subscribers.append(zope.component.event.dispatch)
        pool = _makePool()
        self.addCleanup(pool.close, 0)
        self.assertFalse(events.listening(events.PoolExhausted))
        received = []
        zope.event.subscribers.append(received.append)
        events.notify(events.PoolExhausted, pool, 1)
        self.assertEqual([e.waiting for e in received], [1])
        zope.event.subscribers.remove(received.append)
        self.assertFalse(events.listening(events.PoolExhausted))

    def test_a_local_site_sees_its_own_and_its_bases_handlers(self):
        # A Zope or Plone site has a registry of its own, derived from the
        # global one: a handler registered in either is found, whenever
        # it is registered.
        import zope.component.event
        import zope.component.testing
        from zope.interface.registry import Components
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        if zope.component.event.dispatch not in zope.event.subscribers:
            zope.event.subscribers.append(zope.component.event.dispatch)
        base = zope.component.getGlobalSiteManager()
        local = Components("site", bases=(base,))
        other = Components("other", bases=(base,))
        current = [local]
        zope.component.getSiteManager.sethook(
            lambda context=None: current[0])
        self.addCleanup(zope.component.getSiteManager.reset)
        factory = events.PoolExhausted
        pool = _makePool()
        self.addCleanup(pool.close, 0)
        received = []
        events.notify(factory, pool, 1)
        base.registerHandler(received.append, (interfaces.IPoolExhausted,))
        events.notify(factory, pool, 2)
        base.unregisterHandler(received.append, (interfaces.IPoolExhausted,))
        events.notify(factory, pool, 3)
        local.registerHandler(received.append, (interfaces.IPoolExhausted,))
        # The other site changed as often, for another event.
        other.registerHandler(received.append, (interfaces.IPoolClosed,))
        events.notify(factory, pool, 4)
        self.assertTrue(events.listening(factory))
        current[0] = other      # another site: not this one's handler
        self.assertFalse(events.listening(factory))
        events.notify(factory, pool, 5)
        current[0] = local
        events.notify(factory, pool, 6)
        self.assertEqual([e.waiting for e in received], [2, 4, 6])


class PublishedEventTests(_SubscribersSaved, unittest.TestCase):
    """What a pool at work tells a subscriber, against a real server."""

    layer = POSTGRES_LAYER

    def setUp(self):
        super().setUp()
        self.received = []
        zope.event.subscribers.append(self._record)

    def _record(self, event):
        # Only this test's pool: other pools may live in the process.
        if getattr(event, "pool", None) is getattr(self, "pool", None):
            self.received.append(event)

    def _makeOne(self, **kw):
        # minconn 0: no background connect, so the events are the ones
        # the test's own calls cause, in order.
        kw.setdefault("minconn", 0)
        self.pool = _makePool(self.layer.dsn, **kw)
        self.addCleanup(self.pool.close, 0)
        return self.pool

    def _kinds(self):
        return [type(event).__name__ for event in self.received]

    def test_getconn_and_putconn(self):
        pool = self._makeOne()
        conn = pool.getconn()
        self.assertEqual(self._kinds(),
                         ["ConnectionCreated", "ConnectionCheckedOut"])
        created, checked_out = self.received
        self.assertIs(created.connection, conn)
        self.assertGreaterEqual(created.connect_time, 0.0)
        self.assertIs(checked_out.connection, conn)
        self.assertGreaterEqual(checked_out.wait_time, 0.0)
        del self.received[:]

        pool.putconn(conn)
        self.assertEqual(self._kinds(), ["ConnectionReturned"])
        self.assertIs(self.received[0].connection, conn)

    def test_one_handler_for_every_connection_event(self):
        # A handler registered for IConnectionEvent, through
        # zope.component's dispatch as in a Zope site.
        import zope.component.event
        import zope.component.testing
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        zope.event.subscribers.append(zope.component.event.dispatch)
        seen = []
        zope.component.provideHandler(seen.append,
                                      (interfaces.IConnectionEvent,))
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn(conn)
        pool.putconn(pool.getconn(), close=True)
        pool.close()
        self.assertEqual(
            [type(event).__name__ for event in seen if event.pool is pool],
            ["ConnectionCreated", "ConnectionCheckedOut",
             "ConnectionReturned", "ConnectionCheckedOut",
             "ConnectionDiscarded"])
        self.assertEqual(self._kinds()[-1], "PoolClosed")

    def test_discarded_with_a_reason(self):
        pool = self._makeOne()
        conn = pool.getconn()
        del self.received[:]
        pool.putconn(conn, close=True)
        [event] = self.received
        self.assertIsInstance(event, events.ConnectionDiscarded)
        self.assertIs(event.connection, conn)
        self.assertIsInstance(event.reason, str)
        self.assertTrue(event.reason)
        self.assertTrue(conn.closed)

    def test_closed(self):
        pool = self._makeOne()
        pool.putconn(pool.getconn())
        del self.received[:]
        pool.close()
        self.assertEqual(self._kinds(), ["ConnectionDiscarded", "PoolClosed"])
        pool.close()  # a second close publishes nothing more
        self.assertEqual(self._kinds(), ["ConnectionDiscarded", "PoolClosed"])

    def test_exhausted(self):
        pool = self._makeOne(maxconn=1, timeout=10.0)
        conn = pool.getconn()
        del self.received[:]
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
        waiter.start()
        # The waiter announces that it waits before it waits; give it the
        # connection once it has.
        for _ in range(1000):
            if self.received:
                break
            threading.Event().wait(0.01)
        pool.putconn(conn)
        waiter.join(10)
        exhausted = [e for e in self.received
                     if isinstance(e, events.PoolExhausted)]
        self.assertEqual(len(exhausted), 1, self._kinds())
        self.assertEqual(exhausted[0].waiting, 1)
        self.assertEqual(got, [conn])
        pool.putconn(conn)
