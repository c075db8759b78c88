"""The figures of every registered pool, for the dashboard's JSON and the
Prometheus collector (metrics.py)."""
import time

from zope.component import getUtilitiesFor

from zpgpool.interfaces import IConnectionPool


def registered_pools():
    """(name, pool) for every ``IConnectionPool`` utility, by name."""
    return sorted(getUtilitiesFor(IConnectionPool), key=lambda item: item[0])


def snapshot(pools=registered_pools):
    """A JSON-able picture of ``pools`` now: each pool's ``stats()`` with
    its wait (and, when recorded, held) time histograms, median and p99."""
    found = []
    for name, pool in pools():
        stats = pool.stats()
        stats["utility_name"] = name
        stats["histograms"] = {key: histogram.as_dict()
                               for key, histogram in pool.histograms().items()}
        found.append(stats)
    return {"time": time.time(), "pools": found}
