"""psycopg2's pool classes, on zpgpool's pool.

``SimpleConnectionPool``, ``ThreadedConnectionPool`` and
``PersistentConnectionPool`` take psycopg2's arguments, so that code
written for ``psycopg2.pool`` runs unchanged; each is a full
``ConnectionPool``, ``connection()`` included.
"""
from zpgpool.binding import release_thread_connection
from zpgpool.binding import thread_connection
from zpgpool.errors import ConnectionMisuse
from zpgpool.options import DEFAULTS
from zpgpool.pool import ConnectionPool


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
