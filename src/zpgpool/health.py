"""Whether a connection is fit to hand out: its lifetime, its age against
the last connection found dead, and a bounded ping after it sat idle (or
when a pool that asks for a kind of server wants it checked again).

``HealthChecks`` is mixed into ``CorePool`` (core.py), which inlines the
conditions of ``_usable`` on its hot path and calls it only when one of
them holds. It reads the pool's ``_retire_before``, ``_check_before``,
``_check_after``, ``_recheck_after``, ``validation_timeout``, its
connector and conninfo, and changes the books only through
``_discard`` and ``_forget``; ``_retire_older`` runs with the lock held.
"""
import time

import psycopg2

from zpgpool.connection import server_fits


_monotonic = time.monotonic


class HealthChecks:
    """The fitness test of a connection, and retiring older ones."""

    def _usable(self, conn, timeout=None):
        """Check a connection about to be handed out; discard it if it is
        not fit. A ping takes at most ``validation_timeout`` seconds, and at
        most the caller's ``timeout`` when that is shorter.

        The one fitness test. The hot path in ``acquire`` calls it only
        when the same conditions, inlined there, say it has work to do.
        """
        now = _monotonic()
        reason = self._stale(conn, now)
        if reason is not None:
            self._discard(conn, reason)
            return False
        if now - conn._zp_last_used >= self._check_after \
                or conn._zp_last_used < self._check_before \
                or now - conn._zp_checked >= self._recheck_after:
            # Idle long enough for its session to have died (a server
            # restart in the night), or unused since another connection
            # was found dead.
            bound = self.validation_timeout
            if timeout is not None and 0 < timeout < bound:
                bound = timeout
            return self._ping(conn, bound)
        return True

    def _stale(self, conn, now):
        """Why ``conn`` must not be used again, or None: its lifetime is
        over, or it was opened before a connection found dead."""
        if conn._zp_expires < now:
            return "lifetime"
        if conn._zp_created <= self._retire_before:
            return "retired"
        return None

    def _ping(self, conn, bound):
        """Ask the server whether it is still the kind the pool wants, for
        at most ``bound`` seconds on a silent network; discard the
        connection if it fails, or if its server no longer fits."""
        try:
            fits = server_fits(conn, self._conninfo.target_session_attrs,
                               bound)
        except psycopg2.Error:
            self._discard(conn, "broken", lost=True)
            return False
        except BaseException:
            # A wait callback's error or Ctrl-C in the middle of the ping:
            # the session is in an unknown state, and its caller will not
            # get it.
            self._discard(conn, "check interrupted")
            raise
        conn._zp_last_used = conn._zp_checked = _monotonic()
        # A pool that prefers standbys keeps its primary while no standby
        # can be reached.
        if fits or (self._conninfo.target_session_attrs == "prefer-standby"
                    and not self._connector.standby_reachable(
                        max(self._check_after, 1.0))):
            return True
        self._discard(conn, "server no longer %s"
                      % self._conninfo.target_session_attrs)
        return False

    def _retire_older(self, lost):
        """Retire the idle connections opened before ``lost``, whose
        session died; return them. Called with the lock held."""
        self._counters["connections_lost"] += 1
        # Connections opened after it may have died with it (a server
        # restart): each is pinged before its next use.
        self._check_before = _monotonic()
        if lost._zp_created <= self._retire_before:
            return []
        self._retire_before = lost._zp_created
        stale = [c for c in self._idle if c._zp_created <= self._retire_before]
        for c in stale:
            self._forget(c)
        self._counters["connections_discarded"] += len(stale)
        return stale
