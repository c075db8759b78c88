"""Opening a pool's connections, and what failing to open them means.

A ``Connector`` makes one attempt at a time (the pool decides who tries
again, and when). Each failure is classified: *permanent* ones (a wrong
password, a database or role that does not exist, a refused pg_hba entry)
will not heal by waiting, so callers fail at once; every other failure
(refused, timed out, the server starting, stopping or in recovery, too
many clients, a standby where a primary is asked for) is *transient*:
callers keep trying up to their own time-out. Consecutive failures form an
outage, whose start, count and last cause the connector remembers; while
it lasts, the pool's log gets one warning per ``warn_every`` seconds with
the count, not one per attempt.

A new connection gets the pool's cursor factory and transaction
characteristics, then the pool's ``configure`` callable, before anyone
uses it.

The connector also runs a caller's own connect (``connect_for_caller``:
retries with back-off through a transient outage, one probing caller at a
time through a long one) and a prefer-standby pool's look for a standby
(``standby_reachable``). It reaches into the pool only through the
callables it is given, which take the pool's lock themselves.
"""
import logging
import re
import threading
import time

import psycopg2

from zpgpool.connection import PooledConnection
from zpgpool.connection import run_statement
from zpgpool.errors import ConnectError


logger = logging.getLogger("zpgpool")
_monotonic = time.monotonic

# Failures that waiting does not cure: authentication (SQLSTATE 28000,
# 28P01), a missing database (3D000) or role, the server's pg_hba refusal.
# psycopg2 gives no SQLSTATE for a failed connect, hence libpq's and the
# server's (English) words.
_PERMANENT = re.compile(
    r"password authentication failed|authentication failed"
    r"|no pg_hba\.conf entry|database \".*\" does not exist"
    r"|role \".*\" does not exist|invalid connection option"
    r"|password is required|password supplied|server does not support SSL"
    r"|certificate", re.IGNORECASE)


def is_permanent(message):
    """Tell whether a connect failure's message says that trying again
    cannot help."""
    return _PERMANENT.search(message) is not None


class Connector:
    """Opens connections for one pool and keeps the record of failures.

    ``_lock`` protects the outage record below; nothing slow happens
    under it.
    """

    def __init__(self, label, conninfo, factory, prepare, configure=None,
                 warn_every=10.0):
        self.label = label
        self.conninfo = conninfo        # a ConnInfo
        self.factory = factory
        self.prepare = prepare          # pool-side setup of a new connection
        self.configure = configure      # the user's, or None
        self.warn_every = warn_every
        self._lock = threading.Lock()
        self.failed = 0                 # every failed attempt, ever
        self.failures = 0               # failed attempts in a row
        self.last_error = None          # the last failure's message
        self.outage_since = None        # monotonic time of the first one
        self._warned_at = None          # when the last warning was logged
        self._unwarned = 0              # failures since that warning
        self.probing = False            # a caller tries during a long outage
        # prefer-standby: when a standby was last looked for, and found.
        self._standby_asked = -1e9
        self._standby_seen = False

    def open(self):
        """Connect once, prepare and configure the connection; return it.

        Raises ``ConnectError`` whose ``permanent`` says whether trying
        again could help.
        """
        start = _monotonic()
        try:
            conn = psycopg2.connect(self.conninfo.conninfo,
                                    connection_factory=self.factory)
        except psycopg2.Error as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            permanent = is_permanent(message)
            self._failed(message, permanent)
            error = ConnectError("%s: cannot connect to %s: %s" % (
                self.label, self.conninfo.target, message))
            error.permanent = permanent
            raise error from None
        if conn.dsn is None:
            # A factory whose __init__ skipped psycopg2's: never connected.
            self._failed("connection_factory did not connect", True)
            factory = next(cls for cls in type(conn).__mro__
                           if not issubclass(cls, PooledConnection))
            error = ConnectError(
                "%s: connection_factory %s.%s made a connection that is not "
                "connected: its __init__ must call psycopg2's "
                "connection.__init__" % (self.label, factory.__module__,
                                         factory.__qualname__))
            error.permanent = True
            raise error
        try:
            conn._zp_state
        except AttributeError:
            # A connection_factory whose __init__ skipped PooledConnection's.
            conn._zp_init()
        try:
            self.prepare(conn)
            if self.configure is not None:
                self._configure(conn)
        except BaseException:
            conn.close()
            raise
        self._succeeded(_monotonic() - start)
        return conn

    def _configure(self, conn):
        """Run the pool's ``configure`` on ``conn`` and commit what it did."""
        try:
            self.configure(conn)
            if conn.get_transaction_status() != \
                    psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                psycopg2.extensions.connection.commit(conn)
        except Exception as exc:
            name = getattr(self.configure, "__qualname__", None) \
                or repr(self.configure)
            module = getattr(self.configure, "__module__", None)
            if module:
                name = "%s.%s" % (module, name)
            message = "%s: %s" % (type(exc).__name__,
                                  " ".join(str(exc).split()))
            self._failed("configure %s failed: %s" % (name, message), True)
            error = ConnectError(
                "%s: the new connection was discarded: its configure "
                "callable %s failed: %s" % (self.label, name, message))
            error.permanent = True
            raise error from exc

    def after_fork(self):
        """Start the record afresh in a child process: a parent's thread may
        have held the lock at the fork, and its outage is not the child's."""
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error = None
        self.outage_since = None
        self._warned_at = None
        self._unwarned = 0
        self.probing = False

    def reconfigure(self, conn):
        """Run ``configure`` again, after a session reset undid it (the
        connection is in autocommit mode, between transactions)."""
        if self.configure is not None:
            self.configure(conn)

    # -- the record of failures --------------------------------------------------

    def _failed(self, message, permanent):
        now = _monotonic()
        with self._lock:
            self.failed += 1
            self.failures += 1
            self.last_error = message
            if self.outage_since is None:
                self.outage_since = now
            self._unwarned += 1
            due = self._warned_at is None \
                or now - self._warned_at >= self.warn_every
            if due:
                count, self._unwarned = self._unwarned, 0
                self._warned_at = now
                since = now - self.outage_since
        if not due:
            return
        if count > 1:
            logger.warning("%s: cannot connect: %s (%d failed attempts in "
                           "the last %.0f s%s)", self.label, message, count,
                           min(since, self.warn_every),
                           "" if permanent else "; still trying")
        else:
            logger.warning("%s: cannot connect: %s", self.label, message)

    def _succeeded(self, seconds):
        with self._lock:
            since, failures = self.outage_since, self.failures
            self.failures = 0
            self.last_error = None
            self.outage_since = None
            self._warned_at = None
            self._unwarned = 0
        if since is not None:
            logger.info("%s: connected again after %.1f s and %d failed "
                           "attempt%s", self.label, _monotonic() - since,
                           failures, "" if failures == 1 else "s")
        else:
            logger.debug("%s: opened a connection in %.1f ms", self.label,
                         seconds * 1000)

    def outage(self):
        """Seconds since connecting started failing, or 0.0."""
        since = self.outage_since
        return 0.0 if since is None else _monotonic() - since


    # -- a caller's own connect ------------------------------------------------

    def connect_for_caller(self, deadline, timeout, backoff, attempt,
                           release_place, place_not_needed):
        """Open a connection for a caller who holds a reserved place.

        Through a transient outage (a restart, a failover) the caller keeps
        trying, with ``backoff`` and jitter, until its ``deadline``; a
        permanent failure, or an outage already longer than the pool's
        ``timeout``, fails it at once.

        The pool's side: ``attempt()`` opens and registers one connection
        (or raises ``ConnectError``); ``release_place()`` gives the place
        back after a failure; ``place_not_needed()``, asked between tries,
        gives it back and answers True when a connection came back to the
        pool meanwhile: then this returns None (the caller takes that one).
        """
        first = _monotonic()
        attempts = 0
        probe = self._start_probe(timeout, release_place)
        try:
            while True:
                attempts += 1
                try:
                    return attempt()
                except ConnectError as exc:
                    now = _monotonic()
                    delay = min(backoff.delay(), 1.0)
                    if exc.permanent or probe or now + delay >= deadline:
                        release_place()
                        if probe:
                            exc.args = (
                                "%s (the server has been unreachable for "
                                "%.1f s, longer than the pool's timeout "
                                "(%.3g s), so callers try once and fail at "
                                "once until a connection succeeds again)"
                                % (exc.args[0], self.outage(), timeout),)
                        elif attempts > 1:
                            exc.args = ("%s (tried for %.1f s, %d attempts)"
                                        % (exc.args[0], now - first,
                                           attempts),)
                        raise
                    time.sleep(delay)
                    if place_not_needed():
                        return None
                except BaseException:
                    release_place()
                    raise
        finally:
            if probe:
                self.probing = False

    def _start_probe(self, timeout, release_place):
        """In an outage longer than the pool's ``timeout``, let one caller
        at a time make a single attempt (True) and fail every other one at
        once with the last error, instead of holding each for a whole
        time-out; outside one, return False."""
        outage = self.outage()
        if outage <= timeout:
            return False
        with self._lock:
            if not self.probing:
                self.probing = True
                return True
        release_place()
        error = ConnectError(
            "%s: cannot connect to %s: the server has been unreachable for "
            "%.1f s, longer than the pool's timeout (%.3g s), so callers "
            "fail at once until a connection succeeds again; last error: %s"
            % (self.label, self.conninfo.target, outage, timeout,
               self.last_error))
        error.permanent = False
        raise error

    # -- prefer-standby ------------------------------------------------------------

    def standby_reachable(self, period):
        """Tell whether a standby can be reached now, for a pool that
        prefers standbys and holds a connection to a primary. Asks at most
        once per ``period`` seconds (a connect of its own, outside the
        lock), and answers from the last look in between."""
        now = _monotonic()
        with self._lock:
            if now - self._standby_asked < period:
                return self._standby_seen
            self._standby_asked = now
        try:
            probe = psycopg2.connect(self.conninfo.conninfo)
            try:
                seen = run_statement(probe, "SELECT pg_is_in_recovery()")
            finally:
                probe.close()
        except psycopg2.Error:
            seen = False
        with self._lock:
            self._standby_seen = seen
        return seen
