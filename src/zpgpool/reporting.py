"""What a pool tells about itself: ``stats()``, ``histograms()``, the
opt-in record of hold times, and the message of a checkout's time-out.

``Reporting`` is mixed into ``CorePool`` (core.py); it reads the pool's
counters and gauges under its ``_lock`` (the counters are kept by core.py
and maintenance.py) and the connector's record of failures.
"""
from zpgpool.histogram import Histogram


class Reporting:
    """The pool's figures, read under its lock."""

    def histograms(self):
        """Return copies of the pool's time histograms (histogram.py):
        ``wait``, how long callers that waited waited, and ``held``, how
        long connections stayed checked out (empty until
        ``record_held_times()`` was called)."""
        with self._lock:
            wait = self._wait_times.snapshot()
            held = self._held_times.snapshot() if self._held_times \
                is not None else Histogram()
        return {"wait": wait, "held": held}

    def record_held_times(self):
        """From now on, record how long each connection is held (a little
        work at every return, which a pool without metrics skips)."""
        if self._held_times is None:
            with self._lock:
                if self._held_times is None:
                    self._held_times = Histogram()

    def stats(self):
        """Return a snapshot of the pool's gauges and counters."""
        with self._lock:
            result = dict(self._counters, checkouts=self._checkouts)
            result.update(
                name=self.name,
                size=len(self._conns),
                idle=len(self._idle),
                bound_idle=len(self._parked),
                in_use=self._in_use,
                waiting=len(self._waiters),
                connecting=self._size - len(self._conns),
                minconn=self.minconn,
                maxconn=self.maxconn,
                closed=self._closed,
                last_connect_error=self._connector.last_error,
                outage_seconds=round(self._connector.outage(), 3),
            )
        return result

    def _timeout_message(self, waited):
        """Explain a time-out; called with the lock held."""
        # Places taken by connections still being opened count too.
        connecting = self._size - len(self._conns)
        msg = ("%s: connection pool exhausted: no connection became free "
               "within %.3g s (maxconn=%d, in use=%d, %swaiting=%d)" % (
                   self.label, waited, self.maxconn, self._in_use,
                   "connecting=%d, " % connecting if connecting > 0 else "",
                   len(self._waiters)))
        if self._connector.last_error:
            msg += "; last connect error: %s" % self._connector.last_error
        return msg
