"""Benchmark zpgpool against the pools its users would otherwise pick.

Usage::

    python benchmarks/run.py [--dsn DSN] [--quick] [--out FILE]

Without ``--dsn`` it starts a throwaway PostgreSQL server
(``zpgpool.testing.PostgresServer``) and removes it at the end.  It runs the
same workloads for every contender (see contenders.py), interleaved: at each
thread count all contenders are up at once, and each repetition runs one
short slice of each of them, in a rotated order, so that drift on a shared
machine hits them all alike.  Ratios to the raw floor measured in the same
repetition are the headline figures; absolute times are noise on a shared
machine.

Before the timed runs, a short counting pass runs each contender's
workloads on one thread against a database of that server whose sessions
log every statement (``log_statement = all``), and counts the messages the
server received per transaction: the "round trips" column.  Logging would
distort the timings, so only that pass logs.

The result is a Markdown report, written to ``--out`` and printed, followed
by the targets, each met or missed.  Nothing here asserts a timing: this is
a benchmark, not a test.
"""
import argparse
import bisect
import datetime
import gc
import itertools
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc

import psycopg2
import psycopg2.extensions
import transaction

import contenders as C


_clock = time.perf_counter
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

THREADS = (1, 4, 16, 64)
FLOOR = C.RawFloor.key
ZOPE_FLOOR = C.ZopeFloor.key
BUNDLED_FLOOR = C.ZopeFloorBundled.key
TWOPHASE_FLOOR = C.ZopeFloorBundledTwoPhase.key
WORKLOAD_TITLES = {
    "noop": "checkout + return, no SQL (pure pool overhead)",
    "select1": "checkout + SELECT 1 + commit + return",
    "readwrite": "checkout + INSERT ... RETURNING + SELECT + commit + return",
}
WORKLOAD_SHORT = {"noop": "no SQL", "select1": "SELECT 1",
                  "readwrite": "read-write"}

# The targets, as ratios to the raw floor measured in the same repetition.
# The Zope path sends one message fewer than the floor (BEGIN travels with
# the first statement), which is what lets it match the floor at one thread,
# where round trips dominate; with more threads than CPUs its Python counts.
TARGET_ZOPE_1PC = {1: 1.00, 4: 1.15, 16: 1.15, 64: 1.15}
TARGET_ZOPE_2PC = 1.40
# getconn + putconn, no SQL, one thread, over psycopg2's
# ThreadedConnectionPool measured in the same run.
TARGET_GETCONN = 1.00
RSS_SLACK = 1024 * 1024          # bytes of RSS growth still called "none"
TRACED_SLACK = 64 * 1024         # bytes of traced growth still called "none"


class Settings:
    """How long and how often; --quick shrinks everything."""

    def __init__(self, args):
        quick = args.quick
        self.quick = quick
        self.reps = args.reps or (4 if quick else 11)
        self.threads = tuple(args.threads or THREADS)
        self.warm = 0.03 if quick else 0.05
        self.duration = args.duration or (0.08 if quick else 0.4)
        self.micro_time = 0.03 if quick else 0.05
        self.ex_conns = 8
        self.ex_threads = 2 * self.ex_conns
        self.ex_hold = 0.005
        self.ex_warm = 0.2 if quick else 0.3
        self.ex_duration = 0.6 if quick else 2.0
        self.ex_reps = 2 if quick else 5
        self.mem_checkouts = 1_000_000
        self.mem_traced = 200_000 if quick else 1_000_000
        self.mem_zope = 50_000 if quick else 200_000
        # Transactions per workload and contender in the counting pass.
        self.count_n = 50 if quick else 200


LOADS = []


def log(start, message):
    """Say how far the run is, and sample the machine's load average."""
    LOADS.append(os.getloadavg()[0])
    sys.stderr.write("[%5.0fs] %s\n" % (time.monotonic() - start, message))
    sys.stderr.flush()


# -- the server ---------------------------------------------------------------

def start_server(n_contenders, max_threads):
    from zpgpool.testing import PostgresServer
    # Room for every contender's connections at the largest thread count at
    # once (they are all open together; see run_threads), with some to spare
    # for connect-per-request, whose closed backends take a moment to go;
    # and a prepared transaction per thread.
    settings = {
        "max_connections": max_threads * (n_contenders + 3) + 50,
        "max_prepared_transactions": max_threads * 2 + 20,
        "shared_buffers": "128MB",
    }
    server = PostgresServer(settings=settings)
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


def query(dsn, sql, params=None):
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None
    finally:
        conn.close()


# -- counting round trips ---------------------------------------------------

COUNT_DB = "zpgpool_bench_count"
# A statement as log_statement = all logs it, after zpgpool.testing's
# log_line_prefix ('%m [%p] %q%u@%d '): a simple-query message, whatever
# the number of statements in it, is one "statement:" line; an
# extended-protocol execution (psycopg 3) is one "execute <name>:" line.
# Either is one message the client sent and waited for: one round trip.
GID = re.compile(r"((?:TRANSACTION|PREPARED) )'[^']*'")
LOGGED_STATEMENT = re.compile(
    r"^\S+ \S+ \S+ \[(\d+)\] \S*@(\S+) LOG:  "
    r"(?:statement|execute [^:]*): (.*)$")


class RoundTrips:
    """The counting pass's results: messages per transaction, counted from
    the server's log.

    ``per_op[(workload, key)]`` is the number of statements the server
    logged over ``n`` operations on one thread, divided by ``n``;
    ``sample[(workload, key)]`` the statements of one more operation, as
    the server logged them; ``unavailable`` says why nothing was counted.
    """

    def __init__(self):
        self.per_op = {}
        self.sample = {}
        self.unavailable = None
        self.missing = "n/a"     # what a cell says when nothing was counted
        self.n = 0
        self.failed = {}         # key -> message

    def cell(self, workload, key):
        if self.unavailable:
            return self.missing
        value = self.per_op.get((workload, key))
        if value is None:
            return "-"
        return "%d" % value if value == int(value) else "%.2f" % value


def _log_size(path):
    return os.path.getsize(path)


def _logged(path, start, end, database):
    """The statements of ``database`` logged between two offsets."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8", "replace")
    found = []
    for line in text.splitlines():
        m = LOGGED_STATEMENT.match(line)
        if m and m.group(2) == database:
            found.append(m.group(3))
    return found


def count_round_trips(trips, active, server, s, t0):
    """Run each contender's workloads on one thread against a database
    whose sessions log every statement, and count them.

    The database has ``log_statement = all`` of its own (ALTER DATABASE),
    so the other databases of the server, and the timed runs, log nothing.
    Each contender runs a few operations first (connecting and the pools'
    first-use queries fall there), then ``s.count_n`` counted ones, then
    one more whose statements are kept as a sample.
    """
    trips.n = s.count_n
    admin = server.dsn()
    query(admin, "DROP DATABASE IF EXISTS %s" % COUNT_DB)
    query(admin, "CREATE DATABASE %s" % COUNT_DB)
    query(admin, "ALTER DATABASE %s SET log_statement = 'all'" % COUNT_DB)
    dsn = server.dsn(dbname=COUNT_DB)
    query(dsn, C.TABLE)
    log_file = server.log_file
    try:
        for cls in active:
            try:
                _count_one(trips, cls, dsn, log_file, s.count_n)
            except Exception as exc:
                msg = str(exc).strip().splitlines()[-1][:200] \
                    if str(exc).strip() else type(exc).__name__
                trips.failed[cls.key] = msg
                log(t0, "counting %s failed: %s" % (cls.key, msg))
    finally:
        query(admin, "DROP DATABASE IF EXISTS %s" % COUNT_DB)
    log(t0, "counted round trips: %s" % ", ".join(
        "%s %s" % (cls.key, trips.cell("select1", cls.key))
        for cls in active))


def _count_one(trips, cls, dsn, log_file, n):
    contender = cls(dsn)
    contender.setup(1)
    failures = []

    def work():
        # In a thread of its own, as in the timed runs, so that the
        # thread's end releases what the contender bound to it.
        try:
            ops = contender.thread_ops(0)
            for workload in cls.workloads:
                op = ops[workload]
                for _ in range(3):
                    op()
                start = _log_size(log_file)
                for _ in range(n):
                    op()
                middle = _log_size(log_file)
                op()
                end = _log_size(log_file)
                trips.per_op[workload, cls.key] = len(
                    _logged(log_file, start, middle, COUNT_DB)) / n
                trips.sample[workload, cls.key] = _logged(
                    log_file, middle, end, COUNT_DB)
        except BaseException:
            failures.append(traceback.format_exc())
        finally:
            try:
                contender.thread_done()
            except Exception:
                pass

    try:
        t = threading.Thread(target=work, daemon=True,
                             name="bench-count-%s" % cls.key)
        t.start()
        t.join(300)
    finally:
        contender.teardown()
    if failures:
        raise CellError(failures[0])


# -- the threaded workloads ---------------------------------------------------

class CellError(Exception):
    pass


_TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def _machine_cpu():
    """(busy, idle) CPU seconds of the whole machine since boot, from
    /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq [steal ...]
    t = [int(x) * _TICK for x in fields[1:8]]
    return t[0] + t[1] + t[2] + t[5] + t[6], t[3] + t[4]


class Usage:
    """What this process and the machine used between its creation and
    ``stop()``: the client side of a slice (this process runs only the
    slice's threads then; the others wait on a barrier) and, from the
    machine's counters, the rest (the server, the kernel's other work) and
    the idle time."""

    def __init__(self):
        self._self0 = resource.getrusage(resource.RUSAGE_SELF)
        self._machine0 = _machine_cpu()

    def stop(self):
        r0, r1 = self._self0, resource.getrusage(resource.RUSAGE_SELF)
        m0, m1 = self._machine0, _machine_cpu()
        self.user = r1.ru_utime - r0.ru_utime
        self.system = r1.ru_stime - r0.ru_stime
        self.waits = r1.ru_nvcsw - r0.ru_nvcsw
        self.preempted = r1.ru_nivcsw - r0.ru_nivcsw
        if m0 is None or m1 is None:
            self.rest = self.idle = None
        else:
            self.rest = (m1[0] - m0[0]) - self.user - self.system
            self.idle = m1[1] - m0[1]

    def per_op(self, ops):
        """{measure: value per operation}; CPU times in µs."""
        us = 1e6 / ops
        per = {"user": self.user * us, "system": self.system * us,
               "waits": self.waits / ops, "preempted": self.preempted / ops}
        if self.rest is not None:
            per["rest"] = self.rest * us
            per["idle"] = self.idle * us
        return per


class Crew:
    """A contender's worker threads, kept for a whole thread count.

    The threads are started once, make their per-thread state and run a few
    untimed operations (which opens lazily-opened connections and warms the
    server's caches); then each ``run()`` is one short slice: every thread
    runs the workload through a warm-up and a measuring window, and the
    operations completed inside the window are counted. The threads keep
    running until the window has closed, so the load is steady throughout.
    """

    TIMEOUT = 600

    def __init__(self, contender, threads):
        self.contender = contender
        self.threads = threads
        parties = threads + 1
        self.ready = threading.Barrier(parties)
        self.go = threading.Barrier(parties)
        self.done = threading.Barrier(parties)
        self.counts = [0] * threads
        self.failures = []
        self.plan = None
        self.end = float("inf")
        self.workers = [
            threading.Thread(target=self._work, args=(i,), daemon=True,
                             name="bench-%s-%d" % (contender.key, i))
            for i in range(threads)]
        for t in self.workers:
            t.start()
        self._wait(self.ready)

    def _wait(self, barrier):
        try:
            barrier.wait(self.TIMEOUT)
        except threading.BrokenBarrierError:
            self._abort()
            raise CellError(self.failures[0] if self.failures
                            else "timed out") from None

    def _abort(self):
        for b in (self.ready, self.go, self.done):
            b.abort()

    def _work(self, i):
        counts = self.counts
        try:
            ops = self.contender.thread_ops(i)
            for _ in range(3):
                ops["select1"]()
            self.ready.wait()
            while True:
                self.go.wait()
                plan = self.plan
                if plan is None:
                    break
                name, start = plan
                op = ops[name]
                n = 0
                while True:
                    op()
                    t = _clock()
                    if t >= start:
                        # self.end is read at each operation: the main
                        # thread sets it when the window closes.
                        if t >= self.end:
                            break
                        n += 1
                        counts[i] = n
                self.done.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException:
            self.failures.append(traceback.format_exc())
            self._abort()
        finally:
            try:
                self.contender.thread_done()
            except Exception:
                pass

    def run(self, workload, warm, duration):
        """One slice; return (operations completed in the window, window,
        the Usage of the window).

        The window lasts ``duration`` seconds, or longer until at least one
        operation per thread (and 20 in all) has completed in it, so that
        slow contenders are not measured on a handful of operations.
        """
        self.counts[:] = [0] * self.threads
        self.end = float("inf")
        start = _clock() + warm
        self.plan = (workload, start)
        self._wait(self.go)
        wanted = max(self.threads, 20)
        time.sleep(max(0.0, start - _clock()))
        used = Usage()
        time.sleep(max(0.0, start + duration - _clock()))
        while sum(self.counts) < wanted and \
                _clock() < start + 20 * duration:
            time.sleep(duration / 4)
        self.end = end = _clock()
        used.stop()
        self._wait(self.done)
        return sum(self.counts), end - start, used

    def stop(self):
        self.plan = None
        try:
            self.go.wait(30)
        except threading.BrokenBarrierError:
            pass
        for t in self.workers:
            t.join(30)


def run_exhaustion(contender, threads, hold, warm, duration, dsn):
    """Twice as many threads as connections, each holding one ``hold`` s.

    Throughput counts the operations completed inside the window. Waits
    count every checkout served inside the window and every one still
    waiting when it closed (with its whole wait: the threads run on until
    each has finished its operation, so a caller starved through the window
    is served, and counted, once the others stop).

    Returns a dict: completed, errors, kinds (error class names), waits
    (sorted seconds), overtaken (see ``overtaken``) and connections (the
    server's client connections just before the pool is closed).
    """
    arrivals = itertools.count()
    served = itertools.count()
    ready = threading.Barrier(threads + 1)
    plan = {}
    completed = [0] * threads
    records = [[] for _ in range(threads)]
    errors = [0] * threads
    kinds = set()
    failures = []

    def worker(i):
        try:
            op = contender.exhaust_op(i, hold, arrivals, served)
            ready.wait()
            start, end = plan["start"], plan["end"]
            mine = records[i]
            while True:
                try:
                    rec = op()
                except Exception as exc:
                    t = _clock()
                    if start <= t < end:
                        errors[i] += 1
                        kinds.add(type(exc).__name__)
                    if t >= end:
                        break
                    # A failed request still takes a while to answer.
                    time.sleep(hold)
                    continue
                t = _clock()
                served_at = rec[3]
                if start <= served_at < end or (
                        served_at >= end and served_at - rec[2] < end):
                    mine.append(rec)
                if t >= start:
                    if t >= end:
                        break
                    completed[i] += 1
        except threading.BrokenBarrierError:
            pass
        except BaseException:
            failures.append(traceback.format_exc())
            ready.abort()
        finally:
            try:
                contender.thread_done()
            except Exception:
                pass

    pool = [threading.Thread(target=worker, args=(i,), daemon=True)
            for i in range(threads)]
    for t in pool:
        t.start()
    try:
        now = _clock()
        plan["start"] = now + warm
        plan["end"] = now + warm + duration
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    for t in pool:
        t.join()
    if failures:
        raise CellError(failures[0])
    connections = query(dsn, CLIENT_CONNECTIONS)[0][0]
    recs = [r for mine in records for r in mine]
    share, worst = overtaken(recs)
    return dict(completed=sum(completed), errors=sum(errors),
                kinds=sorted(kinds), waits=sorted(r[2] for r in recs),
                overtaken=share, worst=worst, connections=connections)


CLIENT_CONNECTIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
    "'client backend' AND pid <> pg_backend_pid() AND datname = "
    "current_database()")


def overtaken(recs):
    """How far checkouts were served out of arrival order.

    Returns (share, worst): the share of checkouts that some later arrival
    was served before, and the largest number of later arrivals served
    before any one checkout. A pool that serves waiters first come, first
    served scores near 0 on both (scheduling jitter between taking the
    arrival ticket and reaching the pool's queue lets a few slip by); a
    pool that lets newcomers take a returned connection ahead of those
    waiting shows callers overtaken hundreds of times.
    """
    if not recs:
        return None, None
    later = []                    # service tickets of later arrivals, sorted
    n = worst = 0
    for arrival, service, _, _ in sorted(recs, reverse=True):
        ahead = bisect.bisect_left(later, service)
        if ahead:
            n += 1
            worst = max(worst, ahead)
        bisect.insort(later, service)
    return n / len(recs), worst


# -- micro benchmarks ---------------------------------------------------------

def looped(op):
    def loop(n):
        start = _clock()
        for _ in range(n):
            op()
        return _clock() - start
    return loop


def timed(loop, n):
    """Seconds per call of ``loop(n)``, with the cyclic GC off (as timeit)."""
    gc.collect()
    gc.disable()
    try:
        return loop(n) / n
    finally:
        gc.enable()


def calibrate(loop, target):
    n = 100
    while True:
        t = timed(loop, n) * n
        if t >= target / 4 or n >= 10_000_000:
            return max(100, int(n * target / max(t, 1e-9)))
        n *= 4


def micro_loops(active, dsn):
    """{label: (loop, contender)} for the single-thread benchmarks."""
    loops = {}
    opened = []
    tm = transaction.manager

    def empty():
        pass

    def txn_alone():
        with tm:
            pass

    loops["harness: an empty call (loop cost)"] = (looped(empty), None)
    loops["transaction.manager alone: `with transaction.manager: pass`"] = (
        looped(txn_alone), None)
    for cls in active:
        if not cls.micro:
            continue
        contender = cls(dsn)
        contender.setup(2)
        opened.append(contender)
        op = contender.thread_ops(0)["noop"]
        op()
        label = cls.label
        if cls.zope:
            label += ": one transaction, no SQL"
        else:
            label += ": checkout + return"
        loops[label] = (looped(op), cls)
        if hasattr(contender, "repeat_ops"):
            for name, loop in contender.repeat_ops().items():
                loops["repeated in one transaction: " + name] = (loop, cls)
    return loops, opened


# -- memory -------------------------------------------------------------------

def rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_run(label, op, n_rss, n_traced):
    """RSS before and after ``n_rss`` calls, then traced memory before and
    after ``n_traced`` calls (tracemalloc slows every allocation, so the RSS
    run is without it)."""
    for _ in range(10_000):
        op()
    gc.collect()
    rss0 = rss()
    for _ in range(n_rss):
        op()
    gc.collect()
    rss1 = rss()
    tracemalloc.start(1)
    for _ in range(1_000):
        op()
    gc.collect()
    snap0 = tracemalloc.take_snapshot()
    traced0 = tracemalloc.get_traced_memory()[0]
    for _ in range(n_traced):
        op()
    gc.collect()
    traced1 = tracemalloc.get_traced_memory()[0]
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    top = []
    if traced1 - traced0 > TRACED_SLACK:
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = snap1.filter_traces(filters).compare_to(
            snap0.filter_traces(filters), "lineno")
        top = [str(d) for d in diff[:5]]
    return dict(label=label, n_rss=n_rss, rss0=rss0, rss1=rss1,
                n_traced=n_traced, traced0=traced0, traced1=traced1, top=top)


# -- reporting ----------------------------------------------------------------

def med(values):
    return statistics.median(values)


def iqr(values):
    """The first and third quartiles."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def fmt_us(values):
    if not values:
        return "-"
    m = med(values)
    if len(values) == 1:
        return _num(m)
    q1, q3 = iqr(values)
    return "%s (%s–%s)" % (_num(m), _num(q1), _num(q3))


def fmt_ratio(values):
    if not values:
        return "-"
    m = med(values)
    if len(values) == 1:
        return "%.2f×" % m
    q1, q3 = iqr(values)
    return "%.2f× (%.2f–%.2f)" % (m, q1, q3)


def _num(x):
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    if x >= 1:
        return "%.2f" % x
    return "%.3f" % x


def plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def mib(b):
    return "%.1f MiB" % (b / 1048576)


def kib(b):
    return "%+.1f KiB" % (b / 1024)


def machine_info(dsn, server, active):
    info = []
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "?"
    info.append(("CPU", "%s; os.cpu_count() = %s" % (cpu, os.cpu_count())))
    info.append(("OS", platform.platform()))
    info.append(("Python", "%s (%s)" % (platform.python_version(),
                                        platform.python_implementation())))
    lv = psycopg2.extensions.libpq_version()
    info.append(("psycopg2", "%s, libpq %d.%d" % (
        psycopg2.__version__.split()[0], lv // 10000, lv % 10000)))
    try:
        import psycopg
        pv = psycopg.pq.version()
        info.append(("psycopg 3", "%s (%s), libpq %d.%d" % (
            psycopg.__version__, psycopg.pq.__impl__, pv // 10000,
            pv % 10000)))
    except ImportError:
        pass
    rows = query(dsn, "SELECT current_setting('server_version'), "
                      "current_setting('max_connections'), "
                      "current_setting('max_prepared_transactions'), "
                      "current_setting('fsync'), "
                      "current_setting('synchronous_commit')")
    ver, maxc, maxp, fsync, sync = rows[0]
    where = ("a throwaway server started by the benchmark on 127.0.0.1 "
             "(TCP, scram-sha-256), same machine" if server else
             "given with --dsn")
    info.append(("PostgreSQL server", "%s; %s; max_connections=%s, "
                 "max_prepared_transactions=%s, fsync=%s, "
                 "synchronous_commit=%s" % (ver, where, maxc, maxp, fsync,
                                            sync)))
    seen = []
    for cls in active:
        for p in cls.packages:
            if p not in seen:
                seen.append(p)
    for p in ("transaction", "zope.component"):
        if p not in seen:
            seen.append(p)
    info.append(("Packages", ", ".join(
        "%s %s" % (p, C.version(p)) for p in seen)))
    info.append(("zpgpool source", git_describe()))
    return info


def git_describe():
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    if not head:
        return "?"
    return "git %s%s" % (head, " + uncommitted changes in src/"
                         if dirty else "")


def _own_floor(key):
    """The floor of zpgpool's Zope path ``key``: the same design without a
    pool (the two-phase one for the two-phase path)."""
    return TWOPHASE_FLOOR if key.endswith("2pc") else BUNDLED_FLOOR


class Report:
    def __init__(self, settings, active):
        self.s = settings
        self.active = active
        # (workload, threads, key) -> [µs per op, one per repetition]
        self.times = {}
        # (workload, threads, key) -> [ratio to the floor of the same rep]
        self.ratios = {}
        # (workload, threads, key) -> [Usage.per_op(), one per repetition]
        self.usage = {}
        self.failed = {}          # (key, threads) -> message
        self.micro = {}           # label -> [µs]
        self.micro_keys = {}      # label -> contender key or None
        self.micro_pinned = ""    # where the micro loops ran (affinity.py)
        self.exhaust = {}         # key -> list of dicts, one per rep
        self.memory = []
        self.info = []
        self.skipped = []         # (label, why)
        self.trips = RoundTrips()
        self.note = ""            # --note, said at the top of the report
        self.profile = None       # profile_hotpath.py's tables, as text

    def add_cell(self, rep_results, threads):
        floor = rep_results.get(FLOOR, {})
        for key, res in rep_results.items():
            for workload, (ops, window, used) in res.items():
                us = window / ops * 1e6 if ops else float("inf")
                self.times.setdefault((workload, threads, key), []).append(us)
                if ops:
                    self.usage.setdefault((workload, threads, key),
                                          []).append(used.per_op(ops))
                if workload in floor and floor[workload][0]:
                    fops, fwin = floor[workload][:2]
                    ratio = us / (fwin / fops * 1e6)
                    self.ratios.setdefault((workload, threads, key),
                                           []).append(ratio)

    # -- text --

    def markdown(self, command, took, load0, load1):
        s = self.s
        out = []
        w = out.append
        w("# zpgpool benchmark results")
        w("")
        w("Produced by `%s` on %s in %s%s." % (
            command, datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "%.0f s" % took if took < 120 else "%.0f minutes" % (took / 60),
            " (quick mode: fewer and shorter repetitions; "
            "indicative only)" if s.quick else ""))
        w("")
        loads = LOADS + [load0, load1]
        note = self.note.strip()
        if note and not note.endswith((".", "!", "?")):
            note += "."     # a sentence of the paragraph below
        w("**Read the ratios, not the times.** The clients and the "
          "PostgreSQL server share this machine's %s CPUs (1-minute load "
          "average between %.1f and %.1f, sampled through the run).%s "
          "Each ratio compares a contender with the raw floor measured "
          "seconds apart, in the same repetition, and the medians are over "
          "many repetitions, so drift on the machine hits both sides of a "
          "ratio alike; absolute times move with the load."
          % (os.cpu_count(), min(loads), max(loads),
             " " + note if note else ""))
        w("")
        w("## Machine and versions")
        w("")
        w("| | |")
        w("|---|---|")
        for k, v in self.info:
            w("| %s | %s |" % (k, v))
        w("")
        w("## Method")
        w("")
        w("- For each thread count, every contender is set up at once: its "
          "pool, with exactly as many connections as threads (minimum = "
          "maximum where the pool has a minimum), and its threads, which "
          "each run 3 untimed operations first. Then %d repetitions: each "
          "runs, for each workload, one slice per contender, in an order "
          "rotated from one repetition to the next (round-robin), so that "
          "drift on the machine hits all contenders alike and a contender "
          "is measured seconds from the floor. A slice is %.2f s of warm-up "
          "and a %.2f s window on all threads (longer if needed for at "
          "least one operation per thread to complete in it); the "
          "operations completed in the window count, and the time per "
          "operation is the window "
          "divided by that count (inverse throughput; at 1 thread it is the "
          "latency). Cells show the median over the repetitions and, in "
          "brackets, the interquartile range (the middle half of the "
          "repetitions: on a machine this loaded the extremes say more "
          "about the neighbours than about the pools)." % (s.reps, s.warm,
                                                 s.duration))
        w("- The ratio is a contender's time per operation divided by the "
          "raw floor's (one persistent psycopg2 connection per thread, "
          "`conn.commit()`) in the same repetition; the spread is over the "
          "repetitions' ratios.")
        cpus = os.cpu_count() or 1
        if max(s.threads) > cpus:
            w("- The clients and the server share %d CPUs, so the runs with "
              "more threads than that are CPU-bound: their time per "
              "operation is the CPU time one transaction takes (Python in "
              "the client, the server's work), and every microsecond of "
              "Python a contender adds counts in full, or more: the "
              "threads also queue for the GIL (see \"What a microsecond "
              "of Python costs\" below). At one thread the round trips' "
              "latency dominates instead." % cpus)
        w("- Same DSN for all; health checks at their defaults (see the "
          "notes: only SQLAlchemy with pool_pre_ping pings on every "
          "checkout). Where psycopg2's autocommit is off (the floor, the "
          "other pools, SQLAlchemy), psycopg2 sends BEGIN, the statement "
          "and COMMIT: three round trips for SELECT 1. zpgpool's Zope path "
          "and the bundled floor run the connection in autocommit mode and "
          "send `BEGIN ...; SELECT 1` as one message, then COMMIT: two.")
        w("- *Round trips per transaction* are counted by the server, not "
          "computed: %s" % self._trips_method())
        w("")
        w("## Headline: cost relative to the raw floor")
        for workload in ("select1", "readwrite"):
            w("")
            w("### %s" % WORKLOAD_TITLES[workload])
            w("")
            self._table(out, workload, self.ratios, fmt_ratio,
                        skip=(FLOOR,), trips=True)
            w("")
            w("The raw floor itself: %s round trips per transaction." %
              self.trips.cell(workload, FLOOR))
        w("")
        w("## Round trips per transaction")
        w("")
        self._trips_section(out)
        w("")
        w("## Time per operation, µs (inverse throughput)")
        for workload in C.WORKLOADS:
            w("")
            w("### %s" % WORKLOAD_TITLES[workload])
            w("")
            self._table(out, workload, self.times, fmt_us, trips=True)
        self._usage_section(out)
        w("")
        w("## Single thread, µs per operation")
        w("")
        w("One thread, no other load from the benchmark, the cyclic garbage "
          "collector off during each loop (as timeit does); pools of 2 "
          "connections; each loop runs about %.2f s, %d repetitions "
          "interleaved like the slices above; %s (none of these loops "
          "sends a statement: on a VM, a thread the scheduler moves "
          "between CPUs makes differences between contenders that "
          "neither of them made; benchmarks/affinity.py). Rows that say "
          "*one transaction* include the "
          "`transaction` package's begin and commit, shown alone as a "
          "reference row." % (s.micro_time, s.reps,
                              self.micro_pinned or "not pinned"))
        w("")
        w("| operation | µs per op, median (interquartile range) |")
        w("|---|---|")
        for label, values in self.micro.items():
            w("| %s | %s |" % (label, fmt_us(values)))
        for paragraph in (self._budget(), self._python_cost()):
            if paragraph:
                w("")
                w(paragraph)
        w("")
        w("## Exhaustion: %d threads, %d connections" % (s.ex_threads,
                                                         s.ex_conns))
        w("")
        w("Each operation takes a connection, runs SELECT 1, holds it for "
          "%.0f ms (sleeping, as a request doing other work would), commits "
          "and returns it; %.1f s window after %.1f s warm-up, %d "
          "repetitions. Waiting callers give up after 30 s. A pool that "
          "raises when exhausted counts an error, and that thread sleeps "
          "%.0f ms before its next try. *ops/s* counts operations "
          "completed in the window. *Wait* is the time to get the "
          "connection, for every checkout served in the window and every "
          "one still waiting when it closed (counted with its whole wait, "
          "so a starved caller shows). *Overtaken* is the share of those "
          "checkouts served after a later arrival, *worst overtaking* the "
          "most later arrivals served before any one checkout: both near 0 "
          "for a first-come-first-served pool, give or take the scheduling "
          "jitter between taking a ticket and reaching the pool, and "
          "hundreds for a pool that lets newcomers take a returned "
          "connection ahead of those waiting. *Connections* is "
          "the most the server saw open at the end of a repetition: more "
          "than %d means the pool went past its maximum. Medians over the "
          "repetitions; percentiles over all checkouts of a repetition." % (
              s.ex_hold * 1000, s.ex_duration, s.ex_warm, s.ex_reps,
              s.ex_hold * 1000, s.ex_conns))
        w("")
        w("| contender | ops/s | errors | p50 wait, ms | p99 wait, ms | "
          "max wait, ms | overtaken | worst overtaking | connections |")
        w("|---|---|---|---|---|---|---|---|---|")
        for key, reps in self.exhaust.items():
            w("| %s | %s |" % (C.BY_KEY[key].label, " | ".join(
                self._exhaust_cells(reps))))
        w("")
        w("## Memory")
        w("")
        w("| run | RSS before → after | traced (tracemalloc) before → "
          "after |")
        w("|---|---|---|")
        for m in self.memory:
            w("| %s | %s → %s (%s over %s) | %s → %s (%s over %s) |" % (
                m["label"], mib(m["rss0"]), mib(m["rss1"]),
                kib(m["rss1"] - m["rss0"]), "{:,}".format(m["n_rss"]),
                kib(m["traced0"]).lstrip("+"), kib(m["traced1"]).lstrip("+"),
                kib(m["traced1"] - m["traced0"]),
                "{:,}".format(m["n_traced"])))
        for m in self.memory:
            if m["top"]:
                w("")
                w("Largest traced growth in %s:" % m["label"])
                w("")
                w("```")
                out.extend(m["top"])
                w("```")
        w("")
        w("## Targets")
        w("")
        targets = self.targets()
        for line in targets:
            w("- " + line)
        if any(line.startswith("**MISSED**") for line in targets):
            w("")
            w("Where the time of a missed target goes: \"Where a SELECT 1 "
              "transaction's time goes\" above (the client's CPU time, the "
              "server's, idle CPUs and waits, at each thread count)%s." % (
                  " and the profile below (zpgpool's own calls, on one "
                  "thread)" if self.profile else ""))
        w("")
        if self.profile:
            w("## Profile: where zpgpool's time goes")
            w("")
            w("The tables of `benchmarks/profile_hotpath.py`, run against "
              "the same server right after the measurements above: each "
              "step of one transaction for raw psycopg2, the bundled floor "
              "and zpgpool side by side (one thread), zpgpool's own calls "
              "inside them, and getconn/putconn beside psycopg2's "
              "ThreadedConnectionPool. They say which part of a missed "
              "target is zpgpool's Python and which is the round trips. "
              "Unlike the slices above, they run with this process and the "
              "server pinned to one CPU when the server is the benchmark's "
              "own (first line below; benchmarks/affinity.py): every path's "
              "round trips then cost the same, and less than unpinned, "
              "where the server may answer from the other CPU.")
            w("")
            w("```")
            out.extend(self.profile.rstrip().splitlines())
            w("```")
            w("")
        w("## Other checks")
        w("")
        for line in self.checks():
            w("- " + line)
        w("")
        w("## Notes on the contenders")
        w("")
        for cls in self.active:
            w("- **%s** (%s): %s" % (cls.label, cls.versions(), cls.note))
        for label, why in self.skipped:
            w("- **%s** was skipped: %s" % (label, why))
        for (key, threads), msg in sorted(self.failed.items()):
            w("- **%s** failed at %d threads: `%s`" % (
                C.BY_KEY[key].label, threads, msg))
        w("")
        return "\n".join(out)

    def _table(self, out, workload, data, fmt, skip=(), trips=False):
        threads = self.s.threads
        out.append("| contender | %s |%s" % (" | ".join(
            "%d thread%s" % (t, "" if t == 1 else "s") for t in threads),
            " round trips per transaction |" if trips else ""))
        out.append("|---|%s" % ("---|" * (len(threads) + bool(trips))))
        for cls in self.active:
            if cls.key in skip or workload not in cls.workloads:
                continue
            cells = [fmt(data.get((workload, t, cls.key), []))
                     for t in threads]
            if all(c == "-" for c in cells):
                continue
            if trips:
                cells.append(self.trips.cell(workload, cls.key))
            out.append("| %s | %s |" % (self._label(cls), " | ".join(cells)))

    def _usage_section(self, out):
        """The CPU time and waits behind each SELECT 1 transaction."""
        w = out.append
        if not any(k[0] == "select1" for k in self.usage):
            return
        machine = any("rest" in u for v in self.usage.values() for u in v)
        w("")
        w("## Where a SELECT 1 transaction's time goes")
        w("")
        w("Measured in the same slices as the times above, and divided by "
          "the transactions completed in each window (medians over the "
          "repetitions): *client* is the CPU time of the benchmark process "
          "(getrusage), in user mode (Python, libpq) and in the kernel "
          "(sockets, waking and waiting); during a slice only that "
          "contender's threads run in it, the others wait on a barrier. "
          "*Waits* are the client's voluntary context switches: a thread "
          "blocked, on the server's answer, on the GIL or on a lock. On one "
          "thread a round trip is about one wait; with several threads a "
          "reply may be there before its thread blocks, and a thread that "
          "finds the GIL taken blocks once more.%s" % (
              " *Rest* is the machine's other busy CPU time (/proc/stat): "
              "the server's backends and the kernel's work for them; *idle* "
              "the CPU time nobody used."
              if machine else " (The machine's counters, /proc/stat, are "
              "not readable here: no *rest* and *idle* columns.)"))
        columns = [("time", _num), ("user", _num), ("system", _num)]
        if machine:
            columns += [("rest", _num), ("idle", _num)]
        columns += [("waits", "%.2f".__mod__), ("preempted", "%.2f".__mod__)]
        for t in self.s.threads:
            rows = []
            for cls in self.active:
                used = self.usage.get(("select1", t, cls.key))
                if not used:
                    continue
                cells = []
                for name, f in columns:
                    if name == "time":
                        value = med(self.times[("select1", t, cls.key)])
                    else:
                        value = med([u[name] for u in used if name in u])
                    cells.append(f(value))
                rows.append("| %s | %s |" % (self._label(cls),
                                             " | ".join(cells)))
            if not rows:
                continue
            w("")
            w("### %s" % plural(t, "thread"))
            w("")
            w("| contender | time per transaction, µs | client user, µs | "
              "client system, µs |%s waits | preempted |" % (
                  " rest, µs | idle, µs |" if machine else ""))
            w("|---|%s" % ("---|" * len(columns)))
            out.extend(rows)
        paragraph = self._usage_compared()
        if paragraph:
            w("")
            w(paragraph)

    def _usage_compared(self):
        """zpgpool's Zope path against the raw bundled reference (the same
        round trips), in words."""
        base, ours = C.RawBundled, C.ZpgpoolZope
        cpus = os.cpu_count() or 1
        parts = []
        for t in self.s.threads:
            def more(measure=None):
                return self._paired_diff("select1", t, ours.key, base.key,
                                         measure)

            if more("user") is None:
                continue
            said = "%s: %+.0f µs of time per transaction, %+.0f µs of client " \
                "user time, %+.0f µs of client system time" % (
                    plural(t, "thread"), more(), more("user"), more("system"))
            if more("rest") is not None:
                said += ", %+.0f µs of the rest, %+.0f µs of idle CPU " \
                    "time" % (more("rest"), more("idle"))
            parts.append(said + ", %+.2f waits" % more("waits"))
        if not parts:
            return ""
        return ("**zpgpool's Zope path against the raw bundled reference** "
                "(\"%s\": the same round trips, no `transaction` package, "
                "no pool), per SELECT 1 transaction, medians of the "
                "repetitions' differences: %s. The machine's "
                "%d CPUs give %d µs of CPU time per µs of time per "
                "transaction, so the columns add up, give or take the time "
                "the hypervisor took: time per transaction × %d = client "
                "user + client system + rest + idle time. zpgpool's extra "
                "time is thus either CPU that one side used, or CPUs left "
                "idle while threads waited on each other (for the GIL, or "
                "for an answer)." % (base.label, "; ".join(parts), cpus,
                                     cpus, cpus))

    @staticmethod
    def _label(cls):
        if cls.key in ("zpgpool", "zpgpool-zope", "zpgpool-zope-2pc"):
            return "**%s**" % cls.label
        if cls.key in (ZOPE_FLOOR, BUNDLED_FLOOR, TWOPHASE_FLOOR):
            return "*%s*" % cls.label
        return cls.label

    def _trips_method(self):
        t = self.trips
        if t.unavailable:
            return "not counted in this run: %s." % t.unavailable
        return (
            "before the timed runs, each contender ran its workloads on one "
            "thread against a database of the same server whose sessions "
            "log every statement (`ALTER DATABASE ... SET log_statement = "
            "all`; nothing else logs, and the timed runs do not), %d "
            "counted transactions per workload after 3 uncounted ones; the "
            "statements the server logged for that database, divided by "
            "%d. A simple-query message is logged as one line however many "
            "statements it holds, and an extended-protocol execution "
            "(psycopg 3) as one, so the count is of messages the client "
            "sent and waited for: round trips. Connecting is not counted "
            "(it happens before)." % (t.n, t.n))

    def _trips_section(self, out):
        t = self.trips
        if t.unavailable:
            out.append("Not counted: %s." % t.unavailable)
            return
        out.append("Messages the server received per transaction (counted "
                   "from its log, see Method), and what it received for one "
                   "SELECT 1 transaction.")
        out.append("")
        out.append("| contender | %s | one SELECT 1 transaction, as the "
                   "server logged it |" % " | ".join(C.WORKLOADS))
        out.append("|---|%s---|" % ("---|" * len(C.WORKLOADS)))
        for cls in self.active:
            if cls.key in t.failed:
                out.append("| %s | %s | failed: `%s` |" % (
                    self._label(cls), " | ".join("-" for _ in C.WORKLOADS),
                    t.failed[cls.key]))
                continue
            # The two-phase transaction ids are long and say nothing here.
            sample = [GID.sub(r"\1'<gid>'", q)
                      for q in t.sample.get(("select1", cls.key), [])]
            shown = " → ".join("`%s`" % (q if len(q) <= 70 else
                                         q[:67] + "...").replace("|", "\\|")
                               for q in sample)
            out.append("| %s | %s | %s |" % (
                self._label(cls), " | ".join(
                    t.cell(w, cls.key) if w in cls.workloads else "-"
                    for w in C.WORKLOADS), shown or "-"))

    def _exhaust_cells(self, reps):
        def m(name, scale=1.0, f="%.2f"):
            vals = [r[name] for r in reps if r[name] is not None]
            return f % (med(vals) * scale) if vals else "-"
        errors = [r["errors"] for r in reps]
        kinds = sorted({k for r in reps for k in r["kinds"]})
        err = "%d" % max(errors) if errors else "-"
        if kinds:
            err += " (%s)" % ", ".join(kinds)
        if len(errors) > 1 and max(errors):
            err = "%d–%s" % (min(errors), err)
        conns = [r["connections"] for r in reps]
        return [m("throughput", f="%.0f"), err, m("p50", 1000),
                m("p99", 1000), m("max", 1000),
                m("overtaken", 100, "%.1f %%"), m("worst", f="%.0f"),
                "%d" % max(conns) if conns else "-"]

    # -- targets --

    def targets(self):
        """The targets, each met or missed, in words."""
        lines = []

        def ratio(workload, t, key):
            vals = self.ratios.get((workload, t, key))
            return med(vals) if vals else None

        def at(workload, key):
            return [(t, ratio(workload, t, key)) for t in self.s.threads
                    if ratio(workload, t, key) is not None]

        def listed(got):
            return ", ".join("%d: %.2f×" % g for g in got)

        def context(workload, t_keys):
            parts = []
            for key in t_keys:
                got = at(workload, key)
                if got:
                    parts.append("%s: %s" % (C.BY_KEY[key].label,
                                             listed(got)))
            return ("; for comparison, " + "; ".join(parts)) if parts else ""

        for key, name in (("zpgpool-zope", "Zope path, one-phase"),
                          ("zpgpool-zope-2pc", "Zope path, two-phase")):
            twophase = key.endswith("2pc")
            for workload in ("select1", "readwrite"):
                got = at(workload, key)
                if twophase:
                    bound = {t: TARGET_ZOPE_2PC for t in self.s.threads}
                    wanted = ("≤ %.2f× the raw one-phase floor at every "
                              "thread count" % TARGET_ZOPE_2PC)
                else:
                    bound = TARGET_ZOPE_1PC
                    groups = {}     # bound -> thread counts, in order
                    for t in self.s.threads:
                        if t in bound:
                            groups.setdefault(bound[t], []).append(t)
                    wanted = "≤ " + ", ≤ ".join(
                        "%.2f×%s at %s %s" % (
                            b, " the raw floor" if i == 0 else "",
                            ", ".join(map(str, ts)),
                            "thread" if ts == [1] else "threads")
                        for i, (b, ts) in enumerate(groups.items()))
                title = "%s, %s, %s" % (name, WORKLOAD_SHORT[workload],
                                        wanted)
                if not got:
                    lines.append("**not measured**: %s" % title)
                    continue
                missed = [(t, r) for t, r in got
                          if r > bound.get(t, float("inf"))]
                if missed:
                    head = "**MISSED** at %s %s" % (
                        ", ".join(str(t) for t, _ in missed),
                        "thread" if [t for t, _ in missed] == [1]
                        else "threads")
                else:
                    head = "**met**"
                refs = ((TWOPHASE_FLOOR, BUNDLED_FLOOR, "raw-2pc",
                         "zope.sqlalchemy-2pc")
                        if twophase else
                        (BUNDLED_FLOOR, ZOPE_FLOOR, "zope.sqlalchemy"))
                lines.append("%s: %s: %s%s%s%s" % (
                    head, title, listed(got),
                    self._distance(workload, key),
                    self._floor_above(workload, key, missed, bound),
                    context(workload, refs)))
        lines.extend(self._getconn_target())
        return lines

    def _distance(self, workload, key):
        """zpgpool's Zope path over its own floor (the two-phase one for
        the two-phase path), paired by repetition."""
        floor = _own_floor(key)
        own = []
        for t in self.s.threads:
            mine = self.times.get((workload, t, key), [])
            base = self.times.get((workload, t, floor), [])
            pairs = [a / b for a, b in zip(mine, base) if b]
            if pairs:
                own.append((t, med(pairs)))
        if not own:
            return ""
        return "; over its own floor (%s): %s" % (
            C.BY_KEY[floor].label,
            ", ".join("%d: %.2f×" % g for g in own))

    def _floor_above(self, workload, key, missed, bound):
        """Where a missed bound is below the ratio of zpgpool's own floor
        (the design without a pool) in the same run, say so: no data
        manager on the `transaction` package met it on this machine."""
        floor = _own_floor(key)
        above = []
        for t, _ in missed:
            vals = self.ratios.get((workload, t, floor))
            if vals and med(vals) > bound[t]:
                above.append((t, med(vals)))
        if not above:
            return ""
        return ("; its own floor (%s) is itself above the bound at %s "
                "%s (%s): there the bound is below what the design "
                "itself costs on this machine, pool or no pool" % (
                    C.BY_KEY[floor].label,
                    ", ".join(str(t) for t, _ in above),
                    "thread" if [t for t, _ in above] == [1] else "threads",
                    ", ".join("%d: %.2f×" % g for g in above)))

    def _getconn_target(self):
        title = ("zpgpool getconn + putconn, no SQL, one thread, ≤ %.2f× "
                 "psycopg2's ThreadedConnectionPool in the same run"
                 % TARGET_GETCONN)
        slices = [a / b for a, b in zip(
            self.times.get(("noop", 1, "zpgpool"), []),
            self.times.get(("noop", 1, "psycopg2"), [])) if b]
        slice_text = ("; in the 1-thread slices: %.2f× (interquartile "
                      "range %.2f–%.2f)" % ((med(slices),) + iqr(slices))
                      if slices else "")
        try:
            paired = self._micro_paired("zpgpool", "psycopg2")
        except KeyError:
            paired = []
        if paired:
            r = med(paired)
            q1, q3 = iqr(paired)
            return ["%s: %s: %.2f× (single-thread loops, median of the "
                    "repetitions' ratios, interquartile range %.2f–%.2f; "
                    "%.2f µs vs %.2f µs)%s" % (
                        "**met**" if r <= TARGET_GETCONN else "**MISSED**",
                        title, r, q1, q3, self._micro_value("zpgpool"),
                        self._micro_value("psycopg2"), slice_text)]
        if slices:
            r = med(slices)
            return ["%s: %s: %.2f× in the 1-thread slices (the "
                    "single-thread loops did not run)" % (
                        "**met**" if r <= TARGET_GETCONN else "**MISSED**",
                        title, r)]
        return ["**not measured**: %s" % title]

    def checks(self):
        """Behaviour under exhaustion and memory, each met or missed."""
        lines = []

        def verdict(ok):
            return "**met**" if ok else "**MISSED**"
        for key in ("zpgpool", "zpgpool-zope"):
            reps = self.exhaust.get(key)
            if not reps:
                continue
            errors = max(r["errors"] for r in reps)
            tput = med([r["throughput"] for r in reps])
            other = "sqlalchemy" if key == "zpgpool" else "zope.sqlalchemy"
            oreps = self.exhaust.get(other)
            label = C.BY_KEY[key].label
            lines.append("%s: exhaustion, %s: zero errors (%d)" % (
                verdict(errors == 0), label, errors))
            if oreps:
                # Paired by repetition: the two ran seconds apart.
                otput = med([r["throughput"] for r in oreps])
                paired = [a["throughput"] / b["throughput"]
                          for a, b in zip(reps, oreps) if b["throughput"]]
                pr = med(paired)
                q1, q3 = iqr(paired)
                lines.append("%s: exhaustion, %s: throughput ≥ %s's: %.0f "
                             "vs %.0f ops/s; median of the repetitions' "
                             "ratios %.2f× (interquartile range %.2f–%.2f)"
                             % (verdict(pr >= 1.0), label,
                                C.BY_KEY[other].label, tput, otput, pr, q1,
                                q3))
            worst = [r["worst"] for r in reps if r["worst"] is not None]
            if worst:
                # Scheduling jitter between the ticket and the pool's queue
                # lets a few arrivals slip ahead; a pool that lets newcomers
                # barge in lets hundreds.
                o = max(worst)
                lines.append("%s: exhaustion, %s: waiters served in arrival "
                             "order: at most %d later arrivals served before "
                             "any one checkout in any repetition (counted as "
                             "met up to the %d threads: one round of "
                             "scheduling jitter)" % (
                                 verdict(o <= self.s.ex_threads), label, o,
                                 self.s.ex_threads))
        for m in self.memory:
            grow_rss = m["rss1"] - m["rss0"]
            grow_traced = m["traced1"] - m["traced0"]
            lines.append("%s: no memory growth, %s: RSS %s over %s, traced "
                         "%s over %s (called growth above %s RSS or %s "
                         "traced)" % (
                             verdict(grow_rss <= RSS_SLACK
                                     and grow_traced <= TRACED_SLACK),
                             m["label"], kib(grow_rss),
                             "{:,}".format(m["n_rss"]), kib(grow_traced),
                             "{:,}".format(m["n_traced"]),
                             mib(RSS_SLACK), kib(TRACED_SLACK)))
        return lines

    def _budget(self):
        """Where the Zope path's time goes at one thread, in words."""
        def diff(a, b):
            return self._paired_diff("select1", 1, a, b)

        floor = self.times.get(("select1", 1, FLOOR))
        if not floor:
            return ""
        trips = self.trips
        parts = ["**Where the Zope path's time goes (one thread, SELECT "
                 "1).** The raw floor took %.0f µs per transaction in the "
                 "slices above (%s round trips)." % (
                     med(floor), trips.cell("select1", FLOOR))]
        d_txn = diff(ZOPE_FLOOR, FLOOR)
        d_bundle = diff(BUNDLED_FLOOR, ZOPE_FLOOR)
        d_own = diff("zpgpool-zope", BUNDLED_FLOOR)
        if d_txn is not None:
            parts.append("The `transaction` package with a minimal data "
                         "manager added %+.0f µs to it (same round trips)."
                         % d_txn)
        if d_bundle is not None:
            parts.append("Sending BEGIN with the first statement (%s round "
                         "trips instead of %s) changed that by %+.0f µs." % (
                             trips.cell("select1", BUNDLED_FLOOR),
                             trips.cell("select1", ZOPE_FLOOR), d_bundle))
        if d_own is not None:
            parts.append("zpgpool's Zope path added %+.0f µs to that "
                         "bundled floor: zpgpool's own share." % d_own)
        parts.append("(Medians of the per-repetition differences; at one "
                     "thread they are as noisy as the round trips they "
                     "sit beside.)")
        micro = self._micro_median
        txn = micro("transaction.manager alone")
        floor_loop = micro(C.ZopeFloorBundled.label + ":")
        zope_loop = micro(C.ZpgpoolZope.label + ":")
        if None not in (txn, floor_loop, zope_loop):
            parts.append(
                "In the single-thread loops, with no SQL, an empty "
                "transaction costs %.1f µs, one that joins the bundled "
                "floor's data manager %.1f µs, and one that takes zpgpool's "
                "connection (getUtility, `connection()`, the data manager, "
                "unparking and parking) %.1f µs: %.1f µs of Python per "
                "transaction are zpgpool's. `benchmarks/profile_hotpath.py` "
                "splits that time by call." % (
                    txn, floor_loop, zope_loop, zope_loop - floor_loop))
        return " ".join(parts)

    def _paired_diff(self, workload, threads, a, b, measure=None):
        """The median over the repetitions of contender ``a``'s time per
        operation (or, given, its ``measure`` of Usage.per_op()) minus
        ``b``'s in the same repetition, or None."""
        if measure is None:
            xs = self.times.get((workload, threads, a), [])
            ys = self.times.get((workload, threads, b), [])
        else:
            xs = [u[measure] for u in self.usage.get((workload, threads, a),
                                                     []) if measure in u]
            ys = [u[measure] for u in self.usage.get((workload, threads, b),
                                                     []) if measure in u]
        pairs = [x - y for x, y in zip(xs, ys)]
        return med(pairs) if pairs else None

    def _python_cost(self):
        """What a microsecond of Python costs a transaction at each thread
        count, from the two raw bundled rows, in words."""
        base, more = C.RawBundled, C.RawBundledPython
        python_us = more.python * 1e6
        costs = []
        for t in self.s.threads:
            d = self._paired_diff("select1", t, more.key, base.key)
            if d is not None:
                costs.append((t, d / python_us))
        if not costs:
            return ""
        parts = ["**What a microsecond of Python costs (SELECT 1).** %.0f "
                 "µs of Python added to each transaction of the raw "
                 "bundled path (the same round trips: the rows \"%s\" and "
                 "\"%s\") made its time per transaction longer by %s per "
                 "µs of Python (medians of the repetitions' differences)."
                 % (python_us, base.label, more.label,
                    ", ".join("%.1f µs at %s" % (c, plural(t, "thread"))
                              for t, c in costs))]
        if len(self.s.threads) > 1:
            parts.append(
                "With more threads than CPUs the threads queue for the GIL "
                "while one runs Python, and that Python takes its CPU from "
                "the server too: where a µs costs more than a µs, the "
                "floors with the `transaction` package and zpgpool's Zope "
                "path lose more to raw psycopg2 than their Python, timed "
                "alone on one thread, suggests.")
        return " ".join(parts)

    def _micro_value(self, key):
        for label, values in self.micro.items():
            if self.micro_keys.get(label) == key and \
                    label.endswith("checkout + return"):
                return med(values)
        return None

    def _micro_paired(self, key, other):
        """Per-repetition ratios of two checkout + return loops."""
        found = {}
        for label, values in self.micro.items():
            k = self.micro_keys.get(label)
            if k in (key, other) and label.endswith("checkout + return"):
                found[k] = values
        return [a / b for a, b in zip(found[key], found[other])]

    def _micro_median(self, fragment):
        """The median of the single-thread loop whose label contains
        ``fragment``, or None."""
        for label, values in self.micro.items():
            if fragment in label:
                return med(values)
        return None


# -- the run ------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark zpgpool against other PostgreSQL pools.")
    parser.add_argument("--dsn", help="use this server instead of starting "
                        "a throwaway one (needs max_connections >= 64 x "
                        "contenders and max_prepared_transactions >= 64 for "
                        "the two-phase contenders)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter repetitions (about 3 minutes)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"),
                        help="the Markdown file to write (default: "
                        "benchmarks/RESULTS.md)")
    parser.add_argument("--reps", type=int, help="repetitions")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="thread counts (default: 1 4 16 64)")
    parser.add_argument("--duration", type=float,
                        help="seconds measured per workload and cell")
    parser.add_argument("--contenders", nargs="+", metavar="KEY",
                        choices=sorted(C.BY_KEY),
                        help="only these (the raw floor always runs): %s"
                        % ", ".join(C.BY_KEY))
    parser.add_argument("--note", default="",
                        help="a sentence for the top of the report, such as "
                        "what else ran on the machine meanwhile")
    parser.add_argument("--skip", nargs="+", default=(),
                        choices=("count", "threads", "micro", "exhaustion",
                                 "memory", "profile"),
                        help="parts of the run to leave out")
    args = parser.parse_args(argv)
    s = Settings(args)
    shown = list(argv if argv is not None else sys.argv[1:])
    for i, a in enumerate(shown):
        # Never print a password: show the option, not the DSN.
        if i and shown[i - 1] == "--dsn":
            shown[i] = "DSN"
        elif a.startswith("--dsn="):
            shown[i] = "--dsn=DSN"
        # The note is quoted in full at the top of the report.
        elif i and shown[i - 1] == "--note":
            shown[i] = "NOTE"
        elif a.startswith("--note="):
            shown[i] = "--note=NOTE"
    command = "python benchmarks/run.py" + "".join(
        " " + (a if a in ("DSN", "NOTE") else shlex.quote(a))
        for a in shown)
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]

    active = [cls for cls in C.ALL if cls.key == FLOOR or not args.contenders
              or cls.key in args.contenders]
    server = None
    if args.dsn:
        dsn = args.dsn
    else:
        log(t0, "starting a throwaway PostgreSQL server")
        server = start_server(len(active), max(s.threads))
        dsn = server.dsn()
    try:
        report = Report(s, active)
        report.note = args.note.strip()
        max_prepared = int(query(dsn, "SHOW max_prepared_transactions")[0][0])
        if max_prepared < max(s.threads):
            for cls in list(active):
                if cls.twophase:
                    active.remove(cls)
                    report.skipped.append((
                        cls.label, "the server's max_prepared_transactions "
                        "is %d, below %d threads" % (max_prepared,
                                                      max(s.threads))))
        max_conn = int(query(dsn, "SHOW max_connections")[0][0])
        needed = max(s.threads) * len(active) + 20
        if max_conn < needed:
            log(t0, "warning: the server's max_connections is %d; this run "
                "may need %d (contenders that cannot connect are reported "
                "as failed)" % (max_conn, needed))
        query(dsn, C.TABLE)
        report.info = machine_info(dsn, server, active)
        log(t0, "PostgreSQL %s; %d contenders" % (
            dict(report.info)["PostgreSQL server"].split(";")[0],
            len(active)))
        if "count" in args.skip:
            report.trips.unavailable = "left out of this run (--skip count)"
        elif server is None:
            report.trips.unavailable = (
                "needs the throwaway server (the count reads its log); "
                "this run used --dsn")
            report.trips.missing = "n/a (needs the throwaway server)"
        else:
            count_round_trips(report.trips, active, server, s, t0)
        if "threads" not in args.skip:
            run_threads(report, active, dsn, s, t0)
        if "micro" not in args.skip:
            run_micro(report, active, dsn, s, t0)
        if "exhaustion" not in args.skip:
            run_exhaustions(report, active, dsn, s, t0)
        if "memory" not in args.skip:
            run_memory(report, dsn, s, t0)
        if "profile" not in args.skip:
            run_profile(report, dsn, s, t0, server is not None)
        query(dsn, "DROP TABLE IF EXISTS zpgpool_bench")
    finally:
        if server is not None:
            log(t0, "removing the throwaway server")
            server.cleanup()
    took = time.monotonic() - t0
    text = report.markdown(command, took, load0, os.getloadavg()[0])
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    print()
    print("Targets:")
    for line in report.targets():
        print("  " + line.replace("**", ""))
    print("Other checks:")
    for line in report.checks():
        print("  " + line.replace("**", ""))
    print()
    print("Written to %s" % os.path.relpath(args.out))
    return 0


def run_threads(report, active, dsn, s, t0):
    """Every contender at each thread count, slices interleaved.

    All contenders' pools and threads stay up for the whole thread count
    (hence max_connections of 64 x contenders), and each repetition runs
    one slice of each workload for each contender, in an order rotated from
    one repetition to the next, so that a floor and a contender are measured
    seconds apart and drift on the machine hits all of them alike.
    """
    for threads in s.threads:
        query(dsn, "TRUNCATE zpgpool_bench")
        log(t0, "%d threads: starting %d contenders" % (threads, len(active)))
        crews = {}
        for cls in active:
            contender = cls(dsn)
            try:
                contender.setup(threads)
                crews[cls.key] = Crew(contender, threads)
            except Exception as exc:
                fail(report, t0, cls.key, threads, exc)
                try:
                    contender.teardown()    # what setup opened, if any
                except Exception:
                    pass    # (setup's failure is the one reported)
        try:
            keys = list(crews)
            for rep in range(s.reps):
                shift = rep % len(keys)
                order = keys[shift:] + keys[:shift]
                for workload in C.WORKLOADS:
                    results = {}
                    for key in order:
                        crew = crews.get(key)
                        if crew is None or \
                                workload not in crew.contender.workloads:
                            continue
                        try:
                            n, window, used = crew.run(
                                workload, s.warm, s.duration)
                        except CellError as exc:
                            fail(report, t0, key, threads, exc)
                            del crews[key]
                            crew.stop()
                            crew.contender.teardown()
                            continue
                        results[key] = {workload: (n, window, used)}
                    report.add_cell(results, threads)
                sel = report.ratios.get(("select1", threads, "zpgpool-zope"))
                log(t0, "%d threads: repetition %d/%d done%s" % (
                    threads, rep + 1, s.reps,
                    "; Zope path / floor (SELECT 1) = %.2f" % sel[-1]
                    if sel else ""))
        finally:
            for crew in crews.values():
                crew.stop()
                crew.contender.teardown()


def fail(report, t0, key, threads, exc):
    msg = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() \
        else type(exc).__name__
    report.failed[(key, threads)] = msg
    log(t0, "%s at %d threads failed: %s" % (key, threads, msg))


def run_micro(report, active, dsn, s, t0):
    import affinity
    log(t0, "single-thread micro benchmarks")
    loops, opened = micro_loops(active, dsn)
    try:
        with affinity.this_process_on_one_cpu() as pinned:
            report.micro_pinned = pinned
            _micro_reps(report, loops, s)
    finally:
        for contender in opened:
            contender.teardown()


def _micro_reps(report, loops, s):
    """Each loop ``s.reps`` times, interleaved round-robin."""
    sizes = {}
    for label, (loop, cls) in loops.items():
        loop(1000)
        sizes[label] = calibrate(loop, s.micro_time)
        report.micro_keys[label] = cls.key if cls else None
    labels = list(loops)
    for rep in range(s.reps):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            per = timed(loops[label][0], sizes[label])
            report.micro.setdefault(label, []).append(per * 1e6)
    report.micro = {label: report.micro[label] for label in labels}


def run_profile(report, dsn, s, t0, local):
    """Keep profile_hotpath.py's tables for the report (with a ``local``
    server, pinned to one CPU: see affinity.py)."""
    import contextlib
    import io
    import profile_hotpath
    log(t0, "profiling the request path (profile_hotpath.py)")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        profile_hotpath.main(["--dsn", dsn,
                              "-n", "2000" if s.quick else "10000"]
                             + (["--one-cpu"] if local else []))
    report.profile = out.getvalue()


def run_exhaustions(report, active, dsn, s, t0):
    chosen = [cls for cls in active if cls.limited and not cls.twophase]
    if not chosen:
        return      # --contenders named no pool that can run out
    for rep in range(s.ex_reps):
        shift = rep % len(chosen)
        for cls in chosen[shift:] + chosen[:shift]:
            contender = cls(dsn)
            try:
                contender.setup(s.ex_conns)
                try:
                    r = run_exhaustion(contender, s.ex_threads, s.ex_hold,
                                       s.ex_warm, s.ex_duration, dsn)
                finally:
                    contender.teardown()
            except Exception as exc:
                fail(report, t0, cls.key, s.ex_threads, exc)
                continue
            waits = r["waits"]

            def pct(p):
                if not waits:
                    return None
                return waits[min(len(waits) - 1, int(p * len(waits)))]
            report.exhaust.setdefault(cls.key, []).append(dict(
                throughput=r["completed"] / s.ex_duration,
                errors=r["errors"], kinds=r["kinds"], p50=pct(0.50),
                p99=pct(0.99), max=waits[-1] if waits else None,
                overtaken=r["overtaken"], worst=r["worst"],
                connections=r["connections"]))
        log(t0, "exhaustion repetition %d/%d done" % (rep + 1, s.ex_reps))
    # Keep the contenders' order.
    report.exhaust = {cls.key: report.exhaust[cls.key] for cls in chosen
                      if cls.key in report.exhaust}


def run_memory(report, dsn, s, t0):
    import zpgpool
    log(t0, "memory: %d checkouts" % s.mem_checkouts)
    pool = zpgpool.ConnectionPool(dsn, name="bench-memory", maxconn=4)
    try:
        def checkout():
            pool.putconn(pool.getconn())
        report.memory.append(memory_run(
            "zpgpool getconn + putconn", checkout, s.mem_checkouts,
            s.mem_traced))
        tm = transaction.manager

        def zope():
            with tm:
                pool.connection()
        log(t0, "memory: %d Zope transactions" % s.mem_zope)
        report.memory.append(memory_run(
            "zpgpool Zope path, one transaction each", zope, s.mem_zope,
            s.mem_zope))
    finally:
        pool.closeall()


if __name__ == "__main__":
    sys.exit(main())
