"""The ``<zpgpool:pool>`` directive, the exit hook, and pools registered
with the standard ``<utility>`` directive.

Most tests read ZCML with ``xmlconfig.string``; those that use a pool do so
against the real server of ``POSTGRES_LAYER``.
"""
import logging
import os
import tempfile
import sys
import unittest
from unittest import mock
from xml.sax.saxutils import quoteattr

import psycopg2.extensions
import transaction
import zope.component.testing
from zope.component import getGlobalSiteManager
from zope.component import getUtility
from zope.component import provideUtility
from zope.component import queryUtility
from zope.configuration import xmlconfig
from zope.configuration.config import ConfigurationConflictError
from zope.configuration.config import ConfigurationMachine
from zope.configuration.exceptions import ConfigurationError
from zope.interface import implementer
from zope.schema import getFieldsInOrder

from zpgpool import ConnectionPool
from zpgpool import zcml
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing import POSTGRES_LAYER


PASSWORD = "s3cret-Pa55"
# A DSN for pools that are only built: nobody listens on port 9.
OFFLINE_DSN = "host=127.0.0.1 port=9 dbname=app user=app password=" + PASSWORD

# The line of the test's own directives in _zcml(): errors point at it.
LINE = 'File "<string>", line 5.'

#: A transaction manager of its own, for the transaction_manager attribute.
tm = transaction.TransactionManager()


def configure_connection(conn):
    """What the configure attribute names in the tests: the pool's own
    tests check that it is run; here only that it reaches the pool."""


#: For the <utility component="..."> test; set by the test.
component_pool = None

#: What the ZCML-registered subscribers received.
received = []


def record(event):
    received.append(event)


def _zcml(body):
    return (
        '<configure xmlns="http://namespaces.zope.org/zope"\n'
        '           xmlns:zpgpool="http://namespaces.zope.org/zpgpool">\n'
        '  <include package="zpgpool" />\n'
        '\n'
        '  %s\n'
        '</configure>\n' % body)


def _pool(dsn=OFFLINE_DSN, **attrs):
    """A <zpgpool:pool> element; attribute values are quoted here."""
    attrs.setdefault("name", "main")
    text = " ".join("%s=%s" % (key, quoteattr(value))
                    for key, value in attrs.items())
    return "<zpgpool:pool dsn=%s %s />" % (quoteattr(dsn), text)


class _Base(unittest.TestCase):

    def setUp(self):
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        # Runs before the registry is torn down (cleanups run last first).
        self.addCleanup(self._close_pools)
        self._pools = []

    def _close_pools(self):
        for pool in self._pools:
            pool.close(0)

    def _load(self, body):
        """Read the ZCML and return the pools it registered."""
        xmlconfig.string(_zcml(body))
        registered = dict(
            getGlobalSiteManager().getUtilitiesFor(IConnectionPool))
        self._pools.extend(registered.values())
        return registered

    def _error(self, body, kind=ConfigurationError):
        """Read ZCML that must fail; return the error's text."""
        with self.assertRaises(kind) as caught:
            self._load(body)
        text = str(caught.exception)
        # Whatever went wrong, the password is never shown ...
        self.assertNotIn(PASSWORD, text)
        self.assertNotIn(PASSWORD, repr(caught.exception))
        # ... and nothing was registered.
        self.assertIsNone(queryUtility(IConnectionPool, name="main"))
        return text

    def _setenv(self, name, value):
        saved = os.environ.get(name)
        os.environ[name] = value

        def restore():
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved
        self.addCleanup(restore)

    def _set_component_pool(self, pool):
        # The module global a <utility component="..."> names.
        module = sys.modules[__name__]
        module.component_pool = pool
        self.addCleanup(setattr, module, "component_pool", None)
        self.addCleanup(pool.close, 0)

    def _write(self, text):
        """Write ``text`` (a str, or bytes written as they are) to a new
        file; return its path."""
        fd, path = tempfile.mkstemp(prefix="zpgpool-dsn-")
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return path


class SchemaTests(unittest.TestCase):
    """The directive's schema mirrors the pool's options."""

    def test_every_pool_option_is_an_attribute(self):
        from zpgpool.pool import DEFAULTS
        fields = dict(getFieldsInOrder(zcml.IPoolDirective))
        # connect_kwargs, a mapping, has no ZCML spelling: libpq
        # parameters go into the DSN.
        self.assertEqual(set(fields), set(DEFAULTS) - {"connect_kwargs"}
                         | {"dsn"})

    def test_defaults_are_the_pools_defaults(self):
        from zpgpool.pool import DEFAULTS
        for name, field in getFieldsInOrder(zcml.IPoolDirective):
            if name == "dsn":
                self.assertTrue(field.required)
                continue
            self.assertFalse(field.required, name)
            self.assertEqual(field.default, DEFAULTS[name], name)

    def test_every_field_is_documented(self):
        for name, field in getFieldsInOrder(zcml.IPoolDirective):
            self.assertTrue(field.title, name)
            self.assertTrue(field.description, name)


class FieldTests(unittest.TestCase):
    """Fields used outside a configuration (no context bound)."""

    def test_dsn_from_an_absolute_file_without_context(self):
        path = tempfile.mktemp()
        with open(path, "w") as f:
            f.write("dbname=app\n")
        self.addCleanup(os.remove, path)
        field = zcml.IPoolDirective["dsn"]
        self.assertEqual(field.fromUnicode("file:" + path), "dbname=app")

    def test_dsn_must_be_text(self):
        with self.assertRaises(zcml.InvalidAttribute) as caught:
            zcml.IPoolDirective["dsn"].validate(b"dbname=app")
        self.assertEqual(str(caught.exception),
                         "dsn must be a text, not bytes")

    def test_numbers_are_checked_as_values_too(self):
        with self.assertRaises(zcml.InvalidAttribute) as caught:
            zcml.IPoolDirective["maxconn"].validate(0)
        self.assertIn("maxconn must be a whole number, 1 or more",
                      str(caught.exception))
        with self.assertRaises(zcml.InvalidAttribute) as caught:
            zcml.IPoolDirective["timeout"].validate(-1.0)
        self.assertIn("timeout must be a number of seconds 0 or more",
                      str(caught.exception))

    def test_scrub_password(self):
        from zpgpool.pool import scrub_password as scrub
        self.assertEqual(
            scrub('token: "pw%zz"', "postgresql://app:pw%zz@db/app"),
            'token: "***"')
        self.assertEqual(scrub("a p w b", "host=db password='p w'"),
                         "a *** b")
        self.assertEqual(scrub("x pw y", "host=db sslpassword=pw"),
                         "x *** y")
        self.assertEqual(
            scrub("x pw y", "postgresql://db/app?password=pw&a=1"),
            "x *** y")
        self.assertEqual(scrub("nothing", "host=db"), "nothing")


class RecordedContextTests(_Base):
    """The handlers only record actions; nothing happens until the
    configuration is carried out."""

    def test_pool_records_a_utility_registration(self):
        context = ConfigurationMachine()
        zcml.pool(context, dsn=OFFLINE_DSN, name="main", maxconn=3)
        discriminators = [a["discriminator"] for a in context.actions]
        self.assertIn(("utility", IConnectionPool, "main"), discriminators)
        # Not registered yet.
        self.assertIsNone(queryUtility(IConnectionPool, name="main"))

        context.execute_actions()
        pool = getUtility(IConnectionPool, name="main")
        self._pools.append(pool)
        self.assertEqual((pool.name, pool.maxconn), ("main", 3))
        # Built, not opened: nothing connected to the (absent) server.
        self.assertFalse(pool.closed)
        self.assertEqual(pool.stats()["size"], 0)
        self.assertEqual(pool.stats()["connections_opened"], 0)

    def test_two_pools_on_one_context(self):
        context = ConfigurationMachine()
        zcml.pool(context, dsn=OFFLINE_DSN, name="a")
        zcml.pool(context, dsn=OFFLINE_DSN, name="b")
        # The location is wrapped once, and still answers like one.
        self.assertIsInstance(context.info, zcml._MaskedInfo)
        self.assertNotIsInstance(context.info._info, zcml._MaskedInfo)
        self.assertEqual(context.info.strip(), "")
        self.assertEqual(repr(context.info), repr(""))
        context.execute_actions()
        self._pools.extend(
            getUtility(IConnectionPool, name) for name in "ab")

    def test_pool_rejects_minconn_above_the_default_maxconn(self):
        context = ConfigurationMachine()
        with self.assertRaises(ConfigurationError) as caught:
            zcml.pool(context, dsn=OFFLINE_DSN, name="main", minconn=11)
        self.assertEqual(
            str(caught.exception),
            "<zpgpool:pool name='main'>: minconn (11) must not be greater"
            " than maxconn (10)")
        self.assertEqual(context.actions, [])

    def test_closePoolsAtExit_records_the_hook(self):
        context = ConfigurationMachine()
        zcml.closePoolsAtExit(context)
        [action] = context.actions
        self.assertIsNone(action["discriminator"])
        self.assertIs(action["callable"], zcml.install_exit_hook)


class DirectiveTests(_Base):
    """Every attribute, read with xmlconfig.string."""

    def test_dsn_alone_gives_the_pools_defaults(self):
        from zpgpool.pool import DEFAULTS
        pools = self._load('<zpgpool:pool dsn=%s />' % quoteattr(OFFLINE_DSN))
        pool = pools[""]
        self.assertEqual(pool.name, "")
        for name in ("minconn", "maxconn", "timeout", "max_lifetime",
                     "max_idle", "health_check_after", "leak_threshold",
                     "connect_timeout", "reconnect_max_delay", "twophase",
                     "isolation_level", "readonly", "deferrable"):
            self.assertEqual(getattr(pool, name), DEFAULTS[name], name)
        self.assertIs(pool.transaction_manager, transaction.manager)

    def test_every_attribute(self):
        pools = self._load(_pool(
            name="main", minconn="2", maxconn="7", timeout="2.5",
            max_lifetime="60", max_idle="120.5", health_check_after="0",
            leak_threshold="30", connect_timeout="3",
            reconnect_max_delay="4.5", twophase="yes",
            isolation_level="repeatable read", readonly="true",
            deferrable="1", transaction_manager=__name__ + ".tm",
            configure=__name__ + ".configure_connection",
            application_name="zcml-test"))
        pool = pools["main"]
        self.assertIs(getUtility(IConnectionPool, name="main"), pool)
        self.assertEqual(pool.name, "main")
        self.assertEqual(pool.minconn, 2)
        self.assertEqual(pool.maxconn, 7)
        self.assertEqual(pool.timeout, 2.5)
        self.assertEqual(pool.max_lifetime, 60.0)
        self.assertEqual(pool.max_idle, 120.5)
        self.assertEqual(pool.health_check_after, 0.0)
        self.assertEqual(pool.leak_threshold, 30.0)
        self.assertEqual(pool.connect_timeout, 3)
        self.assertEqual(pool.reconnect_max_delay, 4.5)
        self.assertIs(pool.twophase, True)
        self.assertEqual(pool.isolation_level,
                         psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        self.assertIs(pool.readonly, True)
        self.assertIs(pool.deferrable, True)
        self.assertIs(pool.transaction_manager, tm)
        self.assertIs(pool.configure, configure_connection)
        self.assertIn("application_name=zcml-test", pool.dsn)
        self.assertIn("connect_timeout=3", pool.dsn)
        self.assertIn("host=127.0.0.1", pool.dsn)
        self.assertNotIn(PASSWORD, pool.dsn)
        self.assertNotIn(PASSWORD, repr(pool))

    def test_off_turns_limits_off(self):
        pool = self._load(_pool(
            max_lifetime="off", max_idle="OFF", health_check_after="none",
            leak_threshold="off"))["main"]
        self.assertEqual(
            (pool.max_lifetime, pool.max_idle, pool.health_check_after,
             pool.leak_threshold), (None, None, None, None))

    def test_off_with_white_space_around_it(self):
        pool = self._load(_pool(max_lifetime=" off ",
                                max_idle="None "))["main"]
        self.assertEqual((pool.max_lifetime, pool.max_idle), (None, None))

    def test_zero_where_zero_means_something(self):
        pool = self._load(_pool(minconn="0", timeout="0",
                                connect_timeout="0"))["main"]
        self.assertEqual((pool.minconn, pool.timeout, pool.connect_timeout),
                         (0, 0.0, 0))

    def test_isolation_level_spellings(self):
        levels = {
            "read committed": "ISOLATION_LEVEL_READ_COMMITTED",
            " Repeatable   Read ": "ISOLATION_LEVEL_REPEATABLE_READ",
            "REPEATABLE_READ": "ISOLATION_LEVEL_REPEATABLE_READ",
            "serializable": "ISOLATION_LEVEL_SERIALIZABLE",
        }
        for i, (text, constant) in enumerate(levels.items()):
            pool = self._load(_pool(name="p%d" % i,
                                    isolation_level=text))["p%d" % i]
            self.assertEqual(pool.isolation_level,
                             getattr(psycopg2.extensions, constant), text)

    def test_flags_false(self):
        pool = self._load(_pool(twophase="no", readonly="false",
                                deferrable="0"))["main"]
        self.assertEqual((pool.twophase, pool.readonly, pool.deferrable),
                         (False, False, False))

    def test_dsn_from_the_environment(self):
        self._setenv("ZPGPOOL_TEST_APP_DSN", OFFLINE_DSN.replace(
            "dbname=app", "dbname=from_env") + "\n")
        pool = self._load(_pool("env:ZPGPOOL_TEST_APP_DSN"))["main"]
        self.assertIn("dbname=from_env", pool.dsn)
        self.assertNotIn(PASSWORD, pool.dsn)

    def test_dsn_from_a_file(self):
        path = self._write("\n  postgresql://app:%s@127.0.0.1:9/from_file"
                           "  \n\n" % PASSWORD)
        pool = self._load(_pool("file:" + path))["main"]
        self.assertIn("dbname=from_file", pool.dsn)
        self.assertIn("port=9", pool.dsn)
        self.assertNotIn(PASSWORD, pool.dsn)

    def test_white_space_around_the_variable_or_file_name(self):
        self._setenv("ZPGPOOL_TEST_APP_DSN",
                     "host=127.0.0.1 port=9 dbname=from_env")
        path = self._write("host=127.0.0.1 port=9 dbname=from_file")
        pools = self._load(_pool(" env: ZPGPOOL_TEST_APP_DSN ", name="a")
                           + _pool("file:  %s" % path, name="b"))
        self.assertIn("dbname=from_env", pools["a"].dsn)
        self.assertIn("dbname=from_file", pools["b"].dsn)

    def test_empty_dsn_means_libpq_defaults(self):
        pool = self._load(_pool(""))["main"]
        self.assertNotIn("host=", pool.dsn)

    def test_two_pools(self):
        pools = self._load(_pool(name="main") + _pool(name="reports",
                                                      readonly="yes"))
        self.assertEqual(sorted(pools), ["main", "reports"])
        self.assertIs(pools["reports"].readonly, True)
        self.assertIs(pools["main"].readonly, False)

    def test_meta_zcml_alone_defines_the_directive(self):
        saved = zcml._exit_hook_installed
        self.addCleanup(setattr, zcml, "_exit_hook_installed", saved)
        zcml._exit_hook_installed = False
        xmlconfig.string(
            '<configure xmlns="http://namespaces.zope.org/zope"\n'
            '           xmlns:zpgpool="http://namespaces.zope.org/zpgpool">\n'
            '  <include package="zpgpool" file="meta.zcml" />\n'
            '  %s\n'
            '</configure>' % _pool(maxconn="3"))
        pool = getUtility(IConnectionPool, name="main")
        self._pools.append(pool)
        self.assertIsInstance(pool, ConnectionPool)
        self.assertEqual((pool.name, pool.maxconn), ("main", 3))
        self.assertNotIn(PASSWORD, pool.dsn)
        # Only configure.zcml asks for the exit hook.
        self.assertFalse(zcml._exit_hook_installed)

    def test_minconn_equal_to_maxconn_is_allowed(self):
        pool = self._load(_pool(minconn="4", maxconn="4"))["main"]
        self.assertEqual((pool.minconn, pool.maxconn), (4, 4))

    def test_relative_dsn_file_is_read_next_to_the_zcml_file(self):
        directory = tempfile.mkdtemp(prefix="zpgpool-zcml-")
        self.addCleanup(__import__("shutil").rmtree, directory)
        with open(os.path.join(directory, "app.dsn"), "w") as f:
            f.write("host=127.0.0.1 port=9 dbname=next_to_zcml\n")
        site = os.path.join(directory, "site.zcml")
        with open(site, "w") as f:
            f.write(_zcml(_pool("file:app.dsn")))
        # The working directory holds a file of the same name that must not
        # be read.
        elsewhere = tempfile.mkdtemp(prefix="zpgpool-cwd-")
        self.addCleanup(__import__("shutil").rmtree, elsewhere)
        with open(os.path.join(elsewhere, "app.dsn"), "w") as f:
            f.write("host=127.0.0.1 port=9 dbname=in_the_cwd\n")
        cwd = os.getcwd()
        os.chdir(elsewhere)
        self.addCleanup(os.chdir, cwd)
        xmlconfig.file(site)
        pool = getUtility(IConnectionPool, name="main")
        self._pools.append(pool)
        self.assertIn("dbname=next_to_zcml", pool.dsn)


class BadValueTests(_Base):
    """Each bad value stops the configuration with an error that points at
    the file and line, names the attribute and says what is allowed."""

    def assertBad(self, body, *expected):
        text = self._error(body)
        self.assertIn(LINE, text)
        for each in expected:
            self.assertIn(each, text)
        return text

    def test_non_integer_sizes(self):
        self.assertBad(
            _pool(minconn="ten"), "Invalid value for 'minconn'",
            "minconn must be a whole number, 0 or more; got 'ten'")
        self.assertBad(
            _pool(maxconn="2.5"), "Invalid value for 'maxconn'",
            "maxconn must be a whole number, 1 or more; got '2.5'")
        self.assertBad(
            _pool(connect_timeout="1.5"),
            "Invalid value for 'connect_timeout'",
            "connect_timeout must be a whole number, 0 or more; got '1.5'")

    def test_sizes_too_small(self):
        self.assertBad(_pool(minconn="-1"),
                       "minconn must be a whole number, 0 or more; got '-1'")
        self.assertBad(_pool(maxconn="0"),
                       "maxconn must be a whole number, 1 or more; got '0'")
        self.assertBad(
            _pool(connect_timeout="-5"),
            "connect_timeout must be a whole number, 0 or more; got '-5'")

    def test_minconn_above_maxconn(self):
        self.assertBad(_pool(minconn="5", maxconn="2"),
                       "<zpgpool:pool name='main'>: minconn (5) must not be"
                       " greater than maxconn (2)")
        # With maxconn left out, its default counts.
        self.assertBad(_pool(minconn="11"),
                       "minconn (11) must not be greater than maxconn (10)")

    def test_bad_seconds(self):
        self.assertBad(
            _pool(timeout="soon"), "Invalid value for 'timeout'",
            "timeout must be a number of seconds 0 or more; got 'soon'")
        self.assertBad(
            _pool(timeout="-1"),
            "timeout must be a number of seconds 0 or more; got '-1'")
        # timeout has no "off": a caller never waits for ever.
        self.assertBad(
            _pool(timeout="off"),
            "timeout must be a number of seconds 0 or more; got 'off'")
        self.assertBad(
            _pool(max_lifetime="0"), "Invalid value for 'max_lifetime'",
            "max_lifetime must be a number of seconds greater than 0, or"
            " 'off' for no limit; got '0'")
        self.assertBad(
            _pool(max_idle="forever"),
            "max_idle must be a number of seconds greater than 0, or 'off'"
            " for no limit; got 'forever'")
        self.assertBad(
            _pool(health_check_after="-1"),
            "health_check_after must be a number of seconds 0 or more, or"
            " 'off' for no limit; got '-1'")
        self.assertBad(
            _pool(leak_threshold="inf"),
            "leak_threshold must be a number of seconds greater than 0, or"
            " 'off' for no limit; got 'inf'")
        self.assertBad(
            _pool(reconnect_max_delay="nan"),
            "reconnect_max_delay must be a number of seconds greater than 0;"
            " got 'nan'")

    def test_bad_flags(self):
        for name in ("twophase", "readonly", "deferrable"):
            self.assertBad(
                _pool(**{name: "maybe"}), "Invalid value for %r" % name,
                "%s must be true or false (or yes/no, y/n, 1/0); got 'maybe'"
                % name)

    def test_unknown_isolation_level(self):
        self.assertBad(
            _pool(isolation_level="read uncommitted"),
            "Invalid value for 'isolation_level'",
            "isolation_level must be one of 'READ COMMITTED', 'REPEATABLE"
            " READ', 'SERIALIZABLE' (in any case); got 'read uncommitted'")

    def test_bad_transaction_manager(self):
        self.assertBad(
            _pool(transaction_manager="transaction.no_such_manager"),
            "Invalid value for 'transaction_manager'",
            "transaction_manager must be the dotted name of a transaction"
            " manager, such as 'transaction.manager';"
            " 'transaction.no_such_manager' cannot be imported")
        self.assertBad(
            _pool(transaction_manager="os.path"),
            "'os.path' is not an ITransactionManager but 'module'")

    def test_bad_configure(self):
        self.assertBad(
            _pool(configure="zpgpool.no_such_setup"),
            "Invalid value for 'configure'",
            "configure must be the dotted name of a callable that takes the"
            " new connection, such as 'myapp.db.setup';"
            " 'zpgpool.no_such_setup' cannot be imported")
        self.assertBad(
            _pool(configure="os.sep"), "Invalid value for 'configure'",
            "configure must be the dotted name of a callable; 'os.sep' is a"
            " str")

    def test_broken_dsn_syntax(self):
        self.assertBad(
            _pool("host=db password=%s dbname" % PASSWORD),
            "Invalid value for 'dsn'",
            "zpgpool.zcml.InvalidAttribute: dsn must be a connection string"
            ' libpq can parse: missing "=" after "dbname" in connection info'
            " string")

    def test_broken_dsn_never_shows_the_password(self):
        # libpq quotes the token it could not decode: here, the password.
        self.assertBad(
            _pool("postgresql://app:%s%%zz@db/app" % PASSWORD),
            "Invalid value for 'dsn'",
            "dsn must be a connection string libpq can parse: invalid"
            ' percent-encoded token: "***"')
        self.assertBad(_pool("host=db password='%s" % PASSWORD),
                       "unterminated quoted string")

    def test_unknown_dsn_parameter(self):
        self.assertBad(_pool("host=db passwd=%s" % PASSWORD),
                       "Invalid value for 'dsn'",
                       'invalid connection option "passwd"')

    def test_missing_environment_variable(self):
        os.environ.pop("ZPGPOOL_TEST_NO_SUCH_VARIABLE", None)
        self.assertBad(
            _pool("env:ZPGPOOL_TEST_NO_SUCH_VARIABLE"),
            "Invalid value for 'dsn'",
            "dsn: the environment variable 'ZPGPOOL_TEST_NO_SUCH_VARIABLE'"
            " is not set (dsn='env:ZPGPOOL_TEST_NO_SUCH_VARIABLE')")

    def test_empty_environment_variable(self):
        self._setenv("ZPGPOOL_TEST_EMPTY", "  ")
        self.assertBad(
            _pool("env:ZPGPOOL_TEST_EMPTY"),
            "dsn: the environment variable 'ZPGPOOL_TEST_EMPTY' is empty"
            " (dsn='env:ZPGPOOL_TEST_EMPTY'); to use libpq's defaults write"
            ' dsn=""')

    def test_environment_variable_with_a_broken_dsn(self):
        self._setenv("ZPGPOOL_TEST_BROKEN", "password=%s dbname" % PASSWORD)
        self.assertBad(_pool("env:ZPGPOOL_TEST_BROKEN"),
                       'missing "=" after "dbname"')

    def test_env_without_a_name(self):
        self.assertBad(_pool("env:"),
                       "dsn='env:' must name an environment variable,"
                       " as in dsn='env:APP_DSN'")

    def test_unreadable_file(self):
        path = os.path.join(tempfile.gettempdir(), "zpgpool-no-such-file")
        self.assertBad(
            _pool("file:" + path), "Invalid value for 'dsn'",
            "dsn: cannot read the file %r: No such file or directory"
            " (dsn='file:%s')" % (path, path))
        directory = tempfile.gettempdir()
        self.assertBad(_pool("file:" + directory),
                       "dsn: cannot read the file %r: Is a directory"
                       % directory)

    def test_empty_file(self):
        path = self._write("\n\n")
        self.assertBad(_pool("file:" + path),
                       "dsn: the file %r is empty" % path)

    def test_file_that_is_not_utf8(self):
        # Latin-1, as an editor may save it: the error names the file and
        # the cause, never what the file holds.
        path = self._write(("host=db password=%s dbname=caf\xe9"
                            % PASSWORD).encode("latin-1"))
        self.assertBad(
            _pool("file:" + path), "Invalid value for 'dsn'",
            "dsn: cannot read the file %r: UnicodeDecodeError"
            " (dsn='file:%s')" % (path, path))

    def test_file_without_a_name(self):
        self.assertBad(_pool("file:"),
                       "dsn='file:' must name a file,"
                       " as in dsn='file:/run/secrets/app_dsn'")

    def test_missing_dsn(self):
        self.assertBad('<zpgpool:pool name="main" />',
                       "Missing parameter: 'dsn'")

    def test_unknown_attribute(self):
        self.assertBad(_pool(maxconns="5"), "Unrecognized parameters:",
                       "maxconns")


class ConflictTests(_Base):

    def test_two_pools_with_one_name(self):
        text = self._error(_pool(name="main") + "\n  " + _pool(name="main"),
                           ConfigurationConflictError)
        self.assertIn("('utility', <InterfaceClass"
                      " zpgpool.interfaces.IConnectionPool>, 'main')", text)
        self.assertIn('File "<string>", line 5.', text)
        self.assertIn('File "<string>", line 6.', text)

    def test_conflict_report_hides_a_password_written_in_zcml(self):
        # The report quotes the ZCML source of both directives; a password
        # written there (rather than kept in env: or file:) shows as ***.
        path = self._write(_zcml(
            _pool("host=db password=%s" % PASSWORD)
            + "\n  " + _pool("postgresql://app:%s@db/app" % PASSWORD)))
        with self.assertRaises(ConfigurationConflictError) as caught:
            xmlconfig.file(path)
        text = str(caught.exception)
        self.assertNotIn(PASSWORD, text)
        self.assertIn('dsn="host=db password=***"', text)
        self.assertIn('dsn="postgresql://app:***@db/app"', text)
        self.assertIn('File "%s", line 5.' % path, text)
        self.assertIn('File "%s", line 6.' % path, text)

    def test_two_unnamed_pools(self):
        body = ('<zpgpool:pool dsn="" />\n'
                '  <zpgpool:pool dsn="dbname=other" />')
        self._error(body, ConfigurationConflictError)
        self.assertIsNone(queryUtility(IConnectionPool))

    def test_a_pool_and_a_utility_with_one_name(self):
        from zpgpool.pool import ConnectionPool
        self._set_component_pool(ConnectionPool(OFFLINE_DSN, name="main"))
        self._error(
            _pool(name="main") + '\n  <utility component="%s.component_pool"'
            ' provides="zpgpool.interfaces.IConnectionPool" name="main" />'
            % __name__, ConfigurationConflictError)


class ExitHookTests(_Base):
    """The exit hook, seen from outside: a real process loads the ZCML,
    uses a pool on the test server, and exits without closing anything."""

    layer = POSTGRES_LAYER

    # Prints each PoolClosed event the pool sends: at exit only the hook
    # closes the pool, so the line shows that the hook ran.
    SCRIPT = (
        "import sys, zope.event\n"
        "from zope.configuration import xmlconfig\n"
        "from zpgpool import events\n"
        "def show(event):\n"
        "    if isinstance(event, events.PoolClosed):\n"
        "        print('closed', event.pool.name, flush=True)\n"
        "zope.event.subscribers.append(show)\n"
        "xmlconfig.string(sys.argv[1])\n"
        "from zope.component import getUtility\n"
        "from zpgpool.interfaces import IConnectionPool\n"
        "pool = getUtility(IConnectionPool, name=sys.argv[2])\n"
        "conn = pool.getconn()\n"
        "conn.cursor().execute('SELECT 1')\n"
        "conn.commit()\n"
        "pool.putconn(conn)\n"
        "print('used', pool.stats()['idle'], flush=True)\n")

    def _run(self, includes):
        import subprocess
        from tests.poolhelpers import backend_pids
        from tests.poolhelpers import unique_name
        from tests.poolhelpers import wait_for
        name = unique_name("exit")
        config = (
            '<configure xmlns="http://namespaces.zope.org/zope"\n'
            '           xmlns:zpgpool="http://namespaces.zope.org/zpgpool">\n'
            '  %s\n'
            '  %s\n'
            '</configure>\n' % (includes, _pool(self.layer.dsn, name=name,
                                                 minconn="0")))
        from tests.support import python_env
        result = subprocess.run([sys.executable, "-c", self.SCRIPT, config,
                                 name], capture_output=True, text=True,
                                env=python_env(), timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("used 1", result.stdout)
        # Whatever the process did, its session is gone once it exited.
        wait_for(lambda: not backend_pids(self.layer.dsn, "zpgpool:" + name),
                 "the child's session to end")
        return name, result.stdout.split("\n")

    def test_configure_zcml_closes_the_pools_at_exit(self):
        name, lines = self._run('<include package="zpgpool" />\n'
                                '  <include package="zpgpool" />')
        # Loaded twice, closed once: one hook.
        self.assertEqual(lines.count("closed %s" % name), 1, lines)

    def test_meta_zcml_alone_installs_nothing(self):
        name, lines = self._run(
            '<include package="zpgpool" file="meta.zcml" />')
        self.assertNotIn("closed %s" % name, lines)

    def test_install_exit_hook_is_idempotent(self):
        import atexit
        saved = zcml._exit_hook_installed

        def restore():
            # atexit as before the test: the hook registered once if it
            # was installed, not at all otherwise.
            atexit.unregister(zcml.close_registered_pools)
            if saved:
                atexit.register(zcml.close_registered_pools)
            zcml._exit_hook_installed = saved
        self.addCleanup(restore)
        atexit.unregister(zcml.close_registered_pools)
        zcml._exit_hook_installed = False
        # The first call registers the hook, a second one nothing more:
        # checked through atexit's own count of registered functions.
        before = atexit._ncallbacks()
        zcml.install_exit_hook()
        self.assertEqual(atexit._ncallbacks(), before + 1)
        zcml.install_exit_hook()
        self.assertEqual(atexit._ncallbacks(), before + 1)


class CloseRegisteredPoolsTests(_Base):

    def test_close_registered_pools(self):
        pools = self._load(_pool(name="a") + _pool(name="b"))
        zcml.close_registered_pools()
        self.assertTrue(all(pool.closed for pool in pools.values()))

    def test_close_registered_pools_goes_on_after_a_failure(self):
        # A pool whose close() fails cannot be made on demand with a real
        # server, so a stand-in takes its place in the registry.
        @implementer(IConnectionPool)
        class Unclosable:
            failed = False

            def close(self, timeout=5.0):
                # Fails once, so that the test's own clean-up can close it.
                if not self.failed:
                    self.failed = True
                    raise RuntimeError("cannot close")

        provideUtility(Unclosable(), IConnectionPool, name="a")
        pools = self._load(_pool(name="b"))
        with self.assertLogs("zpgpool", logging.ERROR) as logs:
            zcml.close_registered_pools()
        self.assertTrue(pools["b"].closed)
        self.assertIn("Closing the pool 'a' failed", logs.output[0])


# ---------------------------------------------------------------------------
# With a server: the pool found by getUtility in a view-like function.

def add_note(text):
    """A view: it finds the pool by name and writes in the request's
    transaction."""
    pool = getUtility(IConnectionPool, name="main")
    cursor = pool.connection().cursor()
    cursor.execute("INSERT INTO zcml_notes (text) VALUES (%s)", (text,))


def list_notes():
    pool = getUtility(IConnectionPool, name="main")
    cursor = pool.connection().cursor()
    cursor.execute("SELECT text FROM zcml_notes ORDER BY id")
    return [text for (text,) in cursor.fetchall()]


class ServerTests(_Base):

    layer = POSTGRES_LAYER

    def setUp(self):
        super().setUp()
        # A database of its own: the table below cannot meet another
        # test's.
        self.dsn = self.layer.new_database("zpgpool_zcml")
        import psycopg2
        with psycopg2.connect(self.dsn) as conn:
            with conn.cursor() as cursor:
                cursor.execute("CREATE TABLE zcml_notes"
                               " (id serial PRIMARY KEY, text text)")
        conn.close()

    def test_view_under_transaction_manager(self):
        self._setenv("ZPGPOOL_TEST_APP_DSN", self.dsn)
        self._load('<zpgpool:pool name="main" dsn="env:ZPGPOOL_TEST_APP_DSN"'
                   ' maxconn="2" />')
        with transaction.manager:
            add_note("kept")
            self.assertEqual(list_notes(), ["kept"])
        transaction.begin()
        add_note("rolled back")
        transaction.abort()
        with transaction.manager:
            self.assertEqual(list_notes(), ["kept"])

    def test_view_with_a_transaction_manager_of_its_own(self):
        self._load(_pool(self.dsn, transaction_manager=__name__ + ".tm"))
        with tm:
            add_note("in tm")
        # The thread's default manager knows nothing of it ...
        transaction.abort()
        # ... and the work was committed by tm.
        with tm:
            self.assertEqual(list_notes(), ["in tm"])

    def test_events_reach_subscribers_registered_in_zcml(self):
        del received[:]
        self.addCleanup(received.clear)
        subscribers = "\n  ".join(
            '<subscriber for="zpgpool.interfaces.%s" handler="%s.record" />'
            % (iface, __name__)
            for iface in ("IConnectionCreated", "IConnectionCheckedOut",
                          "IConnectionReturned", "IPoolClosed"))
        pool = self._load(_pool(self.dsn, minconn="0") + "\n  "
                          + subscribers)["main"]
        conn = pool.getconn()
        pool.putconn(conn)
        pool.close()
        mine = [type(e).__name__ for e in received if e.pool is pool]
        self.assertEqual(mine, ["ConnectionCreated", "ConnectionCheckedOut",
                                "ConnectionReturned", "PoolClosed"])
        self.assertIs(received[0].connection, conn)


class UtilityDirectiveTests(_Base):
    """The standard <utility> directive works too."""

    layer = POSTGRES_LAYER

    def _select(self, pool):
        with pool.checkout() as conn:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 41 + 1")
                return cursor.fetchone()[0]

    def test_component(self):
        # The application builds the pool in its own module ...
        from zpgpool.pool import ConnectionPool
        self._set_component_pool(ConnectionPool(self.layer.dsn, name="main"))
        # ... and registers it.
        pools = self._load(
            '<utility component="%s.component_pool"'
            ' provides="zpgpool.interfaces.IConnectionPool" name="main" />'
            % __name__)
        self.assertIs(pools["main"], sys.modules[__name__].component_pool)
        self.assertEqual(self._select(getUtility(IConnectionPool, "main")),
                         42)

    def test_factory_with_libpq_environment(self):
        # zpgpool.ConnectionPool called with no argument: libpq takes the
        # server from the PG* environment variables.
        params = psycopg2.extensions.parse_dsn(self.layer.dsn)
        for key, variable in (("host", "PGHOST"), ("port", "PGPORT"),
                              ("user", "PGUSER"), ("dbname", "PGDATABASE"),
                              ("password", "PGPASSWORD")):
            if key in params:
                self._setenv(variable, params[key])
        pools = self._load(
            '<utility factory="zpgpool.ConnectionPool"'
            ' provides="zpgpool.interfaces.IConnectionPool" name="main" />')
        self.assertEqual(self._select(pools["main"]), 42)
