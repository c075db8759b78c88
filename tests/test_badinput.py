"""Bad input, one test per row of the README's "When things go wrong"
table: each checks the message a user sees, and that the pool (or a pool
built right after) still serves."""
import os
import unittest

import psycopg2
import transaction
from zope.component import getGlobalSiteManager

from zpgpool import ConnectError
from zpgpool import ConnectionMisuse
from zpgpool import ConnectionPool
from zpgpool import InvalidOption
from zpgpool import PoolClosed
from zpgpool import PoolError
from zpgpool.testing import POSTGRES_LAYER

from tests.poolhelpers import NO_TWOPHASE_LAYER
from tests.poolhelpers import LogCapture
from tests.poolhelpers import close_pool
from tests.poolhelpers import unique_name
from tests.poolhelpers import with_params


class _Base(unittest.TestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        transaction.abort()
        self.name = unique_name("bad")
        self.log = LogCapture().install(self)

    def tearDown(self):
        transaction.abort()

    def _makeOne(self, dsn=None, **kw):
        kw.setdefault("name", self.name)
        kw.setdefault("maxconn", 2)
        pool = ConnectionPool(self.layer.dsn if dsn is None else dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def assertServes(self, pool=None):
        """A transaction through ``connection()`` works (on a new pool
        when none is given, for errors raised while building one)."""
        pool = pool or self._makeOne(name=self.name + "_ok")
        with transaction.manager:
            cur = pool.connection().cursor()
            cur.execute("SELECT 42")
            self.assertEqual(cur.fetchone(), (42,))
        with pool.checkout() as conn:
            conn.cursor().execute("SELECT 1")

    def assertRaisesMessage(self, exc_class, parts, func, *args, **kw):
        with self.assertRaises(exc_class) as caught:
            func(*args, **kw)
        message = str(caught.exception)
        for part in parts:
            self.assertIn(part, message)
        return message


class BadInputTests(_Base):

    def test_broken_dsn_syntax(self):
        self.assertRaisesMessage(
            InvalidOption,
            ["zpgpool pool %r: invalid connection string" % self.name,
             'missing "=" after "dbname"'],
            self._makeOne, "host=localhost dbname")
        self.assertServes()

    def test_unknown_host(self):
        pool = self._makeOne("host=no-such-host.invalid connect_timeout=2")
        self.assertRaisesMessage(
            ConnectError,
            ["zpgpool pool %r: cannot connect to host=no-such-host.invalid"
             % self.name, "no-such-host.invalid"],
            pool.getconn)
        self.assertEqual(pool.stats()["in_use"], 0)
        self.assertServes()

    def test_wrong_password(self):
        secret = "wrong-Secret-42"
        pool = self._makeOne(with_params(self.layer.dsn, password=secret))
        message = self.assertRaisesMessage(
            ConnectError, ["zpgpool pool %r: cannot connect to" % self.name,
                           "password authentication failed"],
            pool.connection)
        self.assertNotIn(secret, message)
        self.assertNotIn(secret, repr(pool))
        self.assertNotIn(secret, self.log.text())
        self.assertNotIn(secret, str(pool.stats()))
        self.assertServes()

    def test_database_missing(self):
        pool = self._makeOne(with_params(self.layer.dsn, dbname="no_such_db"))
        self.assertRaisesMessage(
            ConnectError, ['database "no_such_db" does not exist',
                           "dbname=no_such_db"],
            pool.getconn)
        self.assertServes()

    def test_every_option_with_a_wrong_type_or_range(self):
        cases = [
            ("minconn", -1, "option 'minconn' must be an integer >= 0"),
            ("minconn", 1.5, "option 'minconn' must be an integer >= 0"),
            ("maxconn", 0, "option 'maxconn' must be an integer >= 1"),
            ("maxconn", "10", "option 'maxconn' must be an integer >= 1"),
            ("maxconn", True, "option 'maxconn' must be an integer >= 1"),
            ("timeout", -1, "option 'timeout' must be a number of seconds"
             " >= 0"),
            ("timeout", "30", "option 'timeout' must be a number"),
            ("timeout", float("nan"), "option 'timeout' must be a number"),
            ("max_lifetime", 0, "option 'max_lifetime' must be a number of"
             " seconds > 0 or None"),
            ("max_idle", -5, "option 'max_idle' must be"),
            ("health_check_after", -1, "option 'health_check_after' must"),
            ("leak_threshold", 0, "option 'leak_threshold' must be"),
            ("connect_timeout", 2.5, "option 'connect_timeout' must be an"
             " integer >= 0"),
            ("reconnect_max_delay", 0, "option 'reconnect_max_delay' must"),
            ("twophase", "yes", "option 'twophase' must be True or False"),
            ("readonly", 1, "option 'readonly' must be True or False"),
            ("deferrable", None, "option 'deferrable' must be True or"
             " False"),
            ("isolation_level", "chaos", "option 'isolation_level' must be"
             " None or one of"),
            ("name", 7, "option 'name' must be a string"),
            ("application_name", 7, "option 'application_name' must be a"
             " string"),
            # The dotted name, which only ZCML resolves.
            ("transaction_manager", "transaction.manager", "option "
             "'transaction_manager' must be a transaction manager (an "
             "ITransactionManager, such as transaction.manager or "
             "pyramid_tm's request.tm), or None for transaction.manager"),
        ]
        for option, value, expected in cases:
            with self.subTest(option=option, value=value):
                message = self.assertRaisesMessage(
                    InvalidOption, [expected], self._makeOne,
                    **{option: value})
                self.assertIn(repr(value) if option != "name" else "7",
                              message)
        self.assertRaisesMessage(
            InvalidOption, ["minconn (3) must not be greater than maxconn "
                            "(2)"], self._makeOne, minconn=3, maxconn=2)
        self.assertRaisesMessage(
            InvalidOption, ["dsn must be a string, got bytes"],
            self._makeOne, b"dbname=x")
        self.assertServes()

    def test_values_of_the_right_type_but_not_allowed(self):
        cases = [
            # psycopg2's constants are small integers; others mean nothing.
            ("isolation_level", 7, "option 'isolation_level' must be None"
             " or one of"),
            ("configure", "myapp.setup", "option 'configure' must be None or"
             " a callable"),
            ("validation_timeout", 0, "option 'validation_timeout' must be a"
             " number of seconds > 0"),
        ]
        for option, value, expected in cases:
            with self.subTest(option=option, value=value):
                message = self.assertRaisesMessage(
                    InvalidOption, [expected], self._makeOne,
                    **{option: value})
                self.assertIn(repr(value), message)
        self.assertServes()

    def test_unknown_options(self):
        self.assertRaisesMessage(
            InvalidOption, ["unknown option maxconns; valid options are: ",
                            "maxconn"],
            self._makeOne, maxconns=3)
        self.assertRaisesMessage(
            InvalidOption, ['invalid connection option "sslmodee"'],
            self._makeOne, connect_kwargs={"sslmodee": "require"})
        self.assertServes()

    def test_putconn_of_a_foreign_connection(self):
        pool = self._makeOne()
        other = self._makeOne(name=self.name + "_other")
        theirs = other.getconn()
        self.addCleanup(other.putconn, theirs)
        plain = psycopg2.connect(self.layer.dsn)
        self.addCleanup(plain.close)
        for conn in (theirs, plain):
            self.assertRaisesMessage(
                ConnectionMisuse,
                ["zpgpool pool %r: cannot return" % self.name,
                 "does not belong to this pool"],
                pool.putconn, conn)
        self.assertServes(pool)

    def test_putconn_of_an_already_returned_connection(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn(conn)
        mine = pool.getconn()    # the same one, now someone else's
        self.assertIs(mine, conn)
        pool.putconn(mine)
        self.assertRaisesMessage(
            ConnectionMisuse, ["it is not checked out (it was returned "
                               "already)"], pool.putconn, conn)
        self.assertEqual(pool.stats()["in_use"], 0)
        self.assertServes(pool)

    def test_putconn_twice(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.putconn(conn)
        self.assertRaisesMessage(
            ConnectionMisuse, ["cannot return the connection: it is not "
                               "checked out (it was returned already)"],
            pool.putconn, conn)
        stats = pool.stats()
        self.assertEqual((stats["in_use"], stats["idle"]), (0, 1))
        self.assertServes(pool)

    def test_a_call_timeout_that_is_no_number_of_seconds(self):
        pool = self._makeOne(maxconn=1)
        held = pool.getconn()
        calls = (pool.getconn, lambda timeout: pool.checkout(timeout).__enter__())
        for value in ("1", -1, float("nan"), True, [1]):
            for call in calls:
                self.assertRaisesMessage(
                    InvalidOption,
                    ["zpgpool pool %r" % self.name, "timeout must be a "
                     "number of seconds >= 0", "None for the pool's timeout",
                     "got %r" % (value,)],
                    call, timeout=value)
        # Nothing was left waiting for the connection that comes back.
        self.assertEqual(pool.stats()["waiting"], 0)
        pool.putconn(held)
        self.assertIs(pool.getconn(timeout=0), held)
        pool.putconn(held)
        self.assertServes(pool)

    def test_connection_given_what_is_no_transaction_manager(self):
        pool = self._makeOne()
        for wrong in ("transaction.manager", {}, transaction.get()):
            message = self.assertRaisesMessage(
                InvalidOption, [], pool.connection, wrong)
            self.assertEqual(
                message, "zpgpool pool %r: connection() takes a transaction "
                "manager (an ITransactionManager, such as transaction.manager"
                " or pyramid_tm's request.tm), got %r" % (self.name, wrong))
        self.assertServes(pool)

    def test_use_after_close(self):
        pool = self._makeOne()
        conn = pool.getconn()
        pool.close(timeout=0)
        for call in (pool.getconn, pool.connection, pool.open):
            self.assertRaisesMessage(
                PoolClosed, ["zpgpool pool %r is closed" % self.name], call)
        with self.assertRaises(PoolClosed):
            with pool.checkout():
                pass    # pragma: no cover
        # The connection still out goes back (and is closed) quietly.
        pool.putconn(conn)
        self.assertTrue(conn.closed)
        self.assertRaisesMessage(
            ConnectionMisuse, ["it was closed by the pool"],
            pool.putconn, conn)
        self.assertServes()

    def test_managed_connection_committed_by_hand(self):
        pool = self._makeOne()
        transaction.begin()
        conn = pool.connection()
        conn.cursor().execute("SELECT 1")
        for what, call in (("commit()", conn.commit),
                           ("rollback()", conn.rollback)):
            self.assertRaisesMessage(
                ConnectionMisuse, ["%s is not allowed on a connection from "
                                   "connection()" % what,
                                   "transaction.commit()"], call)
        with self.assertRaises(ConnectionMisuse):
            conn.autocommit = True
        transaction.abort()
        self.assertServes(pool)

    def test_zcml_with_a_missing_environment_variable(self):
        from zope.configuration import xmlconfig
        from zope.configuration.exceptions import ConfigurationError
        os.environ.pop("ZPGPOOL_NO_SUCH_VARIABLE", None)
        with self.assertRaises(ConfigurationError) as caught:
            xmlconfig.string("""
            <configure xmlns="http://namespaces.zope.org/zope"
                       xmlns:zpgpool="http://namespaces.zope.org/zpgpool">
              <include package="zpgpool" />
              <zpgpool:pool name="%s" dsn="env:ZPGPOOL_NO_SUCH_VARIABLE" />
            </configure>""" % self.name)
        message = str(caught.exception)
        self.assertIn("ZPGPOOL_NO_SUCH_VARIABLE", message)
        self.assertIn("not set", message)
        self.assertIn('File "<string>", line 5', message)
        # Nothing was registered; a pool built afterwards serves.
        from zpgpool.interfaces import IConnectionPool
        gsm = getGlobalSiteManager()
        self.assertIsNone(gsm.queryUtility(IConnectionPool, self.name))
        self.assertServes()


class TwoPhaseDisallowedTests(_Base):

    layer = NO_TWOPHASE_LAYER

    def test_twophase_on_a_server_that_disallows_it(self):
        pool = self._makeOne(twophase=True)
        transaction.begin()
        message = self.assertRaisesMessage(
            PoolError, ["zpgpool pool %r: twophase=True needs the server "
                        "setting max_prepared_transactions > 0, but it is 0"
                        % self.name], pool.connection)
        self.assertIn("twophase=False", message)
        transaction.abort()
        self.assertEqual(pool.stats()["in_use"], 0)
        # The same server serves a one-phase pool.
        self.assertServes()
