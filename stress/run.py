"""The long fault scenarios, with figures: ``python stress/run.py``.

Starts a throwaway PostgreSQL server (zpgpool.testing), then runs, each
through ``getUtility(IConnectionPool, name).connection()`` and the
transaction manager from many threads:

- the server stopped (fast, then immediate) and started again under 16
  threads: requests failed, seconds from the server being back to the
  first and to every thread succeeding again;
- random pooled sessions terminated for a while under load;
- 10,000 short-lived threads, each one transaction, on a pool of 4;
- 64 threads on a pool of 4 with slow transactions;
- a soak of ``--minutes`` (default 2) with random faults from the list
  above and a network cut through a TCP proxy, RSS sampled at start and
  end against a stated bound.

After each, the invariants of zpgpool.testing.faults are checked (every
committed transaction in the database once, nothing that failed before
COMMIT, in_use back to 0, size <= maxconn, no thread stuck, no session of
the pool left on the server after close()).  Prints a table; exits 1 when
a check failed.
"""
import argparse
import logging
import os
import random
import sys
import threading
import time
import unittest

import psycopg2.extensions
from zope.component import getGlobalSiteManager

from zpgpool import ConnectionPool
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing import PostgresServer
from zpgpool.testing.faults import Load
from zpgpool.testing.faults import TcpProxy
from zpgpool.testing.faults import backend_pids
from zpgpool.testing.faults import check_invariants
from zpgpool.testing.faults import check_no_leaks
from zpgpool.testing.faults import make_table
from zpgpool.testing.faults import query
from zpgpool.testing.faults import wait_for
from zpgpool.testing.faults import wait_until_all_succeed

#: RSS growth over the soak that counts as a leak.
RSS_BOUND_MB = 32.0
WAIT = 120.0


def failures(load):
    return sum(load.error_summary().values())


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")   # pragma: no cover (not Linux)


class Run:

    def __init__(self, server):
        self.server = server
        self.dsn = server.dsn()
        self.rows = []
        self.failed = []
        self.checker = unittest.TestCase()
        self._n = 0

    def pool(self, dsn=None, **kw):
        self._n += 1
        name = "stress%d" % self._n
        kw.setdefault("maxconn", 8)
        pool = ConnectionPool(dsn or self.dsn, name=name, **kw)
        getGlobalSiteManager().registerUtility(pool, IConnectionPool, name)
        table = "stress_%s" % name
        make_table(self.dsn, table)
        return pool, name, table

    def finish(self, pool, table, load):
        try:
            load.join(timeout=WAIT)
            stats = check_invariants(self.checker, pool, self.dsn, table,
                                     load)
            check_no_leaks(self.checker, pool, self.dsn)
            ok = "ok"
        except AssertionError as exc:
            stats = pool.stats()
            ok = "FAILED: %s" % str(exc).splitlines()[0][:120]
            self.failed.append(ok)
            pool.closeall()
        getGlobalSiteManager().unregisterUtility(pool, IConnectionPool,
                                                 pool.name)
        query(self.dsn, "DROP TABLE %s" % table)
        return stats, ok

    def add(self, scenario, committed, failed, figures, ok):
        self.rows.append((scenario, str(committed), str(failed), figures, ok))
        print("  %s: %s" % (scenario, ok), file=sys.stderr)

    # -- scenarios -----------------------------------------------------------

    def restart(self, mode):
        pool, name, table = self.pool(connect_timeout=2,
                                      reconnect_max_delay=0.2)
        load = Load(name, table, threads=16).start()
        wait_for(lambda: len(load.committed) >= 200, "load", WAIT)
        self.server.stop(mode)
        down = time.monotonic()
        time.sleep(0.5)
        self.server.start()
        back = time.monotonic()
        wait_until_all_succeed(load, back, WAIT)
        first, everyone = load.recovery(back)
        late = len(load.errors_since(back))
        time.sleep(1.0)
        load.stop(timeout=WAIT)
        stats, ok = self.finish(pool, table, load)
        kinds = ", ".join("%s %d" % kv for kv in
                          sorted(load.error_summary().items()))
        self.add("restart -m %s, 16 threads" % mode, len(load.committed),
                 "%d (%d after back)" % (failures(load), late),
                 "down %.2f s; back->first ok %.3f s, ->all 16 ok %.3f s; "
                 "errors: %s" % (back - down, first, everyone, kinds), ok)

    def terminate(self, seconds=10):
        pool, name, table = self.pool()
        load = Load(name, table, threads=16).start()
        killed = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            killed += len(query(
                self.dsn, "SELECT pg_terminate_backend(pid) FROM "
                "pg_stat_activity WHERE application_name = %s ORDER BY "
                "random() LIMIT 2", ("zpgpool:" + name,)))
            time.sleep(0.1)
        since = time.monotonic()
        wait_until_all_succeed(load, since, WAIT)
        load.stop(timeout=WAIT)
        stats, ok = self.finish(pool, table, load)
        self.add("pg_terminate_backend %d s, 16 threads" % seconds,
                 len(load.committed), failures(load),
                 "%d sessions killed, %d lost, %d discarded"
                 % (killed, stats["connections_lost"],
                    stats["connections_discarded"]), ok)

    def churn(self, total=10000, alive=100):
        pool, name, table = self.pool(maxconn=4, timeout=WAIT)
        peak = {"size": 0, "backends": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak["size"] = max(peak["size"], pool.stats()["size"])
                peak["backends"] = max(peak["backends"], len(backend_pids(
                    self.dsn, "zpgpool:" + name)))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.monotonic()
        # One Load object collects every thread's result.
        load = Load(name, table, threads=0, per_thread=1)
        for batch in range(0, total, alive):
            threads = [threading.Thread(target=load._run, args=(batch + i,),
                                        daemon=True)
                       for i in range(alive)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
                if t.is_alive():
                    load.threads.append(t)   # reported as stuck
        elapsed = time.monotonic() - start
        stop.set()
        watcher.join(WAIT)
        stats, ok = self.finish(pool, table, load)
        if peak["size"] > 4 or peak["backends"] > 4:
            ok = "FAILED: above maxconn"
            self.failed.append(ok)
        self.add("%d short-lived threads, maxconn 4" % total,
                 len(load.committed), failures(load),
                 "%.1f s, %.0f threads/s; peak size %d, peak backends %d; "
                 "%d connections opened" % (
                     elapsed, total / elapsed, peak["size"],
                     peak["backends"], stats["connections_opened"]), ok)

    def exhaustion(self):
        pool, name, table = self.pool(maxconn=4, timeout=2.0)
        start = time.monotonic()
        load = Load(name, table, threads=64, per_thread=5, sleep=0.05)
        load.start().join(timeout=WAIT)
        elapsed = time.monotonic() - start
        stats, ok = self.finish(pool, table, load)
        other = set(load.error_summary()) - {"PoolTimeout"}
        if other:
            ok = "FAILED: %s" % ", ".join(other)
            self.failed.append(ok)
        self.add("64 threads on maxconn 4, 50 ms transactions",
                 len(load.committed), failures(load),
                 "%.1f s; %d waits, mean wait %.0f ms, %d PoolTimeout "
                 "(timeout 2 s)" % (
                     elapsed, stats["waits"],
                     1000 * stats["wait_time"] / max(1, stats["waits"]),
                     stats["timeouts"]), ok)

    def soak(self, minutes):
        proxy = TcpProxy((self.server.host, self.server.port))
        dsn = psycopg2.extensions.make_dsn(self.dsn, **proxy.dsn_params())
        pool, name, table = self.pool(dsn, connect_timeout=2, timeout=5,
                                      reconnect_max_delay=0.5)
        rss_start = rss_mb()
        load = Load(name, table, threads=16, keep_errors=1000).start()
        wait_for(lambda: len(load.committed) >= 100, "load", WAIT)
        rss_warm = rss_mb()
        faults = {}
        rng = random.Random(6)
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(2, 6))
            fault = rng.choice(["restart fast", "restart immediate",
                                "terminate", "refuse", "none"])
            faults[fault] = faults.get(fault, 0) + 1
            if fault.startswith("restart"):
                self.server.restart(fault.split()[1])
            elif fault == "terminate":
                query(self.dsn, "SELECT pg_terminate_backend(pid) FROM "
                      "pg_stat_activity WHERE application_name = %s ORDER BY"
                      " random() LIMIT 3", ("zpgpool:" + name,))
            elif fault == "refuse":
                proxy.refuse()
                time.sleep(rng.uniform(0.2, 2))
                proxy.heal()
            wait_until_all_succeed(load, time.monotonic(), WAIT)
        load.stop(timeout=WAIT)
        rss_end = rss_mb()
        stats, ok = self.finish(pool, table, load)
        proxy.close()
        growth = rss_end - rss_warm
        if growth > RSS_BOUND_MB:
            ok = "FAILED: RSS grew %.1f MB" % growth
            self.failed.append(ok)
        self.add("soak %g min, 16 threads, random faults" % minutes,
                 len(load.committed), failures(load),
                 "faults: %s; RSS %.1f -> %.1f -> %.1f MB (growth %.1f MB, "
                 "bound %.0f MB)" % (
                     ", ".join("%s %d" % kv for kv in sorted(faults.items())),
                     rss_start, rss_warm, rss_end, growth, RSS_BOUND_MB), ok)

    def table(self):
        head = ("scenario", "committed", "failed", "figures", "invariants")
        widths = [max(len(r[i]) for r in self.rows + [head])
                  for i in range(4)]
        lines = ["| " + " | ".join(h.ljust(w) for h, w in
                                   zip(head, widths + [10])) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths + [10]) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(
                c.ljust(w) for c, w in zip(row, widths + [10])) + " |")
        return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0,
                        help="length of the soak (default 2)")
    parser.add_argument("--threads", type=int, default=10000,
                        help="short-lived threads in the churn (10000)")
    parser.add_argument("--only", action="append", choices=(
        "restart", "terminate", "churn", "exhaustion", "soak"),
        help="run only this scenario (may be repeated)")
    args = parser.parse_args(argv)
    only = set(args.only or ())
    logging.getLogger("zpgpool").setLevel(logging.CRITICAL)
    server = PostgresServer(settings={"max_connections": 300})
    print("stress: starting a throwaway PostgreSQL server", file=sys.stderr)
    server.start()
    run = Run(server)
    try:
        print("stress: PostgreSQL %s, Python %s, %d CPUs" % (
            server.version, sys.version.split()[0], os.cpu_count()))
        if not only or "restart" in only:
            run.restart("fast")
            run.restart("immediate")
        if not only or "terminate" in only:
            run.terminate()
        if not only or "churn" in only:
            run.churn(args.threads)
        if not only or "exhaustion" in only:
            run.exhaustion()
        if not only or "soak" in only:
            run.soak(args.minutes)
    finally:
        print()
        print(run.table())
        server.cleanup()
    if run.failed:
        print("stress: %d scenario(s) failed" % len(run.failed))
        return 1
    print("stress: every invariant held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
