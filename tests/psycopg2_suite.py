"""Run psycopg2's own test suite on connections lent by a zpgpool pool.

Usage: python psycopg2_suite.py PSYCOPG2_SOURCE_DIR RESULT_JSON MODULE...

Run in a process of its own by tests/test_psycopg2_suite.py: psycopg2's
tests change process-wide state (global typecasters, wait callbacks) and
are a package named ``tests``, as ours are. The database is given as
psycopg2's suite expects it, in the PSYCOPG2_TESTDB* variables.

Every connection the suite asks for with plain arguments comes from
``pool.getconn()`` and goes back with ``putconn`` after its test, so the
next test is handed a connection an earlier test used: what one test left
on it must not reach another. An error ``putconn`` raises is reported
with the results. Asynchronous connections, which a pool does
not lend, and the suite's deliberately unconnected factory are made by
psycopg2 directly.
"""
import json
import sys
import unittest
import warnings

# psycopg2's tests turn every warning into an error. test_green's
# test_flush_on_write warns when a large query was sent without blocking
# on write, which happens when the machine is busy; psycopg2's own
# comment calls that a testing glitch, not an error. Here it stays a
# warning, so a loaded CI machine cannot fail the suite with it; the
# test's checks of the query's result still count.
LOAD_DEPENDENT_WARNING = "sending a large query didn't trigger block on write"


def main(source, result_file, modules):
    sys.path.insert(0, source)
    import zpgpool
    from tests import testconfig
    from tests import testutils
    # After psycopg2's "error" filter, so that this one is consulted first.
    warnings.filterwarnings("default", message=LOAD_DEPENDENT_WARNING,
                            category=UserWarning)

    pools = {}
    counts = {"pooled": 0, "direct": 0, "handed_over": 0}
    return_errors = {}
    lent = {}   # id of a connection out of its pool: the test it went to
    seen = set()
    connect = testutils.ConnectingTestCase.connect

    def pool_for(dsn, kwargs):
        key = (dsn, tuple(sorted(kwargs.items())))
        if key not in pools:
            pools[key] = zpgpool.ConnectionPool(
                dsn, name="psycopg2-suite-%d" % len(pools), minconn=0,
                maxconn=20, timeout=10, connect_kwargs=kwargs or None)
        return pools[key]

    def pooled_connect(self, **kwargs):
        dsn = kwargs.pop("dsn", testconfig.dsn)
        factory = kwargs.get("connection_factory")
        if set(kwargs) - {"connection_factory", "cursor_factory"} \
                or getattr(factory, "__name__", "") == "BrokenConn":
            counts["direct"] += 1
            return connect(self, dsn=dsn, **kwargs)
        pool = pool_for(dsn, kwargs)
        conn = pool.getconn()
        counts["pooled"] += 1
        if id(conn) in seen:
            counts["handed_over"] += 1
        seen.add(id(conn))
        lent[id(conn)] = self.id()
        # Not in self._conns, which psycopg2's tearDown closes: a cleanup
        # returns it, after that tearDown, even one that skips its base's.
        self.addCleanup(give_back, self, pool, conn)
        return conn

    def give_back(test, pool, conn):
        # An error of putconn is recorded, not raised, so that it cannot
        # stop a test's other cleanups.
        del lent[id(conn)]
        try:
            pool.putconn(conn)
        except Exception as exc:
            return_errors[test.id()] = "%s: %s" % (type(exc).__name__, exc)

    testutils.ConnectingTestCase.connect = pooled_connect

    suite = unittest.TestSuite()
    for module in modules:
        suite.addTests(
            unittest.defaultTestLoader.loadTestsFromName("tests." + module))
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=1).run(suite)
    stats = [pool.stats() for pool in pools.values()]
    for pool in pools.values():
        pool.closeall()
    with open(result_file, "w") as f:
        json.dump({
            "ran": result.testsRun,
            "skipped": len(result.skipped),
            "failed": sorted(test.id() for test, _ in result.failures),
            "errors": sorted(test.id() for test, _ in result.errors),
            "counts": counts,
            "return_errors": return_errors,
            "in_use_at_end": sum(s["in_use"] for s in stats),
            "never_returned": sorted(lent.values()),
        }, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
