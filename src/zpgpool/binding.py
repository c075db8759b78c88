"""Which connection belongs to which thread, and its release when the
thread ends.

A thread's claim lives in a ``threading.local`` of the pool, so it is keyed
by the thread itself: thread ids are reused once a thread ends, a
``threading.local`` entry is not. When the thread ends, Python drops the
entry, the token below is collected, and its finalizer hands the
connection back to the pool (rolled back first if a transaction was open).
"""
import weakref

from zpgpool.errors import ConnectionMisuse
from zpgpool.connection import USED


class Holder:
    """The connection a thread holds from one pool, if any.

    ``conn`` is the thread's connection; between transactions it may be
    *parked*: still the thread's, but lent to another thread when that one
    would otherwise wait (the pool then takes it, and the owner notices at
    its next ``take``). ``manager`` is the transaction integration's state
    for this thread (datamanager.py), or None.
    """
    __slots__ = ("conn", "manager")

    def __init__(self):
        self.conn = None
        self.manager = None


class _Token:
    """Lives in the thread's local storage; dies with the thread."""
    __slots__ = ("holder", "__weakref__")

    def __init__(self, holder):
        self.holder = holder


def holder_for(pool):
    """Return the calling thread's Holder for ``pool``, creating it."""
    local = pool.thread_local
    try:
        return local.token.holder
    except AttributeError:
        holder = Holder()
        token = local.token = _Token(holder)
        finalizer = weakref.finalize(token, _thread_ended, weakref.ref(pool),
                                     holder)
        # At interpreter exit the pool's own shutdown handles connections.
        finalizer.atexit = False
        return holder


def take(pool, holder):
    """Return the thread's connection, checked out, taking a new one if the
    thread has none or its parked connection was lent away."""
    conn = holder.conn
    if conn is not None and pool.unpark(conn, holder):
        return conn
    holder.conn = None
    conn = pool.acquire()
    conn._zp_owner = holder
    holder.conn = conn
    return conn


def put(pool, holder, close=False):
    """Give the thread's connection back to the pool for good."""
    conn = holder.conn
    holder.conn = None
    if conn is None:
        return
    # Only a parked connection can be taken by another thread, and _unpark
    # decides that under the pool's lock.
    if (conn._zp_state is USED and conn._zp_owner is holder) \
            or pool.unpark(conn, holder):
        pool.release(conn, close=close)


def _thread_ended(pool_ref, holder):
    manager = holder.manager
    holder.manager = None
    if manager is not None:
        manager.thread_ended()
    pool = pool_ref()
    if pool is not None:
        put(pool, holder)


# -- PersistentConnectionPool -----------------------------------------------------

def thread_connection(pool, timeout=None):
    """The connection of the calling thread (PersistentConnectionPool),
    waiting up to ``timeout`` seconds for one if it has none."""
    holder = holder_for(pool)
    conn = holder.conn
    if conn is not None and conn._zp_state is USED \
            and conn._zp_owner is holder:
        return conn
    conn = pool.acquire(timeout)
    conn._zp_owner = holder
    holder.conn = conn
    return conn


def release_thread_connection(pool, conn=None, close=False):
    """Return the calling thread's connection (PersistentConnectionPool)."""
    holder = holder_for(pool)
    if conn is None or conn is holder.conn:
        conn = holder.conn
        holder.conn = None
        if conn is None:
            raise ConnectionMisuse("%s: this thread holds no connection"
                                   % pool.label)
    pool.release(conn, close=close)
