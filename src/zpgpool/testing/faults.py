"""Fault-injection tooling: a load of Zope-style transactions, a TCP
proxy that cuts and heals the network, and the checks every fault scenario
ends with.

This is test and stress tooling, not part of the pool.  zpgpool's fault
tests (tests/test_faults.py) and its stress run (stress/run.py) use it, and
so can the tests of an application that wants to see its pools survive a
server restart or a network cut.  It needs only what zpgpool itself needs
(psycopg2, transaction, zope.component); it imports no test runner.

``TcpProxy`` is a real network element on loopback between the pool and a
server, which a test can make silent (it accepts and then forwards
nothing) or refusing (nothing listens on its port, and the connections
through it are reset), and heal again.

``Load`` runs many threads that each do transactions the way a Zope view
does (``getUtility(IConnectionPool, name).connection()`` and the thread's
transaction manager), remembering which of them committed, which failed
before COMMIT and which failed in it (those may or may not have
committed).  ``check_invariants`` then compares that with the database,
the pool's stats and ``pg_stat_activity``; ``check_no_leaks`` closes the
pool and checks that the server sees none of its sessions afterwards.
Both take a ``unittest.TestCase`` for their assertions (a bare
``unittest.TestCase()`` does outside a test run).

``query``, ``backend_pids`` and ``wait_for`` are the small helpers these
checks are made of.
"""
import collections
import itertools
import select
import socket
import struct
import threading
import time

import psycopg2
import transaction
from zope.component import getUtility

from zpgpool.errors import PoolError
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing.support import _execute


#: Seconds after which a check gives up waiting for something that should
#: happen much sooner.  Only catches hangs; nothing asserts a duration.
WAIT = 30.0


def wait_for(predicate, what, timeout=WAIT):
    """Poll ``predicate`` until it returns something true, and return it;
    raise AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:  # pragma: no cover - a failed check
            raise AssertionError("timed out after %s s waiting for %s"
                                 % (timeout, what))
        time.sleep(0.01)


def query(dsn, sql, params=None):
    """Run one statement on a connection of its own; return the rows."""
    return _execute(dsn, sql, params)


def backend_pids(dsn, application_name):
    """The backends connected with ``application_name``."""
    return {row[0] for row in query(
        dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (application_name,))}


# What became of a request of a Load.
COMMITTED, FAILED_BEFORE_COMMIT, FAILED_IN_COMMIT = 1, 2, 3

OPEN = "open"
SILENT = "silent"
REFUSING = "refusing"


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target`` (host, port).

    ``silent()``: connections (old and new) are kept and accepted, but no
    byte is forwarded either way.  ``refuse()``: the listening socket is
    closed, so connects are refused, and every connection through the
    proxy is reset.  ``heal()``: forward again, on the same port.

    On loopback the kernel acknowledges what the proxy does not forward,
    so a silent proxy is a cut for libpq's connect (``connect_timeout``)
    but not for TCP keepalives or ``tcp_user_timeout``, which watch
    acknowledgements; a real cut drops packets and those fire too.
    """

    def __init__(self, target):
        self.target = target
        self.mode = OPEN
        self._lock = threading.Lock()   # protects _pairs and _listener
        self._pairs = []
        self._listener = None
        self.port = None
        self._stopped = False
        self._listen()

    def _listen(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), daemon=True,
            name="proxy-accept-%d" % self.port)
        self._acceptor.start()

    def dsn_params(self):
        return {"host": "127.0.0.1", "port": self.port}

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return   # closed by refuse() or close()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:  # pragma: no cover - the target went away just now
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream),
                             daemon=True).start()

    def _pump(self, client, upstream):
        peers = {client: upstream, upstream: client}
        try:
            while True:
                if self.mode != OPEN:
                    if self.mode == REFUSING or self._stopped:
                        return
                    time.sleep(0.02)   # silent: read nothing, send nothing
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            _reset(client)
            _reset(upstream)
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))

    def silent(self):
        self.mode = SILENT

    def refuse(self):
        self.mode = REFUSING
        with self._lock:
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
            except OSError:  # pragma: no cover - not connected, some kernels
                pass
            listener.close()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def heal(self):
        with self._lock:
            relisten = self._listener is None
        self.mode = OPEN
        if relisten:
            self._listen()

    def close(self):
        self._stopped = True
        self.refuse()
        self._acceptor.join(WAIT)


def _reset(sock):
    """Close ``sock`` with a RST, as a middlebox dropping a flow does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))
    except OSError:  # pragma: no cover - closed by the other side already
        pass
    try:
        sock.close()
    except OSError:  # pragma: no cover - as above
        pass


# -- load -----------------------------------------------------------------

#: What a request may fail with while the server or the network fails:
#: psycopg2's own errors for a lost session or a failed connect (the
#: pool's ConnectError is one), and the pool's errors.
CLEAR_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError,
                PoolError, transaction.interfaces.TransientError)


def make_table(dsn, table):
    query(dsn, "DROP TABLE IF EXISTS %s" % table)
    # No unique constraint: a token committed twice must be seen.
    query(dsn, "CREATE TABLE %s (token text NOT NULL)" % table)


def one_request(pool_name, table, token, sleep=0.0):
    """Insert ``token`` in a transaction of the thread's transaction
    manager, as a view would.  Return "committed", or raise with the phase
    ("statement" or "commit") as the exception's ``phase``."""
    tm = transaction.manager
    tm.begin()
    try:
        cur = getUtility(IConnectionPool, pool_name).connection().cursor()
        cur.execute("INSERT INTO %s (token) VALUES (%%s)" % table, (token,))
        if sleep:
            cur.execute("SELECT pg_sleep(%s)", (sleep,))
    except BaseException as exc:
        tm.abort()
        exc.phase = "statement"
        raise
    try:
        tm.commit()
    except BaseException as exc:
        tm.abort()
        exc.phase = "commit"
        raise
    return "committed"


class Load:
    """``threads`` threads doing ``one_request`` until stopped (or each
    ``per_thread`` times)."""

    def __init__(self, pool_name, table, threads=16, per_thread=None,
                 sleep=0.0, pause_after_error=0.01, keep_errors=None):
        self.pool_name = pool_name
        self.table = table
        self.per_thread = per_thread
        self.sleep = sleep
        self.pause_after_error = pause_after_error
        self._stop = threading.Event()
        self._lock = threading.Lock()   # protects what is below
        # Compact, so that a long soak measures the pool's memory, not
        # this record's: one byte per request and thread (the token is
        # "thread-index"), the recent successes, the recent errors with
        # their tracebacks dropped, and a count of every error by class.
        self._outcomes = {}            # thread -> bytearray of outcomes
        self.errors = collections.deque(maxlen=keep_errors)
        self.error_counts = collections.Counter()
        self.successes = collections.deque(maxlen=50000)
        self.unclear = []              # errors outside CLEAR_ERRORS
        self.threads = [threading.Thread(target=self._run, args=(n,),
                                         daemon=True, name="load-%d" % n)
                        for n in range(threads)]

    def _tokens(self, outcome):
        with self._lock:
            items = [(n, bytes(b)) for n, b in self._outcomes.items()]
        return ["%d-%d" % (n, i) for n, b in items
                for i, o in enumerate(b) if o == outcome]

    @property
    def committed(self):
        return self._tokens(COMMITTED)

    @property
    def failed_before_commit(self):
        return self._tokens(FAILED_BEFORE_COMMIT)

    @property
    def failed_in_commit(self):
        """Failed in COMMIT: these may or may not have committed."""
        return self._tokens(FAILED_IN_COMMIT)

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, n):
        outcomes = bytearray()
        with self._lock:
            self._outcomes[n] = outcomes
        for i in itertools.count():
            if self._stop.is_set() or (self.per_thread is not None
                                       and i >= self.per_thread):
                break
            token = "%d-%d" % (n, i)
            try:
                one_request(self.pool_name, self.table, token, self.sleep)
            except Exception as exc:
                exc.__traceback__ = None
                now = time.monotonic()
                with self._lock:
                    outcomes.append(
                        FAILED_IN_COMMIT if getattr(exc, "phase", "")
                        == "commit" else FAILED_BEFORE_COMMIT)
                    self.errors.append((now, n, exc))
                    self.error_counts[type(exc).__name__] += 1
                    # Only when a check is about to fail.
                    if not isinstance(exc, CLEAR_ERRORS):  # pragma: no cover
                        self.unclear.append(exc)
                del exc
                time.sleep(self.pause_after_error)
            else:
                now = time.monotonic()
                with self._lock:
                    outcomes.append(COMMITTED)
                    self.successes.append((now, n))

    def stop(self, testcase=None, timeout=WAIT):
        """Stop the threads; fail (or raise) if one hangs."""
        self._stop.set()
        return self.join(testcase, timeout)

    def join(self, testcase=None, timeout=WAIT):
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:  # pragma: no cover - only when a thread hangs
            message = "threads stuck: %s" % ", ".join(stuck)
            if testcase is not None:
                testcase.fail(message)
            raise AssertionError(message)
        return self

    def successes_since(self, since):
        with self._lock:
            return [(t, n) for (t, n) in list(self.successes) if t >= since]

    def recovery(self, since):
        """Seconds from ``since`` to the first success, and to every thread
        having succeeded again (None when not yet)."""
        after = self.successes_since(since)
        if not after:
            return None, None
        first = min(t for t, _ in after) - since
        per_thread = {}
        for t, n in after:
            per_thread.setdefault(n, t)
        everyone = (max(per_thread.values()) - since
                    if len(per_thread) == len(self.threads) else None)
        return first, everyone

    def errors_since(self, since):
        with self._lock:
            return [(t, n, e) for (t, n, e) in self.errors if t >= since]

    def error_summary(self):  # pragma: no cover - stress/run.py's table
        with self._lock:
            return dict(self.error_counts)


def wait_until_all_succeed(load, since, timeout=WAIT):
    """Wait until every thread of ``load`` succeeded after ``since``."""
    return wait_for(lambda: load.recovery(since)[1] is not None,
                    "every thread succeeding after %.3f" % since, timeout)


def check_invariants(testcase, pool, dsn, table, load):
    """What every scenario checks once its load has stopped."""
    testcase.assertEqual(load.unclear, [], "errors that say nothing useful")
    rows = query(dsn, "SELECT token, count(*) FROM %s GROUP BY token" % table)
    in_db = dict(rows)
    twice = {t: c for t, c in in_db.items() if c != 1}
    testcase.assertEqual(twice, {}, "tokens committed more than once")
    missing = set(load.committed) - set(in_db)
    testcase.assertEqual(missing, set(), "committed but not in the database")
    uncommitted = set(load.failed_before_commit) & set(in_db)
    testcase.assertEqual(uncommitted, set(),
                         "failed before COMMIT but in the database")
    attempted = set(load.committed) | set(load.failed_before_commit) \
        | set(load.failed_in_commit)
    testcase.assertEqual(set(in_db) - attempted, set(), "rows from nowhere")
    # The load's threads have ended, so their connections come back.
    wait_for(lambda: pool.stats()["in_use"] == 0, "in_use back to 0")
    stats = pool.stats()
    testcase.assertLessEqual(stats["size"], pool.maxconn)
    testcase.assertEqual(stats["waiting"], 0)
    return stats


def check_no_leaks(testcase, pool, dsn):
    """Close the pool and check that the server sees none of its
    sessions afterwards."""
    app_name = "zpgpool:%s" % pool.name
    pool.close()
    wait_for(lambda: not backend_pids(dsn, app_name),
             "no backend of %s left after close()" % app_name)
