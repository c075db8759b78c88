"""A pool's life: ``open`` (warming ``minconn`` connections), ``close``
and its forced form behind ``closeall``, and the background maintainer
that ``open`` and the first checkout start.

``Lifecycle`` is mixed into ``CorePool`` (core.py) and works on the pool's
books under its ``_lock`` (core.py's lock discipline); closing, joining
the maintainer and sending events happen outside it.
"""
import logging
import threading
import time

import zope.event

from zpgpool import events
from zpgpool.connection import close_quietly
from zpgpool.errors import PoolClosed
from zpgpool.errors import PoolTimeout
from zpgpool.maintenance import Maintainer


logger = logging.getLogger("zpgpool")
_monotonic = time.monotonic
# zope.event's list of subscribers (see core.py).
_subscribers = zope.event.subscribers


class Lifecycle:
    """Opening and closing a pool, and starting its maintainer."""

    def close(self, timeout=5.0):
        """Close the pool: waiters get ``PoolClosed``, idle connections close.

        Connections in use are closed when they come back; ``close`` waits
        up to ``timeout`` seconds for them.
        """
        self._shut(force=False, timeout=timeout)

    def _shut(self, force, timeout):
        with self._lock:
            already = self._closed
            self._closed = True
            idle = list(self._idle) + list(self._parked)
            for conn in idle:
                self._forget(conn)
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:
                waiter.error = PoolClosed("%s was closed while waiting for a"
                                          " connection" % self.label)
                waiter.lock.release()
            in_use = list(self._conns) if force else []
        self._wakeup.set()
        maintainer = self._maintainer
        if maintainer is not None \
                and maintainer.thread is not threading.current_thread():
            # It ends at its next wake-up; don't leave it behind the caller.
            maintainer.thread.join(1.0)
        for conn in idle:
            close_quietly(conn)
            events.notify(events.ConnectionDiscarded, self, conn,
                          "pool closed")
        for conn in in_use:
            # psycopg2's closeall closes connections still in use.
            self._discard(conn, "pool closed")
        if not force:
            deadline = _monotonic() + timeout
            with self._changed:
                while self._in_use or self._closing:
                    remaining = deadline - _monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
        if not already:
            logger.info("%s: closed", self.label)
            events.notify(events.PoolClosed, self)

    def open(self, wait=False, timeout=30.0):
        """Start the pool's background work and warm ``minconn`` connections.

        With ``wait``, block until ``minconn`` connections are open (or
        raise ``PoolTimeout`` after ``timeout`` seconds).
        """
        if self._closed:
            raise PoolClosed("%s is closed" % self.label)
        self._ensure_maintainer()
        self._wakeup.set()
        if not wait:
            return
        deadline = _monotonic() + timeout
        with self._changed:
            while len(self._conns) < self.minconn:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise PoolTimeout(
                        "%s: could not open %d connections within %.3g s%s"
                        % (self.label, self.minconn, timeout,
                           "; last connect error: %s" % self._connector.last_error
                           if self._connector.last_error else ""))
                self._changed.wait(remaining)

    def _ensure_maintainer(self):
        maintainer = self._maintainer
        if maintainer is not None and maintainer.thread.is_alive():
            return
        with self._lock:
            current = self._maintainer
            # A thread created but not started yet counts as running: the
            # caller that created it is starting it, outside the lock.
            if self._closed or (current is not None and (
                    current.thread.ident is None
                    or current.thread.is_alive())):
                return
            maintainer = self._maintainer = Maintainer(self, self._wakeup)
        try:
            maintainer.thread.start()
        except BaseException:  # pragma: no cover (no new thread allowed)
            with self._lock:
                if self._maintainer is maintainer:
                    self._maintainer = None
            raise

    def _warmed(self, conn):
        """Account for a place the maintainer filled with ``conn``, or gave
        up on (``conn`` None: the connect failed)."""
        with self._lock:
            self._warming -= 1
            closed = self._closed
            if conn is None:
                self._size -= 1
                self._pass_place_on()
                return
            if closed:
                self._forget(conn)
            else:
                # Under the same lock as _warming, so that no caller sees
                # the place neither warming nor filled.
                conn._zp_last_used = _monotonic()
                self._hand_over(conn)
        if closed:
            conn.close()
        elif _subscribers:
            events.notify(events.ConnectionReturned, self, conn)
