"""zope.testrunner layers: PostgreSQL, PgBouncer in front of it, and a
primary with a streaming standby.

A layer's ``setUp`` starts what it provides and its ``tearDown`` removes it;
``testSetUp`` repairs, before each test, what an earlier test broke.
"""
import itertools
import os
import secrets
import sys

from zpgpool.testing.errors import PostgresUnavailable
from zpgpool.testing.pgbouncer import PgBouncer
from zpgpool.testing.server import PostgresServer
from zpgpool.testing.standby import StandbyServer
from zpgpool.testing.standby import multihost_dsn
from zpgpool.testing.support import _execute
from zpgpool.testing.support import _quote_ident

#: Environment variable with the DSN of an existing server for
#: ``POSTGRES_LAYER`` (and every ``PostgresLayer`` that is not private).
DSN_ENV = 'ZPGPOOL_TEST_DSN'

# The predefined layers are documented, and found by zope.testrunner, as
# attributes of the package, not of this module.
_PACKAGE = 'zpgpool.testing'


def _caller_module(depth=2):
    """Return the module name of the code that called our caller."""
    return sys._getframe(depth).f_globals['__name__']


class PostgresLayer:
    """A zope.testrunner layer that provides a PostgreSQL server.

    While the layer is set up, ``dsn`` is a DSN of the server and ``server``
    the ``PostgresServer`` (None when the layer uses the server named by
    ``ZPGPOOL_TEST_DSN``).

    *name* names the layer in the test runner's output and on its command
    line (``--layer``); give it the name of the module variable that holds
    the layer.  A *private* layer always starts a server of its own and
    ignores ``ZPGPOOL_TEST_DSN``; use one for tests that stop or restart the
    server.  *settings* are postgresql.conf settings for that server (see
    ``PostgresServer``).  *bases* are layers this one builds on.  *bindir*
    picks the server binaries (``find_bindir()`` when None).
    """

    def __init__(self, name, private=False, settings=None, bases=(),
                 module=None, bindir=None):
        self.__name__ = name
        self.__module__ = module or _caller_module()
        self.__bases__ = tuple(bases)
        self.private = private
        self.settings = dict(settings or {})
        self.bindir = bindir
        self.server = None
        self.dsn = None
        self._databases = []
        self._counter = itertools.count(1)

    def __repr__(self):
        return '<%s %s.%s>' % (self.__class__.__name__, self.__module__,
                               self.__name__)

    def setUp(self):
        """Start the server, or check that ``ZPGPOOL_TEST_DSN`` connects."""
        external = os.environ.get(DSN_ENV, '').strip()
        if external and not self.private:
            try:
                _execute(external, 'SELECT 1')
            except Exception as e:
                raise PostgresUnavailable(
                    'Cannot connect to the server that %s names: %s'
                    % (DSN_ENV, e)) from e
            self.dsn = external
            return
        self.server = PostgresServer(bindir=self.bindir,
                                     settings=self.settings)
        try:
            self.server.start()
        except BaseException:
            self.server.cleanup()
            self.server = None
            raise
        self.dsn = self.server.dsn()

    def tearDown(self):
        """Drop the databases ``new_database()`` made and stop the server."""
        try:
            if self.server is None:
                for name in reversed(self._databases):
                    _execute(self.dsn, 'DROP DATABASE IF EXISTS %s WITH '
                             '(FORCE)' % _quote_ident(name))
        finally:
            self._databases = []
            if self.server is not None:
                self.server.cleanup()
            self.server = None
            self.dsn = None

    def testSetUp(self):
        """Start the server again if an earlier test left it stopped."""
        if self.server is not None and not self.server.is_running():
            self.server.start()

    def new_database(self, prefix='zpgpool_test'):
        """Create an empty database and return a DSN for it.

        Its name starts with *prefix*.  It is dropped at the layer's
        tear-down.
        """
        name = '%s_%d_%s' % (prefix, next(self._counter),
                             secrets.token_hex(4))
        if self.server is not None:
            dsn = self.server.createdb(name)
        else:
            import psycopg2.extensions
            _execute(self.dsn, 'CREATE DATABASE %s' % _quote_ident(name))
            dsn = psycopg2.extensions.make_dsn(self.dsn, dbname=name)
        self._databases.append(name)
        return dsn


#: A PostgreSQL server for tests that only connect: the one
#: ``ZPGPOOL_TEST_DSN`` names, or else a private one.
POSTGRES_LAYER = PostgresLayer('POSTGRES_LAYER', module=_PACKAGE)

#: Always a private PostgreSQL server, for tests that stop, restart or
#: otherwise hurt it.  It is started again before each test if stopped.
PRIVATE_POSTGRES_LAYER = PostgresLayer('PRIVATE_POSTGRES_LAYER', private=True,
                                       module=_PACKAGE)


class PgBouncerLayer:
    """A zope.testrunner layer with a PgBouncer in front of a PostgreSQL
    layer's server.

    While the layer is set up, ``dsn`` is a DSN of the ``postgres``
    database through PgBouncer, ``bouncer`` the ``PgBouncer``, and
    ``postgres_dsn`` the direct DSN of the server.  *postgres_layer* (by
    default ``POSTGRES_LAYER``) provides the server and is this layer's
    base, with *bases*.  *pool_mode*, *default_pool_size*,
    *max_client_conn*, *settings* and *binary* are passed to ``PgBouncer``.
    Before each test, a PgBouncer that an earlier test stopped is started
    again.  Without a ``pgbouncer`` program, setting the layer up raises
    ``PgBouncerUnavailable``: the tests fail, they are not skipped.
    """

    def __init__(self, name, postgres_layer=None, pool_mode='transaction',
                 default_pool_size=20, max_client_conn=100, settings=None,
                 binary=None, bases=(), module=None):
        self.__name__ = name
        self.__module__ = module or _caller_module()
        self.postgres_layer = postgres_layer or POSTGRES_LAYER
        self.__bases__ = (self.postgres_layer,) + tuple(bases)
        self.options = dict(pool_mode=pool_mode,
                            default_pool_size=default_pool_size,
                            max_client_conn=max_client_conn,
                            settings=settings, binary=binary)
        self.bouncer = None
        self.dsn = None
        self.postgres_dsn = None

    def __repr__(self):
        return '<%s %s.%s>' % (self.__class__.__name__, self.__module__,
                               self.__name__)

    def setUp(self):
        """Start PgBouncer in front of the base layer's server."""
        base = self.postgres_layer
        bouncer = PgBouncer(base.server or base.dsn, **self.options)
        try:
            bouncer.start()
        except BaseException:
            bouncer.cleanup()
            raise
        self.bouncer = bouncer
        self.dsn = bouncer.dsn()
        self.postgres_dsn = base.dsn

    def tearDown(self):
        """Stop PgBouncer and remove its directory."""
        try:
            if self.bouncer is not None:
                self.bouncer.cleanup()
        finally:
            self.bouncer = self.dsn = self.postgres_dsn = None

    def testSetUp(self):
        """Start PgBouncer again if an earlier test left it stopped."""
        if self.bouncer is not None:
            self.bouncer.start()

    def new_database(self, prefix='zpgpool_test'):
        """Create an empty database (dropped at the PostgreSQL layer's
        tear-down); return a DSN of it through PgBouncer."""
        import psycopg2.extensions
        direct = self.postgres_layer.new_database(prefix)
        dbname = psycopg2.extensions.parse_dsn(direct)['dbname']
        return self.bouncer.dsn(dbname)


class StandbyLayer:
    """A zope.testrunner layer with a primary and a synchronous streaming
    standby of it.

    While the layer is set up, ``primary`` is the ``PostgresServer``,
    ``standby`` the ``StandbyServer``, ``primary_dsn`` and ``standby_dsn``
    their DSNs, and ``dsn`` a multi-host DSN of both with
    ``target_session_attrs=read-write``, which connects to whichever of the
    two is the primary.  The primary runs with ``wal_level = replica`` and
    *settings*; with *synchronous* (the default) its commits wait for the
    standby.

    Tests may kill the primary (``layer.primary.stop('immediate')``) and
    promote the standby (``layer.standby.promote()``): before the next test
    the layer replaces both with a fresh pair, on new ports, whenever they
    are not a running primary with a standby streaming from it.  Read the
    DSNs in the test, not at import.
    """

    def __init__(self, name, settings=None, synchronous=True, bases=(),
                 module=None, bindir=None):
        self.__name__ = name
        self.__module__ = module or _caller_module()
        self.__bases__ = tuple(bases)
        self.settings = {'wal_level': 'replica', 'synchronous_commit': True}
        self.settings.update(settings or {})
        self.synchronous = synchronous
        self.bindir = bindir
        self.primary = self.standby = None
        self.dsn = self.primary_dsn = self.standby_dsn = None
        self._counter = itertools.count(1)

    def __repr__(self):
        return '<%s %s.%s>' % (self.__class__.__name__, self.__module__,
                               self.__name__)

    def setUp(self):
        """Start a primary and its standby."""
        try:
            self.primary = PostgresServer(bindir=self.bindir,
                                          settings=self.settings).start()
            self.standby = StandbyServer(
                self.primary, synchronous=self.synchronous).start()
        except BaseException:
            self.tearDown()
            raise
        self.primary_dsn = self.primary.dsn()
        self.standby_dsn = self.standby.dsn()
        self.dsn = multihost_dsn([self.primary, self.standby])

    def tearDown(self):
        """Remove the standby and the primary."""
        try:
            for server in (self.standby, self.primary):
                if server is not None:
                    server.cleanup()
        finally:
            self.primary = self.standby = None
            self.dsn = self.primary_dsn = self.standby_dsn = None

    def _intact(self):
        try:
            return (self.primary.is_running() and self.standby.is_running()
                    and not self.primary.execute(
                        'SELECT pg_is_in_recovery()')[0][0]
                    and self.standby.is_in_recovery()
                    and self.primary.execute(
                        "SELECT count(*) FROM pg_stat_replication WHERE "
                        "application_name = %s AND state = 'streaming'",
                        (self.standby.name,))[0][0] == 1)
        except Exception:
            return False

    def testSetUp(self):
        """Replace primary and standby when a test broke the pair."""
        if self.primary is not None and not self._intact():
            self.tearDown()
            self.setUp()

    def new_database(self, prefix='zpgpool_test'):
        """Create an empty database on the primary; return a multi-host DSN
        of it.  It goes with the servers at the layer's tear-down."""
        name = '%s_%d_%s' % (prefix, next(self._counter),
                             secrets.token_hex(4))
        self.primary.createdb(name)
        return multihost_dsn([self.primary, self.standby], dbname=name)


#: PgBouncer, in transaction mode, in front of ``POSTGRES_LAYER``'s server.
PGBOUNCER_LAYER = PgBouncerLayer('PGBOUNCER_LAYER', module=_PACKAGE)

#: A primary and a synchronous streaming standby of it.
STANDBY_LAYER = StandbyLayer('STANDBY_LAYER', module=_PACKAGE)
