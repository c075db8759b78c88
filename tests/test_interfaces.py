"""Every pool implementation against ``IConnectionPool``, and the shape of
the contract itself."""
import unittest

from zope.interface import Interface
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyClass
from zope.interface.verify import verifyObject

from zpgpool import interfaces


# A DSN that names a server nobody runs: the pools below are only built,
# and building one connects to nothing.
DSN = "host=127.0.0.1 port=9 dbname=nothing user=nobody password=s3cret"


class ConnectionPoolTests(unittest.TestCase):

    def _getTargetClass(self):
        from zpgpool.pool import ConnectionPool
        return ConnectionPool

    def _makeOne(self, **kw):
        pool = self._getTargetClass()(DSN, **kw)
        self.addCleanup(pool.close, 0)
        return pool

    def test_class_conforms_to_IConnectionPool(self):
        verifyClass(interfaces.IConnectionPool, self._getTargetClass())

    def test_instance_conforms_to_IConnectionPool(self):
        verifyObject(interfaces.IConnectionPool, self._makeOne(name="main"))

    def test_is_exported_from_the_package(self):
        import zpgpool
        self.assertIs(zpgpool.ConnectionPool, self._getTargetClass())

    def test_dsn_attribute_hides_the_password(self):
        pool = self._makeOne(name="main")
        self.assertNotIn("s3cret", pool.dsn)
        self.assertNotIn("s3cret", repr(pool))


class _Psycopg2StyleTests:
    # The psycopg2-compatible classes take (minconn, maxconn, dsn); with
    # minconn 0 they open nothing when built.

    def _makeOne(self):
        pool = self._getTargetClass()(0, 2, DSN)
        self.addCleanup(pool.close, 0)
        return pool

    def test_instance_conforms_to_IConnectionPool(self):
        verifyObject(interfaces.IConnectionPool, self._makeOne())

    def test_is_a_ConnectionPool(self):
        from zpgpool.pool import ConnectionPool
        self.assertIsInstance(self._makeOne(), ConnectionPool)


class SimpleConnectionPoolTests(_Psycopg2StyleTests, unittest.TestCase):

    def _getTargetClass(self):
        from zpgpool.pool import SimpleConnectionPool
        return SimpleConnectionPool


class ThreadedConnectionPoolTests(_Psycopg2StyleTests, unittest.TestCase):

    def _getTargetClass(self):
        from zpgpool.pool import ThreadedConnectionPool
        return ThreadedConnectionPool


class PersistentConnectionPoolTests(_Psycopg2StyleTests, unittest.TestCase):

    def _getTargetClass(self):
        from zpgpool.pool import PersistentConnectionPool
        return PersistentConnectionPool


class ContractTests(unittest.TestCase):
    """What a reader of interfaces.py relies on."""

    EVENTS = ("IConnectionCreated", "IConnectionCheckedOut",
              "IConnectionReturned", "IConnectionDiscarded",
              "IPoolExhausted", "IPoolClosed")

    def test_IConnectionPool_names_the_whole_api(self):
        names = set(interfaces.IConnectionPool.names())
        self.assertEqual(names, {
            # the psycopg2.pool contract
            "getconn", "putconn", "closeall", "minconn", "maxconn",
            "closed",
            # the rest
            "close", "open", "checkout", "connection", "stats", "name",
            "dsn", "timeout", "twophase", "transaction_manager",
        })

    def test_every_member_is_documented(self):
        for iface in [interfaces.IConnectionPool, interfaces.IPoolEvent,
                      interfaces.IConnectionEvent] + [
                getattr(interfaces, name) for name in self.EVENTS]:
            self.assertTrue(iface.__doc__.strip(), iface)
            for name, member in iface.namesAndDescriptions():
                # Methods open with one imperative line, then say more.
                self.assertTrue(member.getDoc().strip(),
                                "%s.%s" % (iface.__name__, name))

    def test_method_signatures(self):
        spec = {name: member.getSignatureString()
                for name, member in
                interfaces.IConnectionPool.namesAndDescriptions()
                if hasattr(member, "getSignatureString")}
        self.assertEqual(spec, {
            "getconn": "(key=None, timeout=None)",
            "putconn": "(conn=None, key=None, close=False)",
            "closeall": "()",
            "close": "(timeout=5.0)",
            "open": "(wait=False, timeout=30.0)",
            "checkout": "(timeout=None)",
            "connection": "(transaction_manager=None)",
            "stats": "()",
        })

    def test_events_extend_IPoolEvent(self):
        for name in self.EVENTS:
            iface = getattr(interfaces, name)
            self.assertTrue(iface.extends(interfaces.IPoolEvent), name)
            self.assertIn("pool", iface)

    def test_connection_events_extend_IConnectionEvent(self):
        for name in self.EVENTS:
            iface = getattr(interfaces, name)
            about_a_connection = name.startswith("IConnection")
            self.assertEqual(iface.extends(interfaces.IConnectionEvent),
                             about_a_connection, name)
            self.assertEqual("connection" in iface, about_a_connection, name)

    def test_module_holds_only_interfaces(self):
        # interfaces.py is the contract: no code lives there.
        for name, value in vars(interfaces).items():
            if name.startswith("_") or value in (Interface, ):
                continue
            if isinstance(value, InterfaceClass):
                continue
            self.assertIn(name, ("Attribute", "Interface"), name)
