"""Parking: a thread's connection kept for it between transactions, and
lent to another thread that would otherwise wait.

``Parking`` is mixed into ``CorePool`` (core.py). A parked connection is
out of the idle stack and not in use: the pool's ``_parked`` maps it to
the thread binding (binding.Holder) that parked it, oldest first. Its
owner takes it back with ``unpark`` at its next transaction, unless a
waiter was lent it meanwhile (``_steal_parked``, under the pool's lock,
from core.py's slow checkout).
"""
import time

import psycopg2.extensions as _ext

from zpgpool.connection import PARKED
from zpgpool.connection import USED


_monotonic = time.monotonic
_OK_STATUS = _ext.TRANSACTION_STATUS_IDLE


class Parking:
    """Keep a thread's connection between its transactions; lend it."""

    def unpark(self, conn, holder):
        """Take back a connection parked by ``holder``'s thread.

        False when another thread was lent it meanwhile, or the pool let it
        go; the caller then takes a connection the usual way.
        """
        lock = self._lock
        lock.acquire()
        try:
            # Another thread may have been lent it and parked it since:
            # then the entry is that thread's, and stays.
            if self._parked.get(conn) is not holder:
                return False
            del self._parked[conn]
            conn._zp_state = USED
            self._in_use += 1
            self._checkouts += 1
        finally:
            lock.release()
        now = _monotonic()
        if self._held_times is not None:
            conn._zp_taken = now
        # Its session may have died while it was parked; pinged like a
        # connection from the idle stack, so the thread's next request
        # does not fail. (_usable's conditions, inlined as in acquire.)
        if conn._zp_expires < now or conn._zp_created <= self._retire_before \
                or now - conn._zp_last_used >= self._check_after \
                or conn._zp_last_used < self._check_before \
                or now - conn._zp_checked >= self._recheck_after:
            return self._usable(conn)
        return True

    def park(self, conn, holder):
        """Keep a connection bound to its thread between transactions.

        The connection must be idle (no open transaction). If another thread
        is waiting, it gets the connection instead, and the owner takes
        another at its next transaction. Returns True when parked.
        """
        # (A closed connection's status is UNKNOWN.)
        if conn.get_transaction_status() != _OK_STATUS or self._closed:
            self.release(conn)
            return False
        conn._zp_last_used = now = _monotonic()
        lock = self._lock
        lock.acquire()
        try:
            if not self._waiters and conn._zp_state is USED:
                if self._held_times is not None:
                    self._held_times.record(now - conn._zp_taken)
                self._in_use -= 1
                conn._zp_state = PARKED
                self._parked[conn] = holder
                return True
        finally:
            lock.release()
        self.release(conn)
        return False

    def _steal_parked(self):
        """Take the connection parked longest by an idle thread.

        Called with the lock held. The thread that parked it notices at the
        start of its next transaction and takes another.
        """
        conn = next(iter(self._parked))
        del self._parked[conn]
        conn._zp_owner = None
        conn._zp_managed = None
        conn._zp_state = USED
        self._in_use += 1
        return conn
