"""psycopg2's pool classes, on zpgpool's pool.

``SimpleConnectionPool``, ``ThreadedConnectionPool`` and
``PersistentConnectionPool`` take psycopg2's arguments, so that code
written for ``psycopg2.pool`` runs unchanged; each is a full
``ConnectionPool``, ``connection()`` included.
"""
import threading

import psycopg2.extensions as _ext

from zpgpool.binding import release_thread_connection
from zpgpool.binding import thread_connection
from zpgpool.connection import USED
from zpgpool.errors import ConnectionMisuse
from zpgpool.options import DEFAULTS
from zpgpool.pool import ConnectionPool


# The connection the pool has just opened, while a subclass's _connect
# override sets it up (in the thread that opened it).
_opening = threading.local()


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
        if type(self)._connect is not AbstractConnectionPool._connect:
            options["configure"] = _set_up_by_connect(
                self, options.get("configure"))
        super().__init__(dsn, minconn=minconn, maxconn=maxconn, **options)
        if self.minconn:
            self.open()

    def _connect(self, key=None):
        """The connection the pool has just opened, for a subclass that
        overrides psycopg2's ``_connect`` to set its connections up::

            def _connect(self, key=None):
                conn = super()._connect(key)
                register_vector(conn)
                return conn

        The pool opens its connections itself and calls such an override
        on each, as it calls ``configure``: when it opens it, and again
        after a session reset undid what it set.
        """
        conn = getattr(_opening, "conn", None)
        if conn is None:
            raise ConnectionMisuse(
                "%s: _connect() sets up a connection the pool has just "
                "opened, and only the pool calls it; to open connections "
                "ahead of use, give minconn or call open(wait=True)"
                % self.label)
        return conn

    # psycopg2's bookkeeping, for code that counts it: read-only copies
    # (stats() says more). Taken without the pool's lock, which such code
    # may hold: each container is copied in one C-level step no other
    # thread interleaves, but a connection's state is read after that, so
    # one that changes hands meanwhile may be counted either way.

    @property
    def _pool(self):
        """The idle connections, as a new list."""
        return list(self._idle)

    @property
    def _used(self):
        """The connections checked out, by key (by id when unkeyed), as a
        new dict."""
        return {conn._zp_key if conn._zp_key is not None else id(conn): conn
                for conn in list(self._conns) if conn._zp_state is USED}

    @property
    def _rused(self):
        """The keys of ``_used`` by the connections' ids, as a new dict."""
        return {id(conn): key for key, conn in self._used.items()}


def _set_up_by_connect(pool, configure):
    """The pool's ``configure`` for a subclass that overrides ``_connect``:
    run the override on the connection the pool opened (its
    ``super()._connect(key)`` returns it), then ``configure`` if given."""
    def set_up(conn):
        _opening.conn = conn
        try:
            got = pool._connect(None)
        finally:
            _opening.conn = None
        if got is not conn:
            if isinstance(got, _ext.connection):
                got.close()
            raise TypeError(
                "it returned %r, not the connection super()._connect(key) "
                "gave it: the pool opens its connections itself, and an "
                "override sets up the one it is given and returns it"
                % (got,))
        if configure is not None:
            configure(conn)
    # Errors and logs name the override.
    set_up.__module__ = type(pool).__module__
    set_up.__qualname__ = type(pool).__qualname__ + "._connect"
    return set_up


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

    def getconn(self, key=None, timeout=None):
        """Return this thread's connection, taking one if it has none.

        The thread is the key; an explicit ``key`` is refused.
        """
        self._refuse_key(key)
        return thread_connection(self, timeout)

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
