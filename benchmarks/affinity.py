"""One CPU for the profile's single-thread measurements.

Usage (the measurement quoted below)::

    python benchmarks/affinity.py [--dsn DSN]

With the client and the server on one machine, a round trip costs more
when the server process that answers runs on another CPU than the client
(the wake-up crosses CPUs, and may have to wake an idle one), and which
CPU that is changes from one connection and one moment to the next.  On
the 2-core development VM, 4 connections sending ``SELECT 1`` in turn took
15-24 µs per round trip (medians per connection, five runs; 19-24 in three
of them), with upper quartiles from 21 to 100 µs; with this process and
the server pinned to one CPU, 13.9-15.9 µs, with upper quartiles within
about 1 µs of the median (this module run as a script).  Unpinned, one contender's connection may
land on the slow side for a whole measurement and another's not: a
difference between contenders that neither of them made.

So profile_hotpath.py, which splits one thread's transaction into its
steps to say where each path's time goes, runs with every thread of this
process, the server's postmaster and all its processes (and so every
backend forked while pinned) on the same CPU.  run.py's slices are not
pinned: with more threads they are CPU-bound and need every CPU, and at
one thread a pinned round trip (10-16 µs) costs
less than the Python the ``transaction`` package adds, which is not the
latency-bound case a server on another machine makes.  Only a server on
this machine can be pinned, so only one the benchmark started itself.
run.py's single-thread loops, which send no statement, pin this process
alone (``this_process_on_one_cpu``), wherever the server is.
"""
import contextlib
import os

import psycopg2


def _parent(pid):
    with open("/proc/%d/stat" % pid) as f:
        # pid (comm) state ppid ...; comm may hold spaces and parentheses.
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _parent(int(entry)) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass    # gone meanwhile
    return found


def _postmaster(dsn):
    conn = psycopg2.connect(dsn)
    try:
        return _parent(conn.get_backend_pid())
    finally:
        conn.close()


@contextlib.contextmanager
def server_at(dsn):
    """Yield ``dsn``, or when it is None the DSN of a throwaway server on
    this machine, started for the block and removed after it."""
    if dsn:
        yield dsn
        return
    from zpgpool.testing import PostgresServer
    server = PostgresServer().start()
    try:
        yield server.dsn()
    finally:
        server.cleanup()


class _Pins:
    """CPU affinities changed, and put back."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.before = {}

    def pin(self, pid):
        """Move ``pid`` (a process or a thread) to the CPU; False when it
        is gone or may not be moved."""
        try:
            self.before.setdefault(pid, os.sched_getaffinity(pid))
            os.sched_setaffinity(pid, self.cpu)
        except (ProcessLookupError, PermissionError):
            self.before.pop(pid, None)
            return False
        return True

    def pin_this_process(self):
        for tid in os.listdir("/proc/self/task"):
            self.pin(int(tid))

    def restore(self):
        for pid, mask in self.before.items():
            try:
                os.sched_setaffinity(pid, mask)
            except (ProcessLookupError, PermissionError):
                pass


def _one_of_ours():
    """The CPU to pin to: the last this process may run on."""
    return {max(os.sched_getaffinity(0))}


@contextlib.contextmanager
def one_cpu(dsn):
    """Run the block with this process and the server at ``dsn`` (which
    must run on this machine) on one CPU; put every affinity back after.

    Yields a sentence for the report: what was pinned, or why nothing was.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned: this platform has no sched_setaffinity"
        return
    pins = _Pins(_one_of_ours())
    postmaster = _postmaster(dsn)
    if not pins.pin(postmaster):
        yield "not pinned: no permission to set the server's CPU affinity"
        return
    pins.pin_this_process()
    for pid in _children(postmaster):
        pins.pin(pid)
    try:
        yield "this process and the server pinned to CPU %d" % min(pins.cpu)
    finally:
        # Backends forked meanwhile took the postmaster's (pinned) mask.
        for pid in _children(postmaster):
            pins.before.setdefault(pid, pins.before[postmaster])
        pins.restore()


@contextlib.contextmanager
def this_process_on_one_cpu():
    """Run the block with every thread of this process on one CPU, for
    loops that send nothing to the server (run.py's single-thread loops:
    unpinned, the scheduler moving the thread between CPUs shows as a
    difference between contenders); put the affinities back after.

    Yields a sentence for the report.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned: this platform has no sched_setaffinity"
        return
    pins = _Pins(_one_of_ours())
    pins.pin_this_process()
    try:
        yield "this process pinned to CPU %d" % min(pins.cpu)
    finally:
        pins.restore()


def _round_trips(conns, rounds=40, per_turn=200):
    """Median and quartiles of each connection's round trip, in µs, the
    connections taking turns."""
    import statistics
    import time
    times = [[] for _ in conns]
    for r in range(rounds):
        for i in range(len(conns)):
            j = (i + r) % len(conns)
            cur = conns[j].cursor()
            start = time.perf_counter()
            for _ in range(per_turn):
                cur.execute("SELECT 1")
            times[j].append((time.perf_counter() - start) / per_turn * 1e6)
    return [(statistics.median(t),) + tuple(statistics.quantiles(t, n=4)[::2])
            for t in times]


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        description="Round trips of 4 connections, unpinned and pinned.")
    parser.add_argument("--dsn", help="a server on this machine (default: "
                        "a throwaway one)")
    args = parser.parse_args(argv)
    with server_at(args.dsn) as dsn:
        conns = [psycopg2.connect(dsn) for _ in range(4)]
        for conn in conns:
            conn.autocommit = True
        for label, pinning in (("unpinned", contextlib.nullcontext()),
                               ("pinned", one_cpu(dsn))):
            with pinning as how:
                print("%s%s:" % (label, " (%s)" % how if how else ""))
                for i, (m, q1, q3) in enumerate(_round_trips(conns)):
                    print("  connection %d: %.1f µs per round trip "
                          "(quartiles %.1f-%.1f)" % (i, m, q1, q3))
        for conn in conns:
            conn.close()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
