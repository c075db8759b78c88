"""Prometheus metrics of zpgpool's pools: ``pip install 'zpgpool[metrics]'``.

``PoolCollector`` reports every pool registered as an ``IConnectionPool``
utility (or the pools it is given): gauges of the connection states,
counters of checkouts, waits, time-outs and connections opened, failed,
lost and discarded, and histograms of the time callers waited and of how
long connections were held. ``exposition()`` returns the text a
Prometheus server scrapes; the demo serves it at ``/metrics`` and Zope at
``@@zpgpool-metrics``.

Collecting turns on the held-time histogram of the pools it reports (a
little work at every return, off otherwise): the first scrape finds it
empty, later ones count what was returned since.
"""
from prometheus_client import CollectorRegistry
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.core import HistogramMetricFamily

from zpgpool.stats import registered_pools

# (stats key, metric name, help): counters, from pool.stats().
COUNTERS = (
    ("checkouts", "zpgpool_checkouts",
     "Connections handed out to callers."),
    ("waits", "zpgpool_waits",
     "Callers that had to wait for a connection."),
    ("timeouts", "zpgpool_timeouts",
     "Callers that gave up waiting (PoolTimeout)."),
    ("connections_opened", "zpgpool_connections_opened",
     "Connections opened to the server."),
    ("connections_failed", "zpgpool_connections_failed",
     "Connection attempts that failed."),
    ("connections_lost", "zpgpool_connections_lost",
     "Connections found dead (server restart, network)."),
    ("connections_discarded", "zpgpool_connections_discarded",
     "Connections closed by the pool: lost, aged out, idle, retired."),
    ("returned_bad", "zpgpool_returned_bad",
     "Connections returned with a transaction open or in error."),
)

# (histogram name, metric name, help).
HISTOGRAMS = (
    ("wait", "zpgpool_wait_seconds",
     "How long callers waited for a connection (callers that waited)."),
    ("held", "zpgpool_connection_held_seconds",
     "How long a connection was checked out, from checkout to return."),
)


class PoolCollector:
    """A prometheus_client collector for zpgpool pools.

    ``pools`` is a callable returning (name, pool) pairs; by default the
    pools registered as ``IConnectionPool`` utilities.
    """

    def __init__(self, pools=registered_pools):
        self.pools = pools

    def collect(self):
        states = GaugeMetricFamily(
            "zpgpool_connections",
            "Connections by state: in_use, bound_idle (kept by an idle "
            "thread), idle, connecting, free (room up to maxconn).",
            labels=["pool", "state"])
        waiting = GaugeMetricFamily(
            "zpgpool_waiting", "Callers waiting for a connection now.",
            labels=["pool"])
        limits = GaugeMetricFamily(
            "zpgpool_maxconn", "The pool's maxconn.", labels=["pool"])
        counters = [CounterMetricFamily(name, text, labels=["pool"])
                    for _key, name, text in COUNTERS]
        histograms = [HistogramMetricFamily(name, text, labels=["pool"])
                      for _key, name, text in HISTOGRAMS]
        for name, pool in self.pools():
            pool.record_held_times()
            stats = pool.stats()
            # Places being connected count against maxconn too.
            free = max(0, stats["maxconn"] - stats["size"]
                       - stats["connecting"])
            for state, value in (("in_use", stats["in_use"]),
                                 ("bound_idle", stats["bound_idle"]),
                                 ("idle", stats["idle"]),
                                 ("connecting", stats["connecting"]),
                                 ("free", free)):
                states.add_metric([name, state], value)
            waiting.add_metric([name], stats["waiting"])
            limits.add_metric([name], stats["maxconn"])
            for family, (key, _name, _text) in zip(counters, COUNTERS):
                family.add_metric([name], stats[key])
            snapshot = pool.histograms()
            for family, (key, _name, _text) in zip(histograms, HISTOGRAMS):
                histogram = snapshot[key]
                family.add_metric(
                    [name],
                    [("+Inf" if bound == float("inf") else repr(bound),
                      count) for bound, count in histogram.cumulative()],
                    histogram.sum)
        yield states
        yield waiting
        yield limits
        yield from counters
        yield from histograms


def exposition(pools=registered_pools):
    """The Prometheus text exposition of ``pools``, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pools))
    return generate_latest(registry), CONTENT_TYPE_LATEST
