"""Profile zpgpool's hot paths with cProfile, on one thread.

Usage::

    python benchmarks/profile_hotpath.py [--dsn DSN] [-n 200000] [--top 15]

Profiles three loops against a throwaway server (or ``--dsn``), and prints
the top entries of each by own time (tottime) and by cumulative time:

- ``getconn()`` + ``putconn()``, no SQL (the pure pool overhead);
- the Zope path, one transaction each, no SQL:
  ``with transaction.manager: getUtility(IConnectionPool, name).connection()``;
- the Zope path with ``SELECT 1`` (what the 1.10x target measures);
- repeated ``pool.connection()`` calls inside one transaction.

cProfile adds a fixed cost to every call, so it overstates code made of
many small calls; read the ranking, not the absolute times.
"""
import argparse
import cProfile
import io
import pstats
import sys

import transaction
import zope.component
from zope.component import getUtility

import zpgpool
from zpgpool.interfaces import IConnectionPool


def profile(title, loop, n, top):
    loop(min(n, 10_000))                 # warm up, outside the profile
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
        print("=== %s: %d iterations, sorted by %s ===" % (title, n, sort))
        print(body.rstrip())
        print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    server = None
    dsn = args.dsn
    if not dsn:
        from zpgpool.testing import PostgresServer
        server = PostgresServer().start()
        dsn = server.dsn()
    try:
        pool = zpgpool.ConnectionPool(dsn, name="profile", maxconn=2)
        zope.component.provideUtility(pool, IConnectionPool, "profile")
        tm = transaction.manager
        n = args.n

        def checkout(n):
            getconn, putconn = pool.getconn, pool.putconn
            for _ in range(n):
                putconn(getconn())

        def zope_noop(n):
            for _ in range(n):
                with tm:
                    getUtility(IConnectionPool, "profile").connection()

        def zope_select1(n):
            for _ in range(n):
                with tm:
                    cur = getUtility(IConnectionPool,
                                     "profile").connection().cursor()
                    cur.execute("SELECT 1")
                    cur.fetchone()
                    cur.close()

        def repeated(n):
            with tm:
                connection = pool.connection
                for _ in range(n):
                    connection()

        profile("getconn + putconn", checkout, n, args.top)
        profile("Zope path, no SQL", zope_noop, n // 4, args.top)
        profile("Zope path, SELECT 1", zope_select1, n // 20, args.top)
        profile("repeated connection() in one transaction", repeated, n,
                args.top)
        pool.closeall()
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
