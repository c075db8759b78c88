"""Where the microseconds of a request go, call by call, on one thread.

Usage::

    python benchmarks/profile_hotpath.py [--dsn DSN] [-n 10000] [--cprofile]

Against a throwaway server (or ``--dsn``), it runs one transaction after
another and prints three tables:

1. **Steps.** Each step of a request timed on its own with a clock read
   before and after it -- ``transaction.manager.begin()``, ``getUtility``,
   ``pool.connection()``, ``cursor()``, ``execute("SELECT 1")``, fetch and
   close, ``transaction.manager.commit()`` -- for zpgpool's Zope path
   (one-phase and two-phase), for the minimal data manager floor with BEGIN
   bundled (contenders.py: the same design with no pool) and for a raw
   psycopg2 connection, side by side, in interleaved rounds. The column "zpgpool − floor" is
   zpgpool's own share of each step.
2. **Calls inside the steps.** zpgpool's own functions on the path (the
   thread state's ``connection()`` and ``before_statement()``, the data
   manager's ``tpc_*`` calls, ``binding.take``, the pool's ``unpark`` and
   ``park``, the statements the data manager sends) wrapped with a timer:
   calls per transaction, time per call including what it calls, and its
   own time (without the wrapped calls inside it). The wrapper costs a
   little per call, measured and shown.
3. **Checkout alone.** ``getconn()`` + ``putconn()`` without SQL, against
   psycopg2's ThreadedConnectionPool, split the same way.

It runs on one thread, and with its own server (no ``--dsn``) or with
``--one-cpu`` this process and the server are pinned to one CPU, so that
every path's round trips cost the same (see affinity.py: unpinned, one
path's connection may answer from the other CPU for a whole measurement).
Medians are per call over all transactions; the sum of the step medians
is close to, not equal to, the median transaction. With ``--cprofile`` it
also prints cProfile's ranking of the Zope path (cProfile adds a fixed cost
to every Python call, so read its ranking, not its times).
"""
import argparse
import contextlib
import cProfile
import functools
import io
import pstats
import statistics
import sys
import time

import psycopg2
import psycopg2.pool
import transaction
import zope.component
from zope.component import getUtility

import zpgpool
from zpgpool.interfaces import IConnectionPool

import affinity
import contenders as C


_clock = time.perf_counter
NAME_1PC = "profile-1pc"
NAME_2PC = "profile-2pc"


# -- 1. steps -----------------------------------------------------------------

STEPS = ("transaction.manager.begin()", "getUtility(IConnectionPool, name)",
         "connection()", "conn.cursor()", 'cur.execute("SELECT 1")',
         "cur.fetchone(); cur.close()", "commit")


def zope_steps(name):
    """One Zope-path transaction through the pool registered as ``name``,
    timed step by step; returns the list of step durations."""
    tm = transaction.manager

    def one():
        t0 = _clock()
        tm.begin()
        t1 = _clock()
        pool = getUtility(IConnectionPool, name)
        t2 = _clock()
        conn = pool.connection()
        t3 = _clock()
        cur = conn.cursor()
        t4 = _clock()
        cur.execute("SELECT 1")
        t5 = _clock()
        cur.fetchone()
        cur.close()
        t6 = _clock()
        tm.commit()
        t7 = _clock()
        return (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5,
                t7 - t6)
    return one


def floor_steps(dsn):
    """The minimal data manager with BEGIN bundled (contenders.py)."""
    tm = transaction.manager
    conn = psycopg2.connect(dsn)
    dm = C._FloorDataManager(conn, tm, bundled=True)

    def one():
        t0 = _clock()
        tm.begin()
        t1 = _clock()
        c = dm.connection()
        t2 = _clock()
        cur = c.cursor()
        t3 = _clock()
        cur.execute("SELECT 1")
        t4 = _clock()
        cur.fetchone()
        cur.close()
        t5 = _clock()
        tm.commit()
        t6 = _clock()
        return (t1 - t0, None, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
    return one, conn.close


def raw_steps(dsn):
    """One persistent psycopg2 connection, ``conn.commit()``."""
    conn = psycopg2.connect(dsn)

    def one():
        t0 = _clock()
        cur = conn.cursor()
        t1 = _clock()
        cur.execute("SELECT 1")
        t2 = _clock()
        cur.fetchone()
        cur.close()
        t3 = _clock()
        conn.commit()
        t4 = _clock()
        return (None, None, None, t1 - t0, t2 - t1, t3 - t2, t4 - t3)
    return one, conn.close


def measure(ones, n, rounds=20):
    """Run each of ``ones`` ({name: one}) n times, interleaved: ``rounds``
    rounds, each running n / rounds transactions of every path in a
    rotated order, so that a change in the machine's load hits all paths
    alike. Returns {name: (per-step medians in µs, median transaction)}.
    """
    names = list(ones)
    for name in names:
        for _ in range(min(n, 500)):
            ones[name]()
    rows = {name: [] for name in names}
    totals = {name: [] for name in names}
    per_round = max(1, n // rounds)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            one, mine, tot = ones[name], rows[name], totals[name]
            for _ in range(per_round):
                t = _clock()
                mine.append(one())
                tot.append(_clock() - t)
    results = {}
    for name in names:
        steps = []
        for i in range(len(rows[name][0])):
            vals = [row[i] for row in rows[name] if row[i] is not None]
            steps.append(statistics.median(vals) * 1e6 if vals else None)
        results[name] = (steps, statistics.median(totals[name]) * 1e6)
    return results


def fmt(x, sign=False):
    if x is None:
        return "-"
    return ("%+.1f" if sign else "%.1f") % x


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows)
              for i in range(len(header))]
    print(title)
    print()
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                     for i, h in enumerate(header))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(widths[0]) if i == 0
                        else str(c).rjust(widths[i])
                        for i, c in enumerate(r)))
    print()


def steps_report(dsn, n):
    floor_one, floor_close = floor_steps(dsn)
    raw_one, raw_close = raw_steps(dsn)
    try:
        results = measure({
            "raw psycopg2": raw_one,
            "floor (bundled)": floor_one,
            "zpgpool 1PC": zope_steps(NAME_1PC),
            "zpgpool 2PC": zope_steps(NAME_2PC),
        }, n)
    finally:
        floor_close()
        raw_close()
    names = list(results)
    header = ["step (µs, median per call)"] + names + ["zpgpool 1PC − floor"]
    rows = []
    for i, step in enumerate(STEPS):
        vals = [results[k][0][i] for k in names]
        z, f = results["zpgpool 1PC"][0][i], results["floor (bundled)"][0][i]
        own = z - (f or 0.0) if z is not None else None
        label = step
        if step == "connection()":
            label = "connection() / the floor's dm.connection()"
        elif step == "commit":
            label = "transaction.manager.commit() / conn.commit()"
        rows.append([label] + [fmt(v) for v in vals] + [fmt(own, True)])
    sums = [sum(v for v in results[k][0] if v is not None) for k in names]
    rows.append(["sum of the steps"] + [fmt(v) for v in sums]
                + [fmt(sums[2] - sums[1], True)])
    rows.append(["median transaction"] + [fmt(results[k][1]) for k in names]
                + [fmt(results["zpgpool 1PC"][1]
                       - results["floor (bundled)"][1], True)])
    print_table("== 1. Steps of one SELECT 1 transaction, %d transactions "
                "each, the paths interleaved ==" % n, header, rows)
    print("The execute and commit steps hold the round trips: BEGIN + "
          "SELECT 1 in one\nmessage, then COMMIT (two-phase: COMMIT in "
          "one message with the check\nthat the transaction wrote "
          "nothing: no PREPARE; raw psycopg2: BEGIN,\nSELECT 1 and COMMIT, "
          "three messages). The last column is what zpgpool\nadds to the "
          "same design without a pool.")
    print()


# -- 2. calls inside the steps ------------------------------------------------

class CallTimer:
    """Wraps chosen functions with a timer that records, per function, the
    calls, the time including what they call, and the time spent in the
    wrapped functions they call (so their own time can be told)."""

    def __init__(self):
        self.stats = {}      # label -> [calls, inclusive s, in children s]
        self.stack = []      # per open call: time spent in its children
        self.undo = []

    def wrap(self, owner, attr, label):
        """Wrap ``owner.attr``; False when it does not exist (moved)."""
        original = owner.__dict__.get(attr) if isinstance(owner, type) \
            else getattr(owner, attr, None)
        if original is None:
            return False
        is_static = isinstance(original, staticmethod)
        func = original.__func__ if is_static else original
        stats = self.stats.setdefault(label, [0, 0.0, 0.0])
        stack = self.stack

        @functools.wraps(func)
        def timed(*args, **kw):
            stack.append(0.0)
            start = _clock()
            try:
                return func(*args, **kw)
            finally:
                took = _clock() - start
                children = stack.pop()
                stats[0] += 1
                stats[1] += took
                stats[2] += children
                if stack:
                    stack[-1] += took
        setattr(owner, attr, staticmethod(timed) if is_static else timed)
        self.undo.append((owner, attr, original))
        return True

    def reset(self):
        for s in self.stats.values():
            s[:] = [0, 0.0, 0.0]

    def restore(self):
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)
        self.undo = []


def wrapper_cost(n=200_000):
    """What the timing wrapper adds to one call, in µs."""
    class Holder:
        @staticmethod
        def empty():
            pass
    plain = Holder.empty
    start = _clock()
    for _ in range(n):
        plain()
    bare = _clock() - start
    timer = CallTimer()
    timer.wrap(Holder, "empty", "empty")
    wrapped = Holder.empty
    start = _clock()
    for _ in range(n):
        wrapped()
    return max(0.0, (_clock() - start - bare) / n * 1e6)


def zpgpool_calls():
    """(owner, attribute, label) of zpgpool's functions on the path.

    Private names: this script measures zpgpool's inside, and the list says
    plainly what it looks at. A name that has moved is reported, not
    fatal."""
    from zpgpool import binding
    from zpgpool import datamanager as dm
    from zpgpool import pool as pool_module
    from zpgpool.core import CorePool
    from zpgpool.parking import Parking
    calls = [
        (pool_module.ConnectionPool, "connection",
         "ConnectionPool.connection()"),
        (dm.ThreadState, "connection", "ThreadState.connection()"),
        (dm.ThreadState, "_join", "ThreadState._join() (once per txn)"),
        (binding, "take", "binding.take() (the thread's connection)"),
        (Parking, "unpark", "Parking.unpark()"),
        (CorePool, "acquire", "CorePool.acquire() (when not parked)"),
        (transaction.Transaction, "join", "Transaction.join() [transaction package]"),
        (dm.ThreadState, "cursor", "ThreadState.cursor()"),
        (dm.ThreadState, "before_statement",
         "ThreadState.before_statement()"),
        (transaction.Transaction, "commit", "Transaction.commit() [transaction package]"),
    ]
    for cls in (dm.OnePhaseDataManager, dm.TwoPhaseDataManager):
        for name in ("tpc_begin", "commit", "tpc_vote", "tpc_finish"):
            if name in cls.__dict__ or name in dm._DataManager.__dict__:
                owner = cls if name in cls.__dict__ else dm._DataManager
                label = "%s.%s()%s" % (owner.__name__, name, "" if owner is
                                       cls else " (shared)")
                calls.append((owner, name, label))
    calls += [
        (dm, "_execute", "datamanager._execute() (COMMIT, PREPARE, ...: "
                         "a round trip)"),
        (dm.ThreadState, "ended", "ThreadState.ended() (txn over)"),
        (Parking, "park", "Parking.park()"),
        (CorePool, "getconn", "CorePool.getconn()"),
        (CorePool, "putconn", "CorePool.putconn()"),
        (CorePool, "release", "CorePool.release()"),
    ]
    seen = set()
    unique = []
    for owner, attr, label in calls:
        if (owner, attr) not in seen:
            seen.add((owner, attr))
            unique.append((owner, attr, label))
    return unique


def calls_report(title, loop, n, cost):
    timer = CallTimer()
    missing = [label for owner, attr, label in zpgpool_calls()
               if not timer.wrap(owner, attr, label)]
    try:
        loop(min(n, 500))
        timer.reset()
        start = _clock()
        loop(n)
        total = (_clock() - start) / n * 1e6
    finally:
        timer.restore()
    rows = []
    for label, (calls, incl, children) in timer.stats.items():
        if not calls:
            continue
        rows.append([label, "%.2f" % (calls / n),
                     "%.2f" % (incl / calls * 1e6),
                     "%.2f" % ((incl - children) / calls * 1e6),
                     "%.2f" % ((incl - children) / n * 1e6)])
    print_table("== %s: %d operations, %.1f µs each with the timers ==" % (
        title, n, total), ["call", "calls per op", "µs incl.", "µs own",
                           "own µs per op"], rows)
    print("µs incl.: per call, including what it calls; µs own: without the "
          "timed calls\ninside it; each timed call adds about %.2f µs of "
          "timer to its caller's own time." % cost)
    if missing:
        print("Not found (renamed or moved in src/): %s" % ", ".join(
            missing))
    print()


# -- the loops ----------------------------------------------------------------

def zope_select1(name):
    tm = transaction.manager

    def loop(n):
        for _ in range(n):
            with tm:
                cur = getUtility(IConnectionPool, name).connection().cursor()
                cur.execute("SELECT 1")
                cur.fetchone()
                cur.close()
    return loop


def zope_noop(name):
    tm = transaction.manager

    def loop(n):
        for _ in range(n):
            with tm:
                getUtility(IConnectionPool, name).connection()
    return loop


def checkout(pool):
    def loop(n):
        getconn, putconn = pool.getconn, pool.putconn
        for _ in range(n):
            putconn(getconn())
    return loop


def checkout_report(zp, dsn, n):
    pg = psycopg2.pool.ThreadedConnectionPool(1, 1, dsn)
    try:
        results = {}
        for label, pool in (("zpgpool", zp), ("ThreadedConnectionPool", pg)):
            getconn, putconn = pool.getconn, pool.putconn
            for _ in range(1000):
                putconn(getconn())
            takes, gives = [], []
            for _ in range(n):
                t0 = _clock()
                conn = getconn()
                t1 = _clock()
                putconn(conn)
                t2 = _clock()
                takes.append(t1 - t0)
                gives.append(t2 - t1)
            results[label] = (statistics.median(takes) * 1e6,
                              statistics.median(gives) * 1e6)
    finally:
        pg.closeall()
    rows = [[step] + ["%.2f" % results[k][i] for k in results]
            + ["%+.2f" % (results["zpgpool"][i]
                          - results["ThreadedConnectionPool"][i])]
            for i, step in enumerate(("getconn()", "putconn(conn)"))]
    rows.append(["both"] + ["%.2f" % sum(results[k]) for k in results]
                + ["%+.2f" % (sum(results["zpgpool"])
                              - sum(results["ThreadedConnectionPool"]))])
    print_table("== 3. getconn() + putconn(), no SQL, %d each (µs, median "
                "per call) ==" % n,
                ["call"] + list(results) + ["zpgpool − psycopg2"], rows)


def cprofile_report(title, loop, n, top):
    loop(min(n, 1000))
    prof = cProfile.Profile()
    prof.enable()
    loop(n)
    prof.disable()
    for sort in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.strip_dirs().sort_stats(sort).print_stats(top)
        text = out.getvalue()
        body = text[text.index("   ncalls"):] if "   ncalls" in text else text
        print("=== cProfile, %s: %d iterations, sorted by %s ===" % (
            title, n, sort))
        print(body.rstrip())
        print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="use this server (needs "
                        "max_prepared_transactions > 0)")
    parser.add_argument("-n", type=int, default=10_000,
                        help="transactions per measurement (default 10000)")
    parser.add_argument("--cprofile", action="store_true",
                        help="also print cProfile's ranking")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--one-cpu", action="store_true",
                        help="pin this process and the server to one CPU "
                        "(affinity.py; the server must run on this machine: "
                        "the default without --dsn)")
    args = parser.parse_args(argv)
    with affinity.server_at(args.dsn) as dsn:
        profile(dsn, args, pin=args.one_cpu or not args.dsn)
    return 0


def profile(dsn, args, pin):
    """Print the tables for the server at ``dsn``."""
    pools = []
    try:
        for name, twophase in ((NAME_1PC, False), (NAME_2PC, True)):
            pool = zpgpool.ConnectionPool(dsn, name=name, maxconn=2,
                                          twophase=twophase)
            pools.append(pool)
            zope.component.provideUtility(pool, IConnectionPool, name)
        n = args.n
        pinning = affinity.one_cpu(dsn) if pin \
            else contextlib.nullcontext("not pinned to one CPU (--one-cpu)")
        with pinning as pinned:
            print("One thread; %s." % pinned)
            print()
            report(dsn, pools, n, args)
    finally:
        for pool in pools:
            pool.closeall()


def report(dsn, pools, n, args):
    """Print the tables."""
    cost = wrapper_cost()
    steps_report(dsn, n)
    print("== 2. Inside the steps: zpgpool's calls, timed ==")
    print()
    calls_report("Zope path, one-phase, SELECT 1",
                 zope_select1(NAME_1PC), n, cost)
    calls_report("Zope path, two-phase, SELECT 1",
                 zope_select1(NAME_2PC), n, cost)
    calls_report("Zope path, one-phase, no SQL", zope_noop(NAME_1PC),
                 n, cost)
    calls_report("getconn() + putconn(), no SQL", checkout(pools[0]),
                 n, cost)
    checkout_report(pools[0], dsn, n * 10)
    if args.cprofile:
        cprofile_report("Zope path, one-phase, SELECT 1",
                        zope_select1(NAME_1PC), n, args.top)
        cprofile_report("Zope path, one-phase, no SQL",
                        zope_noop(NAME_1PC), n * 4, args.top)


if __name__ == "__main__":
    sys.exit(main())
