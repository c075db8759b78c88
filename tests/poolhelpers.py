"""Helpers shared by the pool and binding tests.

Everything here works against the real throwaway server: it counts
backends in ``pg_stat_activity``, runs threads that must finish, kills a
process in the middle of a commit, and captures what the ``zpgpool``
logger says.
"""
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid

import psycopg2
import psycopg2.extensions

from zpgpool.testing import PostgresLayer
# Shared with stress/run.py, which must not import this tests package.
from zpgpool.testing.faults import WAIT  # noqa: F401
from zpgpool.testing.faults import backend_pids  # noqa: F401
from zpgpool.testing.faults import query  # noqa: F401
from zpgpool.testing.faults import wait_for  # noqa: F401

from tests.support import python_env


#: A server that cannot prepare transactions (two-phase unavailable).
NO_TWOPHASE_LAYER = PostgresLayer(
    "NO_TWOPHASE_LAYER", private=True,
    settings={"max_prepared_transactions": 0}, module=__name__)


def unique_name(prefix="t"):
    """A pool name no other test uses, so its backends can be counted."""
    return "%s%s" % (prefix, uuid.uuid4().hex[:10])


def with_params(dsn, **params):
    """``dsn`` with ``params`` added or replaced."""
    return psycopg2.extensions.make_dsn(dsn, **params)


def server_pid(conn):
    """Ask the server which backend serves ``conn``."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]



def terminate(dsn, *conns):
    """End the server sessions of ``conns`` without telling them."""
    pids = [server_pid(conn) for conn in conns]
    for conn in conns:
        conn.rollback()
    query(dsn, "SELECT pg_terminate_backend(pid) FROM unnest(%s) AS pid",
          (pids,))

class TableChecks:
    """For a TestCase with a ``layer`` (its ``dsn``) and a ``name`` no
    other test uses: a table of the test's own, its rows, and a check that
    a connection works."""

    def make_table(self):
        """A table of this test's own, dropped afterwards."""
        table = "t_" + self.name
        query(self.layer.dsn, "CREATE TABLE %s (v int)" % table)
        self.addCleanup(query, self.layer.dsn, "DROP TABLE %s" % table)
        return table

    def rows(self, table):
        return [r[0] for r in query(
            self.layer.dsn, "SELECT v FROM %s ORDER BY v" % table)]

    def assertWorks(self, conn):
        """``conn`` answers a query; its transaction is rolled back."""
        with conn.cursor() as cur:
            cur.execute("SELECT 42")
            self.assertEqual(cur.fetchone(), (42,))
        conn.rollback()


class Worker(threading.Thread):
    """A thread that keeps the result or the exception of its target."""

    def __init__(self, target, *args, name=None):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._args = args
        self.result = None
        self.error = None

    def run(self):
        try:
            self.result = self._target_fn(*self._args)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, testcase, timeout=WAIT, expect_error=False):
        """Join the thread, failing the test if it hangs or (unless
        ``expect_error``) raised."""
        self.join(timeout)
        testcase.assertFalse(self.is_alive(), "thread %s hangs" % self.name)
        if not expect_error and self.error is not None:
            raise AssertionError("thread %s failed: %r"
                                 % (self.name, self.error)) from self.error
        return self.result


def start(testcase, target, *args, name=None):
    """Start a Worker; the test fails at clean-up if it is still running."""
    worker = Worker(target, *args, name=name)
    worker.start()
    testcase.addCleanup(_check_finished, testcase, worker)
    return worker


def _check_finished(testcase, worker):
    worker.join(WAIT)
    testcase.assertFalse(worker.is_alive(),
                         "thread %s still running" % worker.name)


def innermost_frame(thread):
    """The Python frame ``thread`` is executing right now, or None."""
    return sys._current_frames().get(thread.ident)


def is_in(thread, function, filename_part=""):
    """Tell whether ``thread`` is running ``function`` (innermost frame)."""
    frame = innermost_frame(thread)
    return frame is not None and frame.f_code.co_name == function \
        and filename_part in frame.f_code.co_filename


def is_connecting(thread):
    """Tell whether ``thread`` waits in psycopg2's connect: the C call
    runs under the pool connection class's own __init__."""
    return is_in(thread, "__init__", "zpgpool/connection.py") \
        or is_in(thread, "connect", "psycopg2")


class LogCapture(logging.Handler):
    """Collect the records of the ``zpgpool`` logger while installed."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def install(self, testcase):
        logger = logging.getLogger("zpgpool")
        level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)

        def uninstall():
            logger.removeHandler(self)
            logger.setLevel(level)
        testcase.addCleanup(uninstall)
        return self

    def text(self):
        """Every captured line, as the formatter would write it."""
        return "\n".join(r.getMessage() for r in self.records)


def close_pool(testcase, pool):
    """Close ``pool`` (in-use connections too) and check its maintenance
    thread ended."""
    pool.closeall()
    maintainer = pool._maintainer
    if maintainer is not None:
        thread = maintainer.thread
        thread.join(WAIT)
        testcase.assertFalse(thread.is_alive(),
                             "the maintenance thread of %r still runs" % pool)


def _current_coverage():
    try:
        import coverage
    except ImportError:   # pragma: no cover (the test extra installs it)
        return None
    current = getattr(coverage.Coverage, "current", None)
    return current() if current is not None else None


def run_in_child(body):
    """Run ``body()`` in a forked child process; return ``(exit code,
    message)``, the message being "ok" or the child's traceback.

    The child leaves with ``os._exit``, as a forked worker that must not
    run its parent's clean-up does. When coverage measures the tests with
    ``patch = fork`` the child has a Coverage of its own, whose data is
    saved first; the parent's is never saved from the child.
    """
    parent_coverage = _current_coverage()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:   # pragma: no cover (the child's lines are its own)
        code, message = 0, b"ok"
        try:
            os.close(read_end)
            body()
        except BaseException:
            code, message = 1, traceback.format_exc().encode()
        try:
            os.write(write_end, message)
            cov = _current_coverage()
            if cov is not None and cov is not parent_coverage:
                cov.stop()
                cov.save()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), message


def closed_port():
    """A TCP port of 127.0.0.1 on which nobody listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*argv):
    """Run ``zpgpool *argv`` in-process; return (status, stdout, stderr)."""
    import contextlib
    import io
    from zpgpool import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


# Run by crash_in_commit() in a Python of its own: one transaction that
# writes VALUE through a two-phase pool on each server (and, given a
# FileStorage, in ZODB's root), and a participant that kills the process
# in one phase of the commit.
_CRASH = textwrap.dedent("""
    import os, signal, sys, transaction
    from zpgpool import ConnectionPool
    table, value, path, killer_key, phase = sys.argv[1:6]
    if path:
        import ZODB, ZODB.FileStorage
        zconn = ZODB.DB(ZODB.FileStorage.FileStorage(path)).open()
        zconn.root()["value"] = value
    for name, dsn in zip(sys.argv[6::2], sys.argv[7::2]):
        pool = ConnectionPool(dsn, name=name, twophase=True)
        pool.connection().cursor().execute(
            "INSERT INTO %s (value) VALUES (%%s)" % table, (value,))

    class Killer:
        transaction_manager = transaction.manager
        def sortKey(self):
            return killer_key
        def abort(self, txn):
            pass
        tpc_begin = commit = tpc_abort = tpc_finish = tpc_vote = abort
        def die(self, txn):
            os.kill(os.getpid(), signal.SIGKILL)

    killer = Killer()
    setattr(killer, phase, killer.die)
    transaction.get().join(killer)
    transaction.commit()
""")


def crash_in_commit(testcase, pools, table, killer_key, phase,
                    value="crash", zodb_path=None, timeout=60):
    """Commit, in a Python of its own, a transaction that inserts ``value``
    into ``table`` through a two-phase pool for each (name, dsn) of
    ``pools`` (and sets ``value`` in the root of the FileStorage at
    ``zodb_path``, if given); a participant sorted at ``killer_key``
    kills the process with SIGKILL in ``phase`` (``tpc_vote`` or
    ``tpc_finish``).  The test fails unless the process died so."""
    args = [table, value, zodb_path or "", killer_key, phase]
    for name, dsn in pools:
        args += [name, dsn]
    proc = subprocess.run([sys.executable, "-c", _CRASH, *args],
                          env=python_env(), timeout=timeout,
                          capture_output=True)
    testcase.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)


# -- what a two-phase vote sends (datamanager.py), spelled out ---------------------

#: The vote of a two-phase transaction whose statements only read: COMMIT,
#: unless the check finds it wrote.
READ_ONLY_VOTE = ("SAVEPOINT zpgpool_vote; SELECT 1 / "
                  "(txid_current_if_assigned() IS NULL)::int; COMMIT")


def prepared_after_the_check(gid):
    """The messages after READ_ONLY_VOTE when the check found a write."""
    return ["ROLLBACK TO SAVEPOINT zpgpool_vote; PREPARE TRANSACTION '%s'"
            % gid, "COMMIT PREPARED '%s'" % gid]
