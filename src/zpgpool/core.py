"""The pool itself: sizing, waiting, checkout and return, and discarding.

Its other concerns are mixed in from the floor below: the psycopg2.pool
contract (keyed.py), opening and closing (lifecycle.py), the figures
(reporting.py), the session settings (session.py), a connection's
fitness (health.py) and threads' parked connections (parking.py); fork
safety is fork.py's, and a caller's connect with its retries is the
connector's.

Lock discipline: ``CorePool._lock`` protects the pool's bookkeeping (the
idle stack, the waiters, the counters, the parked connections and each
connection's ``_zp_state``); the maintainer's jobs (maintenance.py) take
it too to read and change them. Nothing slow happens while it is held:
connecting, pinging, rolling back and closing all happen outside it, so a
hanging server never stops other threads from returning or taking
connections.

This module knows nothing of threads' bindings or of the ``transaction``
package: ``pool.py`` builds ``ConnectionPool`` on ``CorePool``, and
``binding.py`` and ``datamanager.py`` use only the members listed at the
end of ``CorePool``, under "For zpgpool's own modules".
"""
import collections
import logging
import os
import random
import threading
import time
import traceback

import psycopg2.extensions as _ext
import zope.event

from zpgpool import events
from zpgpool import fork
from zpgpool.connection import GONE
from zpgpool.connection import IDLE
from zpgpool.connection import KIND_QUERIES
from zpgpool.connection import PARKED
from zpgpool.connection import RETURNING
from zpgpool.connection import USED
from zpgpool.connection import _connection_class
from zpgpool.connection import close_quietly
from zpgpool.conninfo import ConnInfo
from zpgpool.conninfo import default_application_name
from zpgpool.connector import Connector
from zpgpool.errors import ConnectError
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import InvalidOption
from zpgpool.errors import PoolClosed
from zpgpool.errors import PoolTimeout
from zpgpool.histogram import Histogram
from zpgpool.health import HealthChecks
from zpgpool.keyed import KeyedContract
from zpgpool.lifecycle import Lifecycle
from zpgpool.maintenance import Backoff
from zpgpool.options import OPTIONS
from zpgpool.options import check_call_timeout
from zpgpool.options import check_options
from zpgpool.options import label as _pool_label
from zpgpool.parking import Parking
from zpgpool.reporting import Reporting
from zpgpool.session import SessionReset


logger = logging.getLogger("zpgpool")
_monotonic = time.monotonic
# zope.event's list of subscribers; the same list object for the life of
# the process, so an empty one costs a single truth test on the hot path.
_subscribers = zope.event.subscribers

_OK_STATUS = _ext.TRANSACTION_STATUS_IDLE


def _caller_stack():
    """Where the caller took a connection: the stack without zpgpool's
    own frames, for the leak report."""
    frames = [frame for frame in traceback.extract_stack(limit=20)
              if not frame.filename.startswith(_PACKAGE_DIR)]
    return traceback.format_list(frames[-10:])


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _Waiter:
    """A caller waiting for a connection, served in arrival order.

    The waiter's own lock is taken at creation; the caller blocks by taking
    it again and is woken when another thread releases it after setting
    ``conn`` (a connection handed over) or ``permit`` (room to connect).
    """
    __slots__ = ("lock", "conn", "permit", "error")

    def __init__(self):
        self.lock = threading.Lock()
        self.lock.acquire()
        self.conn = None
        self.permit = False
        self.error = None



class CorePool(KeyedContract, Lifecycle, Reporting, SessionReset,
               HealthChecks, Parking):
    """A thread-safe pool of PostgreSQL connections, without the Zope
    integration; ``ConnectionPool`` (pool.py) documents the options."""

    def __init__(self, dsn="", **options):
        opts = check_options(options)
        # Each option is an attribute of the pool, as psycopg2's pools have
        # minconn and maxconn; two are kept private.
        for option in OPTIONS:
            if option not in ("transaction_manager", "connect_kwargs"):
                setattr(self, option, opts[option])
        self._transaction_manager = opts["transaction_manager"]
        self._check_after = float("inf") if self.health_check_after is None \
            else self.health_check_after
        kwargs = dict(opts["connect_kwargs"] or {})
        factory = kwargs.pop("connection_factory", None)
        self._cursor_factory = kwargs.pop("cursor_factory", None)
        try:
            self._factory = _connection_class(factory)
        except TypeError as exc:
            raise InvalidOption("%s: %s" % (self.label, exc)) from None
        app_name = opts["application_name"]
        if app_name is None:
            app_name = default_application_name(self.name)
        self._conninfo = ConnInfo(self.label, dsn, kwargs,
                                  self.connect_timeout, app_name)
        # A pool that asks for a kind of server also checks a busy
        # connection that often, since its server may change kind (a
        # failover) while it is in use.
        self._recheck_after = self._check_after \
            if self._conninfo.target_session_attrs in KIND_QUERIES else float("inf")
        self._connector = Connector(self.label, self._conninfo,
                                    self._factory, self._prepare_connection,
                                    self.configure)

        self._closed = False
        self._retire_before = -1.0         # conns created earlier are stale
        self._check_before = -1.0          # conns unused since are pinged
        self._backoff = Backoff(self.reconnect_max_delay)
        # Wait times of callers that waited, always; hold times, from the
        # first call of record_held_times() on (metrics.py).
        self._wait_times = Histogram()
        self._held_times = None
        self._counters = dict.fromkeys((
            "checkouts", "waits", "wait_time", "timeouts",
            "connections_opened", "connections_failed", "connections_lost",
            "connections_discarded", "returned_bad"), 0)
        self._counters["wait_time"] = 0.0
        self._checkouts = 0    # the hot counter, kept out of the dict
        # For datamanager.py: twophase=True was checked against the server.
        self.twophase_checked = False
        self._new_books()
        fork.track(self)

    def _new_books(self):
        """Start the pool's bookkeeping afresh (in a new pool, and in the
        child after a fork)."""
        # _lock protects the attributes above and below, the maintainer's
        # Backoff and each connection's _zp_state; _changed is notified
        # when a connection opens (for open(wait=True)), and when one is
        # closed after the pool was (for close()).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._idle = collections.deque()   # most recently used at the right
        self._waiters = collections.deque()
        self._parked = {}                  # conn -> thread binding, oldest first
        self._keys = {}                    # psycopg2-style key -> conn
        self._conns = set()                # every open connection
        self._size = 0                     # open or being opened
        self._in_use = 0
        self._closing = 0                  # being closed after close()
        self._warming = 0                  # places the maintainer fills
        self._maintainer = None
        self._wakeup = threading.Event()   # runs the maintainer now
        # For binding.py: the calling thread's claim on a connection.
        self.thread_local = threading.local()

    # -- options ------------------------------------------------------------

    @property
    def dsn(self):
        """The connection string, with the password masked."""
        return self._conninfo.masked

    @property
    def closed(self):
        return self._closed

    def __repr__(self):
        return "<%s %r dsn=%r size=%d maxconn=%d%s>" % (
            type(self).__name__, self.name, self.dsn, self._size, self.maxconn,
            " closed" if self._closed else "")

    # -- checkout -------------------------------------------------------------

    def getconn(self, key=None, timeout=None):
        """Take a healthy connection, waiting up to ``timeout`` seconds
        (the pool's ``timeout`` when None); with a ``key``, the one held
        under that key (keyed.py)."""
        if key is not None:
            return self._getconn_keyed(key, timeout)
        if timeout is not None:
            timeout = check_call_timeout(self.label, timeout)
        # The hot path, for getconn() and connection() alike: kept short
        # on purpose (see benchmarks/).
        lock = self._lock
        while True:
            # acquire/release rather than "with": half the cost.
            lock.acquire()
            try:
                if self._idle and not self._closed:
                    conn = self._idle.pop()
                    conn._zp_state = USED
                    self._in_use += 1
                    self._checkouts += 1
                else:
                    conn = None
            finally:
                lock.release()
            now = _monotonic()
            if conn is None:
                conn = self._acquire_slow(timeout)
                if conn is None:
                    continue
                # It may have waited: its hold starts at the hand-over.
                now = _monotonic()
            # _usable's conditions, inlined: most checkouts need none.
            elif (conn._zp_expires < now
                  or conn._zp_created <= self._retire_before
                  or now - conn._zp_last_used >= self._check_after
                  or conn._zp_last_used < self._check_before
                  or now - conn._zp_checked >= self._recheck_after) \
                    and not self._usable(conn, timeout):
                continue
            elif _subscribers:
                self._checked_out(conn, 0.0)
            conn._zp_taken = now
            if self.leak_threshold is not None:
                conn._zp_stack = _caller_stack()
                conn._zp_warned = False
            return conn

    def _acquire_slow(self, timeout):
        if timeout is None:
            timeout = self.timeout
        start = _monotonic()
        waiter = conn = None
        with self._lock:
            if self._closed:
                raise PoolClosed("%s is closed" % self.label)
            if self._idle:
                # Raced with a return: take it through the fast path.
                return None
            if self._size < self.maxconn:
                self._size += 1
            elif self._parked:
                conn = self._steal_parked()
                self._checkouts += 1
            else:
                waiter = _Waiter()
                self._waiters.append(waiter)
                self._counters["waits"] += 1
                waiting = len(self._waiters)
                # The maintenance thread is opening a connection that will
                # go to this waiter: waiting for it is like connecting
                # oneself, which even a caller with timeout 0 does.
                if waiting <= self._warming:
                    timeout = max(timeout, self._conninfo.connect_limit)
        if conn is not None:
            # A connection lent by an idle thread gets the same checks as
            # one taken from the idle stack (its session may have died
            # while it was parked); None makes the caller try again.
            if not self._usable(conn, timeout):
                return None
            # It changes hands: reset as if its thread had returned it
            # (that thread's connection ran in autocommit mode for the
            # transaction integration, may have had another cursor
            # factory, and has its notices).
            return conn if self._reset_or_discard(conn) else None
        self._ensure_maintainer()
        if waiter is None:
            return self._connect_for_caller(start + timeout)
        events.notify(events.PoolExhausted, self, waiting)
        return self._wait(waiter, start, timeout)

    def _wait(self, waiter, start, timeout):
        try:
            got = waiter.lock.acquire(timeout=timeout) if timeout > 0 \
                else False
        except BaseException:
            # Interrupted (KeyboardInterrupt, a signal handler's error):
            # never leave a waiter behind that a returned connection, or
            # the place to open one, would go to and be lost with.
            self._abandon_wait(waiter)
            raise
        with self._lock:
            waited = _monotonic() - start
            self._counters["wait_time"] += waited
            self._wait_times.record(waited)
            if not got and waiter.conn is None and not waiter.permit \
                    and waiter.error is None:
                self._waiters.remove(waiter)
                self._counters["timeouts"] += 1
                raise PoolTimeout(self._timeout_message(waited))
        if waiter.error is not None:
            raise waiter.error
        if waiter.permit:
            conn = self._connect_for_caller(start + timeout)
            if conn is None:
                return self.getconn(None, max(0.0, timeout - waited))
            return conn
        conn = waiter.conn
        if not self._usable(conn, max(0.0, timeout - waited)):
            return self.getconn(None, max(0.0, timeout - waited))
        self._checked_out(conn, waited)
        return conn

    def _abandon_wait(self, waiter):
        """Take ``waiter`` off the queue; pass on what it was given."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.conn is not None:
                self._in_use -= 1
                self._hand_over(waiter.conn)
            elif waiter.permit:
                self._size -= 1
                self._pass_place_on()

    def _connect_for_caller(self, deadline):
        """Open a connection for a caller who holds a reserved place, and
        check it out (the retries are the connector's); None when a
        connection came back to the idle stack meanwhile."""
        conn = self._connector.connect_for_caller(
            deadline, self.timeout, self._backoff, self._open_connection,
            self._release_place, self._place_not_needed)
        if conn is None:
            return None
        with self._lock:
            closed = self._closed
            if closed:
                self._forget(conn)
            else:
                conn._zp_state = USED
                self._in_use += 1
                self._checkouts += 1
        if closed:
            conn.close()
            raise PoolClosed("%s is closed" % self.label)
        self._checked_out(conn, 0.0)
        return conn

    def _checked_out(self, conn, waited):
        """Publish a checkout; what a subscriber raises reaches the caller,
        who then never got the connection: the pool takes it back."""
        try:
            events.notify(events.ConnectionCheckedOut, self, conn, waited)
        except BaseException:
            self.putconn(conn)
            raise

    def _place_not_needed(self):
        """Between a caller's connect attempts: give its place back if a
        connection was returned meanwhile (the caller takes that one)."""
        with self._lock:
            if self._idle and not self._closed:
                self._size -= 1
                self._pass_place_on()
                return True
        return False

    def _release_place(self):
        """Give back a reserved place after a failed connect."""
        with self._lock:
            self._size -= 1
            self._pass_place_on()

    def _pass_place_on(self):
        """Offer a free place to the first waiter; called with the lock held.

        The waiter connects in its own thread, so a failing server fails
        each waiter fast instead of leaving it to time out.
        """
        if self._waiters and self._size < self.maxconn:
            waiter = self._waiters.popleft()
            self._size += 1
            waiter.permit = True
            waiter.lock.release()

    def _open_connection(self):
        """Connect (outside the lock) and register the new connection."""
        start = _monotonic()
        try:
            conn = self._connector.open()
        except ConnectError:
            with self._lock:
                self._counters["connections_failed"] += 1
                self._backoff.failed()
            raise
        now = _monotonic()
        lifetime = self.max_lifetime
        conn._zp_open(self, now, now + lifetime * (1.0 - random.random() * 0.1)
                      if lifetime is not None else float("inf"))
        with self._lock:
            self._conns.add(conn)
            self._counters["connections_opened"] += 1
            self._backoff.succeeded()
            self._changed.notify_all()   # open(wait=True) counts them
        events.notify(events.ConnectionCreated, self, conn, now - start)
        return conn

    # -- return -----------------------------------------------------------------

    def _claim_return(self, conn):
        """Check that ``conn`` is ours and out; mark it as coming back."""
        if getattr(conn, "_zp_pool", None) is not self:
            raise ConnectionMisuse(
                "%s: cannot return %r: the connection does not belong to this"
                " pool" % (self.label, conn))
        with self._lock:
            if conn._zp_state is not USED:
                raise ConnectionMisuse(
                    "%s: cannot return the connection: it is not checked out "
                    "(it was %s)" % (self.label, {
                        IDLE: "returned already", PARKED: "returned already",
                        RETURNING: "being returned by another thread",
                        GONE: "closed by the pool"}[conn._zp_state]))
            conn._zp_state = RETURNING
            conn._zp_owner = None
            key = conn._zp_key
            if key is not None:
                conn._zp_key = None
                if self._keys.get(key) is conn:
                    del self._keys[key]

    def acquire(self, timeout=None):
        """Take a healthy connection, waiting up to ``timeout`` seconds.

        For zpgpool's own modules: the pool's own checkout, even in a
        subclass that redefines ``getconn`` (compat.py's persistent pool).
        """
        return CorePool.getconn(self, None, timeout)

    def putconn(self, conn=None, key=None, close=False):
        """Handle a connection coming back, by its transaction status.

        Idle is kept; in transaction or in error is rolled back; anything
        else (active, unknown, closed) is discarded and replaced. With a
        ``key``, or none but the key, checked as keyed.py says.
        """
        if key is not None or conn is None:
            return self._putconn_keyed(conn, key, close)
        # The hot path: a sound, idle connection goes back under one lock
        # (one whose borrower changed its session or client side, or
        # received messages, takes the slow path, which resets it).
        now = _monotonic()
        try:
            hot = not close and conn._zp_pool is self \
                and conn.get_transaction_status() == _OK_STATUS \
                and not conn._zp_session_changed \
                and (got := conn.notices) is conn._zp_notices and not got \
                and (got := conn.notifies) is conn._zp_notifies and not got \
                and conn.string_types == conn._zp_types \
                and conn._zp_expires >= now \
                and conn._zp_created > self._retire_before
        except AttributeError:
            hot = False     # not a pool's connection: _claim_return says so
        if hot:
            # (A closed connection has status UNKNOWN, not IDLE.)
            lock = self._lock
            lock.acquire()
            try:
                fast = conn._zp_state is USED and conn._zp_key is None \
                    and not self._closed
                if fast:
                    conn._zp_managed = None
                    conn._zp_owner = None
                    conn._zp_last_used = now
                    if self._held_times is not None:
                        self._held_times.record(now - conn._zp_taken)
                    self._in_use -= 1
                    if self._waiters:
                        self._hand_over(conn)
                    else:
                        conn._zp_state = IDLE
                        self._idle.append(conn)
            finally:
                lock.release()
            if fast:
                if _subscribers:
                    events.notify(events.ConnectionReturned, self, conn)
                return
        self._claim_return(conn)
        conn._zp_managed = None
        if not self._reset_or_discard(conn, close):
            return
        reason = "pool closed" if self._closed \
            else self._stale(conn, _monotonic())
        if reason is not None:
            self._discard(conn, reason)
            return
        self._put_back(conn)

    def _reset_or_discard(self, conn, close=False):
        """Reset a connection that changes hands (session.py); False when
        it could not be and was discarded instead."""
        try:
            reason, lost = self._reset_for_reuse(conn, close)
        except BaseException:
            # A wait callback's error or Ctrl-C in the middle of the reset:
            # its session is in an unknown state, and it must not stay
            # claimed by a return that never ends.
            self._discard(conn, "reset interrupted")
            raise
        if reason is not None:
            self._discard(conn, reason, lost)
            return False
        return True

    def release(self, conn, close=False):
        """Take back a connection checked out with ``acquire`` (the pool's
        own return, as ``acquire`` is its own checkout)."""
        CorePool.putconn(self, conn, None, close)

    def _put_back(self, conn):
        """Make a sound connection available: first waiter, else idle."""
        conn._zp_last_used = now = _monotonic()
        with self._lock:
            if self._held_times is not None:
                self._held_times.record(now - conn._zp_taken)
            self._in_use -= 1
            self._hand_over(conn)
        if _subscribers:
            events.notify(events.ConnectionReturned, self, conn)

    def _hand_over(self, conn):
        """Give ``conn`` to the first waiter, else to the idle stack.

        Called with the lock held; ``conn`` no longer counts as in use.
        """
        if self._waiters:
            waiter = self._waiters.popleft()
            conn._zp_state = USED
            self._in_use += 1
            self._checkouts += 1
            waiter.conn = conn
            waiter.lock.release()
        else:
            conn._zp_state = IDLE
            self._idle.append(conn)

    # -- leaving the pool ------------------------------------------------------

    def _forget(self, conn):
        """Take ``conn`` out of the pool's books, whatever its state.

        Called with the lock held; False if it was gone already. Closing it
        is the caller's job, outside the lock.
        """
        state = conn._zp_state
        if state is GONE:
            return False
        if state is USED or state is RETURNING:
            self._in_use -= 1
        elif state is PARKED:
            self._parked.pop(conn, None)
        elif state is IDLE:
            self._idle.remove(conn)
        conn._zp_state = GONE
        self._conns.discard(conn)
        self._size -= 1
        return True

    def _discard(self, conn, reason, lost=False):
        """Close a connection the pool no longer wants, outside the lock.

        Its place goes to the first waiter. ``lost`` says its session was
        found dead: then every connection opened before it retires too,
        since after a server restart they are all dead, and callers should
        not meet them one by one.
        """
        with self._lock:
            if self._forget(conn):
                self._counters["connections_discarded"] += 1
            stale = self._retire_older(conn) if lost else []
            for _ in range(1 + len(stale)):
                self._pass_place_on()
            closing = self._closed
            if closing:
                self._closing += 1   # close() waits until it is closed
            refill = self._size < self.minconn and not closing
        logger.debug("%s: discarded a connection (%s)", self.label, reason)
        for c in [conn] + stale:
            close_quietly(c)
            events.notify(events.ConnectionDiscarded, self, c,
                          reason if c is conn else "retired")
        if closing:
            with self._changed:
                self._closing -= 1
                self._changed.notify_all()
        if refill:
            self._wakeup.set()

    # -- For zpgpool's own modules -------------------------------------------------
    #
    # binding.py and datamanager.py use the pool through these members only:
    #
    #   acquire(timeout=None)   take a healthy connection (see "checkout")
    #   release(conn, close=False)  hand one back (see "return")
    #   park(conn, holder), unpark(conn, holder)  parking.py
    #   label                   how errors and logs name the pool
    #   thread_local            a threading.local for binding.py
    #   twophase_checked        set by datamanager.py once the server was
    #                           found to allow PREPARE TRANSACTION
    #   reconfigure(conn)       run ``configure`` again after a session
    #                           reset undid what it set
    #
    # They are not part of the public API (IConnectionPool).

    @property
    def label(self):
        return _pool_label(self.name)

    def reconfigure(self, conn):
        """Run the pool's ``configure`` on ``conn`` again; False (and a
        warning) when it fails, and the connection should be dropped."""
        try:
            self._connector.reconfigure(conn)
        except Exception as exc:
            logger.warning("%s: configure failed after a session reset (%s);"
                           " the connection is discarded", self.label, exc)
            return False
        # What configure did to the session is the pool's, not a borrower's.
        conn._zp_session_dirty = False
        return True
