"""Fork safety: a pool created before ``os.fork()`` never uses or ends the
parent's connections in the child.

Every pool is tracked (weakly); in the child, right after the fork, each
one forgets the connections it inherited, with their sockets pointed at
/dev/null so that closing or collecting them cannot end the parent's
sessions, and starts its books afresh (``_new_books``).
"""
import os
import weakref

from zpgpool.connection import GONE
from zpgpool.connection import neutralize


_pools = weakref.WeakSet()


def track(pool):
    """Have ``pool`` forget its connections in a forked child."""
    _pools.add(pool)


def all_pools():
    """Every pool of this process that is still alive."""
    return list(_pools)


def _forget_inherited(pool):
    """Forget the parent's connections without ending their sessions."""
    inherited = list(pool._conns)
    # First, before _new_books drops the old thread-local storage: that
    # ends the forking thread's bindings at once (binding.py), which would
    # hand their connections back, rolling back the parent's transaction
    # on its socket, unless they are gone already.
    for conn in inherited:
        conn._zp_state = GONE
        neutralize(conn)
    pool._new_books()
    # A parent's thread may have held the connector's lock at the fork.
    pool._connector.after_fork()


def _after_fork_in_child():
    for pool in list(_pools):
        _forget_inherited(pool)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
