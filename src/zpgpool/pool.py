"""``ConnectionPool``: the pool (core.py) and the Zope way in,
``connection()``, which joins the calling thread's connection to the
current transaction of the ``transaction`` package (datamanager.py).

The names of zpgpool's first releases are kept importable from here.
"""
import transaction
from zope.interface import implementer

from zpgpool.binding import holder_for
from zpgpool.binding import release_thread_connection
from zpgpool.binding import thread_connection
from zpgpool.core import CorePool
from zpgpool.datamanager import ThreadState
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import PoolClosed
from zpgpool.interfaces import IConnectionPool
from zpgpool.options import DEFAULTS

# Importable from here since the first release.
from zpgpool.connection import PooledConnection  # noqa: F401
from zpgpool.connection import is_disconnect  # noqa: F401
from zpgpool.conninfo import hide_passwords  # noqa: F401
from zpgpool.conninfo import mask_dsn  # noqa: F401
from zpgpool.conninfo import scrub_password  # noqa: F401
from zpgpool.errors import ConnectError  # noqa: F401


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
        ``cursor_factory``) merged into the DSN.

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

    def connection(self):
        """Return this thread's connection, joined to the current transaction.

        The same connection object on every call in a thread, across
        transactions, unless another thread needed it while this one was
        idle between transactions. Commit and abort belong to the
        transaction manager; see datamanager.py.
        """
        state = getattr(self.thread_local, "state", None)
        if state is None or self._closed:
            state = self._thread_state()
        return state.connection()

    def _thread_state(self):
        if self._closed:
            raise PoolClosed("%s is closed" % self.label)
        state = self.thread_local.state = ThreadState(self, holder_for(self))
        return state


def _split_compat_kwargs(args, kwargs):
    """Separate pool options from libpq parameters, as psycopg2 takes both."""
    if len(args) > 1:
        raise TypeError("psycopg2-style pools take at most one positional "
                        "connection argument (the dsn)")
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULTS
               and k not in ("connect_timeout",)}
    dsn = args[0] if args else kwargs.pop("dsn", "")
    extra = options.pop("connect_kwargs", None) or {}
    extra.update(kwargs)
    options["connect_kwargs"] = extra
    # psycopg2's pools fail at once when exhausted.
    options.setdefault("timeout", 0)
    return dsn, options


class AbstractConnectionPool(ConnectionPool):
    """psycopg2's pool signature: ``(minconn, maxconn, *args, **kwargs)``.

    ``args`` and ``kwargs`` are what ``psycopg2.connect`` takes; the pool's
    own options may be given as keywords too. Unlike psycopg2's pools these
    are thread-safe, recover from a restarted server and, with a
    ``timeout`` > 0, wait when exhausted; by default they keep psycopg2's
    behaviour of raising ``PoolError`` at once.
    """

    def __init__(self, minconn, maxconn, *args, **kwargs):
        dsn, options = _split_compat_kwargs(args, dict(kwargs))
        super().__init__(dsn, minconn=minconn, maxconn=maxconn, **options)
        if self.minconn:
            self.open()


class SimpleConnectionPool(AbstractConnectionPool):
    """Drop-in for ``psycopg2.pool.SimpleConnectionPool`` (thread-safe too)."""


class ThreadedConnectionPool(AbstractConnectionPool):
    """Drop-in for ``psycopg2.pool.ThreadedConnectionPool``."""


class PersistentConnectionPool(AbstractConnectionPool):
    """Each thread gets its own connection until it returns it or ends.

    psycopg2 keyed these by ``thread.get_ident()``, which the system reuses
    once a thread ends; here the key is the thread itself, and a thread's
    connection goes back to the pool when the thread ends.
    """

    def getconn(self, key=None):
        """Return this thread's connection, taking one if it has none.

        The thread is the key; an explicit ``key`` is refused.
        """
        self._refuse_key(key)
        return thread_connection(self)

    def putconn(self, conn=None, key=None, close=False):
        """Return this thread's connection (or ``conn``) to the pool."""
        self._refuse_key(key)
        release_thread_connection(self, conn, close)

    def _refuse_key(self, key):
        if key is not None:
            raise ConnectionMisuse(
                "%s: a PersistentConnectionPool keys connections by thread; "
                "getconn() and putconn() take no key (got %r)"
                % (self.label, key))
