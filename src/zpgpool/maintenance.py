"""A pool's background work: shrink, refill with back-off, report leaks.

The maintainer runs in one daemon thread per pool, started at the pool's
first use. It holds the pool weakly, so a pool nobody uses any more is
collected and its thread ends; it ends too when the pool is closed. Each
job is a small method that takes the pool's lock for its bookkeeping only
and closes, connects and logs outside it (see core.py's lock discipline).
"""
import logging
import random
import threading
import time
import weakref

from zpgpool import events
from zpgpool.connection import IDLE
from zpgpool.connection import USED
from zpgpool.connection import close_quietly
from zpgpool.errors import ConnectError


logger = logging.getLogger("zpgpool")
_monotonic = time.monotonic


class Backoff:
    """How long to wait before trying to connect again while connects fail.

    The delay doubles from 0.2 s with each failure in a row, up to
    ``max_delay``, and is cut by a random part of up to a half, so that
    pools that lost their server together do not retry together.
    ``failures`` is changed under the pool's lock.
    """

    def __init__(self, max_delay):
        self.max_delay = max_delay
        self.failures = 0   # connects that failed in a row

    def failed(self):
        self.failures += 1

    def succeeded(self):
        self.failures = 0

    def delay(self):
        """Seconds to wait before the next attempt."""
        delay = min(self.max_delay, 0.1 * 2 ** min(self.failures, 16))
        return delay * random.uniform(0.5, 1.0)


class Maintainer:
    """The background thread of one pool.

    ``wakeup`` is the pool's Event: setting it makes the thread run a round
    now (a connection was discarded, the pool was opened or closed).
    """

    def __init__(self, pool, wakeup):
        self.wakeup = wakeup
        self.thread = threading.Thread(
            target=self._run, args=(weakref.ref(pool),),
            name="zpgpool-maintainer-%s" % pool.name, daemon=True)

    def _run(self, pool_ref):
        delay = 0.0
        while True:
            self.wakeup.wait(delay)
            self.wakeup.clear()
            pool = pool_ref()
            if pool is None or pool.closed:
                return
            try:
                delay = self.run_once(pool)
            except Exception:  # pragma: no cover - must never kill the thread
                logger.exception("%s: maintenance failed", pool.label)
                delay = 1.0
            if delay is None:
                return
            del pool

    def run_once(self, pool):
        """Do each job once; return the seconds until the next round, or
        None when the pool is closed."""
        if pool.closed:
            return None
        now = _monotonic()
        self.shrink(pool, now)
        self.report_leaks(pool, now)
        return self.refill(pool)

    def shrink(self, pool, now):
        """Close connections past their lifetime, and those above
        ``minconn`` unused for longer than ``max_idle``."""
        doomed = []
        max_idle = pool.max_idle
        with pool._lock:
            surplus = pool._size - pool.minconn
            # The idle stack's left end holds the longest unused; parked
            # connections come oldest first too.
            for conn in list(pool._idle) + list(pool._parked):
                # A parked one past its lifetime is replaced when its thread
                # takes it back (core.py's unpark).
                expired = conn._zp_state is IDLE and conn._zp_expires < now
                idle_too_long = (max_idle is not None and surplus > 0
                                 and now - conn._zp_last_used > max_idle)
                if expired or idle_too_long:
                    pool._forget(conn)
                    pool._counters["connections_discarded"] += 1
                    surplus -= 1
                    doomed.append((conn, "lifetime" if expired else "idle"))
        for conn, reason in doomed:
            close_quietly(conn)
            events.notify(events.ConnectionDiscarded, pool, conn, reason)

    def report_leaks(self, pool, now):
        """Log, once per checkout, a connection out for longer than
        ``leak_threshold``, with the stack where it was taken."""
        threshold = pool.leak_threshold
        if threshold is None:
            return
        with pool._lock:
            leaks = [conn for conn in pool._conns
                     if conn._zp_state is USED and not conn._zp_warned
                     and now - conn._zp_taken > threshold]
            for conn in leaks:
                conn._zp_warned = True
        for conn in leaks:
            logger.warning(
                "%s: a connection has been checked out for %.1f s (leak "
                "threshold %.3g s); it was taken at:\n%s", pool.label,
                now - conn._zp_taken, threshold,
                "".join(conn._zp_stack or ()))

    def refill(self, pool):
        """Open connections up to ``minconn``; return when to run again:
        soon after failed connects, with back-off while refilling fails."""
        with pool._lock:
            missing = pool.minconn - pool._size
            if missing > 0:
                # Reserved now, so that callers count them as coming.
                pool._size += missing
                pool._warming += missing
            failing = pool._backoff.failures
        for _ in range(max(missing, 0)):
            try:
                conn = pool._open_connection()
            except ConnectError:
                pool._warmed(None)
            else:
                pool._warmed(conn)
        if missing > 0 and pool._backoff.failures:
            return pool._backoff.delay()
        return 1.0 if failing == 0 else 0.1
