"""``ConnectionPool``: the pool (core.py) and the Zope way in,
``connection()``, which joins the calling thread's connection to the
current transaction of the ``transaction`` package (datamanager.py).

The names of zpgpool's first releases are kept importable from here.
"""
import atexit
import contextlib

import psycopg2.extensions as _ext
import transaction
from zope.interface import implementer

from zpgpool.binding import holder_for
from zpgpool.core import CorePool
from zpgpool.fork import all_pools
from zpgpool.datamanager import ThreadState
from zpgpool.errors import PoolClosed
from zpgpool.errors import PoolError
from zpgpool.interfaces import IConnectionPool

# Importable from here since the first release.
from zpgpool.connection import PooledConnection  # noqa: F401
from zpgpool.connection import is_disconnect  # noqa: F401
from zpgpool.conninfo import hide_passwords  # noqa: F401
from zpgpool.conninfo import mask_dsn  # noqa: F401
from zpgpool.conninfo import scrub_password  # noqa: F401
from zpgpool.errors import ConnectError  # noqa: F401
from zpgpool.options import DEFAULTS  # noqa: F401


@implementer(IConnectionPool)
class ConnectionPool(CorePool):
    """A thread-safe pool of PostgreSQL connections.

    ``dsn`` is a libpq connection string (``"host=... dbname=..."`` or a
    ``postgresql://`` URI). The options, all keyword-only:

    name
        The pool's name, used in errors, logs, ``application_name`` and the
        utility registration.
    minconn, maxconn
        Connections kept open at least, and opened at most.
    timeout
        Seconds a caller waits for a connection when all ``maxconn`` are in
        use; then ``PoolTimeout``. ``0`` fails at once.
    max_lifetime
        Seconds after which a connection is closed and replaced (each gets a
        little less, at random, so they do not all expire together).
        ``None`` keeps connections for ever.
    max_idle
        Seconds an unused connection above ``minconn`` is kept.
    health_check_after
        A connection idle longer than this many seconds is pinged before it
        is handed out; ``0`` pings every time, ``None`` never.
    leak_threshold
        Seconds after which a connection still checked out is logged as a
        possible leak, with the stack where it was taken.
    connect_timeout
        libpq's ``connect_timeout`` unless the DSN sets one.
    reconnect_max_delay
        Ceiling of the back-off between attempts to refill ``minconn`` while
        the server is down.
    twophase, isolation_level, readonly, deferrable, transaction_manager
        How transactions run; see ``connection()``.
    application_name
        Sent to the server unless the DSN sets one; defaults to
        ``zpgpool:NAME``.
    connect_kwargs
        A mapping of further libpq parameters (or ``connection_factory`` /
        ``cursor_factory``) merged into the DSN. A ``connection_factory``
        is combined with the pool's own connection class, so it must not
        declare ``__slots__``.

    Constructing a pool connects to nothing: bad options fail at once, a
    server that is down shows only at the first checkout.
    """

    @property
    def transaction_manager(self):
        """The transaction manager whose transactions ``connection()``
        joins: the ``transaction_manager`` option, else
        ``transaction.manager``."""
        tm = self._transaction_manager
        return transaction.manager if tm is None else tm

    # -- the Zope way in ------------------------------------------------------------

    def connection(self, transaction_manager=None):
        """Return this thread's connection, joined to the current transaction
        of ``transaction_manager`` (the pool's when None).

        The same connection object on every call in a thread, across
        transactions, unless another thread needed it while this one was
        idle between transactions. Commit and abort belong to the
        transaction manager; see datamanager.py.
        """
        state = getattr(self.thread_local, "state", None)
        if state is None or self._closed:
            state = self._thread_state()
        return state.connection(transaction_manager)

    def _thread_state(self):
        if self._closed:
            raise PoolClosed("%s is closed" % self.label)
        _abandon_at_exit()
        state = self.thread_local.state = ThreadState(self, holder_for(self))
        return state


    # -- plain use --------------------------------------------------------------

    @contextlib.contextmanager
    def checkout(self, timeout=None):
        """Take a connection for a ``with`` block and return it afterwards.

        The transaction is committed when the block ends normally and rolled
        back when it raises. A block that ends normally after a statement
        failed in it (the error caught) raises ``PoolError``: PostgreSQL
        has aborted that transaction and would answer COMMIT with a silent
        ROLLBACK. For work inside a Zope transaction use ``connection()``
        instead.
        """
        conn = self.acquire(timeout)
        try:
            yield conn
            status = None if conn.closed else conn.get_transaction_status()
            if status == _ext.TRANSACTION_STATUS_INERROR:
                raise PoolError(
                    "%s: cannot commit the checkout() block: a statement "
                    "failed in it, so PostgreSQL has aborted the "
                    "transaction; it is rolled back" % self.label)
            if status is not None and status != _ext.TRANSACTION_STATUS_IDLE:
                _ext.connection.commit(conn)
        finally:
            self.release(conn)


# psycopg2's pool classes live in compat.py, which builds on this module;
# the path they had before that (zpgpool.pool.SimpleConnectionPool) still
# works, resolved when first asked for.  The import-linter contract names
# this one import against the layers.
_IN_COMPAT = frozenset(("AbstractConnectionPool", "SimpleConnectionPool",
                        "ThreadedConnectionPool", "PersistentConnectionPool"))


def __getattr__(name):
    if name in _IN_COMPAT:
        from zpgpool import compat
        return getattr(compat, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


_exit_hook = []


def _abandon_at_exit():
    """Make the process's exit roll back, with a warning, what the exiting
    thread left uncommitted on a managed connection (a script that never
    called transaction.commit()); registered once, at first use."""
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_abandon_open_transactions)


def _abandon_open_transactions():
    for pool in all_pools():
        state = getattr(pool.thread_local, "state", None)
        if state is not None:
            state.abandon("the process is exiting")

