"""Tests for zpgpool.metrics, zpgpool.stats and zpgpool.histogram.

The exposition is read back with prometheus_client's own parser, after
real checkouts, waits and time-outs against the server of POSTGRES_LAYER.
"""
import threading
import time
import unittest

import psycopg2.extensions
import transaction
import zope.component
import zope.component.testing
from prometheus_client.parser import text_string_to_metric_families

from zpgpool import ConnectionPool
from zpgpool import PoolTimeout
from zpgpool import metrics
from zpgpool import stats
from zpgpool.histogram import BOUNDS
from zpgpool.histogram import Histogram
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing import POSTGRES_LAYER

from tests.poolhelpers import close_pool
from tests.poolhelpers import start
from tests.poolhelpers import unique_name
from tests.poolhelpers import wait_for


def parse(pools=stats.registered_pools):
    """The exposition of ``pools`` as {sample name: {pool: [(labels,
    value)]}}, read by prometheus_client's parser."""
    body, content_type = metrics.exposition(pools)
    assert content_type.startswith("text/plain"), content_type
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, {}).setdefault(
                sample.labels["pool"], []).append(
                    (sample.labels, sample.value))
    return samples


def value(samples, name, pool, **labels):
    """The one value of sample ``name`` of ``pool`` with ``labels``."""
    [found] = [v for sample_labels, v in samples[name][pool]
               if all(sample_labels.get(k) == w for k, w in labels.items())]
    return found


def buckets(samples, name, pool):
    """(upper bound, cumulative count) pairs of a histogram, in order."""
    return [(float(labels["le"]), v)
            for labels, v in samples[name + "_bucket"][pool]]


class MetricsTestCase(unittest.TestCase):

    layer = POSTGRES_LAYER

    def _makeOne(self, **kw):
        kw.setdefault("name", unique_name("metrics"))
        kw.setdefault("minconn", 0)
        pool = ConnectionPool(self.layer.dsn, **kw)
        self.addCleanup(close_pool, self, pool)
        return pool

    def only(self, pool, name="p"):
        return lambda: [(name, pool)]


class GaugeTests(MetricsTestCase):

    def tearDown(self):
        transaction.abort()

    def test_a_gauge_per_state_adding_up_to_maxconn(self):
        pool = self._makeOne(maxconn=5)
        # One connection bound to this thread between transactions...
        cur = pool.connection().cursor()
        cur.execute("SELECT 1")
        transaction.commit()
        # ... one in use, two idle (each state its own count).
        held = pool.getconn()
        first, second = pool.getconn(), pool.getconn()
        pool.putconn(first)
        pool.putconn(second)
        samples = parse(self.only(pool))
        expected = {"in_use": 1, "bound_idle": 1, "idle": 2,
                    "connecting": 0, "free": 1}
        for state, count in expected.items():
            self.assertEqual(value(samples, "zpgpool_connections", "p",
                                   state=state), count, state)
            if state != "free":
                self.assertEqual(pool.stats()[state], count, state)
        self.assertEqual(sum(v for _labels, v in
                             samples["zpgpool_connections"]["p"]), 5)
        self.assertEqual(value(samples, "zpgpool_maxconn", "p"), 5)
        self.assertEqual(value(samples, "zpgpool_waiting", "p"), 0)
        pool.putconn(held)
        samples = parse(self.only(pool))
        self.assertEqual(value(samples, "zpgpool_connections", "p",
                               state="in_use"), 0)
        self.assertEqual(value(samples, "zpgpool_connections", "p",
                               state="idle"), 3)

    def test_a_place_being_connected_is_not_free(self):
        from tests.faulthelpers import TcpProxy
        from tests.poolhelpers import with_params
        params = psycopg2.extensions.parse_dsn(self.layer.dsn)
        proxy = TcpProxy((params.get("host", "127.0.0.1"),
                          int(params.get("port", 5432))))
        self.addCleanup(proxy.close)
        pool = ConnectionPool(
            with_params(self.layer.dsn, **proxy.dsn_params()),
            name=unique_name("metrics"), minconn=0, maxconn=3, timeout=30)
        self.addCleanup(close_pool, self, pool)
        proxy.silent()
        caller = start(self, lambda: pool.putconn(pool.getconn()))
        wait_for(lambda: pool.stats()["connecting"] == 1, "a connect")
        samples = parse(self.only(pool))
        self.assertEqual(value(samples, "zpgpool_connections", "p",
                               state="connecting"), 1)
        self.assertEqual(value(samples, "zpgpool_connections", "p",
                               state="free"), 2)
        self.assertEqual(sum(v for _labels, v in
                             samples["zpgpool_connections"]["p"]), 3)
        proxy.heal()
        caller.finish(self)


class CounterTests(MetricsTestCase):

    def test_checkouts_waits_and_timeouts(self):
        pool = self._makeOne(maxconn=1, timeout=0.2)
        for _ in range(4):
            pool.putconn(pool.getconn())
        # A caller that waits and gets the connection...
        conn = pool.getconn()
        waiter = start(self, lambda: pool.putconn(
            pool.getconn()), name="waiter")
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiting caller")
        samples = parse(self.only(pool))
        self.assertEqual(value(samples, "zpgpool_waiting", "p"), 1)
        pool.putconn(conn)
        waiter.finish(self)
        # ... and one that gives up.
        conn = pool.getconn()
        with self.assertRaises(PoolTimeout):
            pool.getconn()
        pool.putconn(conn)

        samples = parse(self.only(pool))
        figures = pool.stats()
        self.assertEqual(figures["checkouts"], 7)
        self.assertEqual(figures["waits"], 2)
        self.assertEqual(figures["timeouts"], 1)
        for key, name in (("checkouts", "zpgpool_checkouts_total"),
                          ("waits", "zpgpool_waits_total"),
                          ("timeouts", "zpgpool_timeouts_total"),
                          ("connections_opened",
                           "zpgpool_connections_opened_total"),
                          ("connections_failed",
                           "zpgpool_connections_failed_total"),
                          ("connections_lost",
                           "zpgpool_connections_lost_total"),
                          ("connections_discarded",
                           "zpgpool_connections_discarded_total"),
                          ("returned_bad", "zpgpool_returned_bad_total")):
            self.assertEqual(value(samples, name, "p"), figures[key], name)
        self.assertEqual(value(samples, "zpgpool_connections_opened_total",
                               "p"), 1)
        # Two callers waited, nobody waits now: the gauge is the present.
        self.assertEqual(value(samples, "zpgpool_waiting", "p"), 0)

        # The wait histogram: one observation per wait, buckets that add
        # up, the time-out's wait among them.
        self.assertEqual(value(samples, "zpgpool_wait_seconds_count", "p"),
                         2)
        self.assertGreater(value(samples, "zpgpool_wait_seconds_sum", "p"),
                           0.1)
        pairs = buckets(samples, "zpgpool_wait_seconds", "p")
        self.assertEqual([bound for bound, _count in pairs], list(BOUNDS))
        counts = [count for _bound, count in pairs]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(counts[-1], 2)
        # The format wants the last bucket spelled "+Inf", exactly.
        last_labels, _count = samples["zpgpool_wait_seconds_bucket"]["p"][-1]
        self.assertEqual(last_labels["le"], "+Inf")

    def test_returned_bad_and_discarded_are_counted_apart(self):
        pool = self._makeOne(maxconn=2)
        # Returned with its transaction still open: rolled back and kept.
        conn = pool.getconn()
        conn.cursor().execute("SELECT 1")
        self.assertEqual(conn.get_transaction_status(),
                         psycopg2.extensions.TRANSACTION_STATUS_INTRANS)
        pool.putconn(conn)
        samples = parse(self.only(pool))
        self.assertEqual(value(samples, "zpgpool_returned_bad_total", "p"), 1)
        self.assertEqual(
            value(samples, "zpgpool_connections_discarded_total", "p"), 0)
        self.assertEqual(value(samples, "zpgpool_connections", "p",
                               state="idle"), 1)
        # Closed by its caller: discarded, and nothing wrong with it.
        pool.putconn(pool.getconn(), close=True)
        pool.putconn(pool.getconn(), close=True)
        samples = parse(self.only(pool))
        self.assertEqual(value(samples, "zpgpool_returned_bad_total", "p"), 1)
        self.assertEqual(
            value(samples, "zpgpool_connections_discarded_total", "p"), 2)

    def test_a_connection_that_cannot_open(self):
        pool = ConnectionPool("host=127.0.0.1 port=1 connect_timeout=2",
                              name=unique_name("metrics"), minconn=0,
                              timeout=0.5)
        self.addCleanup(close_pool, self, pool)
        with self.assertRaises(Exception):
            pool.getconn()
        samples = parse(self.only(pool))
        self.assertGreaterEqual(
            value(samples, "zpgpool_connections_failed_total", "p"), 1)
        self.assertEqual(
            value(samples, "zpgpool_connections_opened_total", "p"), 0)
        self.assertEqual(value(samples, "zpgpool_connections", "p",
                               state="free"), pool.maxconn)


class ExpositionTests(MetricsTestCase):

    def test_every_family_has_its_type_and_a_help_text(self):
        # Prometheus reads the type from the TYPE line (a counter's
        # samples end in _total); the HELP line is what a dashboard shows
        # next to the graph.
        pool = self._makeOne()
        body, _content_type = metrics.exposition(self.only(pool))
        families = {family.name: family for family in
                    text_string_to_metric_families(body.decode("utf-8"))}
        expected = {"zpgpool_connections": "gauge",
                    "zpgpool_waiting": "gauge",
                    "zpgpool_maxconn": "gauge",
                    "zpgpool_checkouts": "counter",
                    "zpgpool_waits": "counter",
                    "zpgpool_timeouts": "counter",
                    "zpgpool_connections_opened": "counter",
                    "zpgpool_connections_failed": "counter",
                    "zpgpool_connections_lost": "counter",
                    "zpgpool_connections_discarded": "counter",
                    "zpgpool_returned_bad": "counter",
                    "zpgpool_wait_seconds": "histogram",
                    "zpgpool_connection_held_seconds": "histogram"}
        self.assertEqual({name: family.type
                          for name, family in families.items()}, expected)
        for name, family in families.items():
            self.assertTrue(family.documentation.strip(), name)


class HeldTimeTests(MetricsTestCase):

    def tearDown(self):
        transaction.abort()

    def test_recorded_from_the_first_collection_on(self):
        pool = self._makeOne(maxconn=2)
        pool.putconn(pool.getconn())
        self.assertEqual(pool.histograms()["held"].count, 0)
        samples = parse(self.only(pool))
        # Collecting turned recording on; what was returned before is not
        # in it.
        self.assertEqual(
            value(samples, "zpgpool_connection_held_seconds_count", "p"), 0)
        for _ in range(3):
            pool.putconn(pool.getconn())
        # A transaction's connection, kept by its thread: held until then.
        pool.connection().cursor().execute("SELECT 1")
        transaction.commit()
        samples = parse(self.only(pool))
        self.assertEqual(
            value(samples, "zpgpool_connection_held_seconds_count", "p"), 4)
        counts = [count for _bound, count in
                  buckets(samples, "zpgpool_connection_held_seconds", "p")]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(counts[-1], 4)
        self.assertEqual(pool.histograms()["held"].count, 4)

    def test_a_waiters_hold_starts_when_it_gets_the_connection(self):
        pool = self._makeOne(maxconn=1)
        pool.record_held_times()
        conn = pool.getconn()
        released = threading.Event()
        waiter = start(self, lambda: pool.putconn(pool.getconn()),
                       name="waiter")
        wait_for(lambda: pool.stats()["waiting"] == 1, "a waiting caller")
        # Held for at least a second while the other waits (a timer, so
        # that the wait is long whatever this thread does meanwhile).
        timer = threading.Timer(1.0, lambda: (pool.putconn(conn),
                                              released.set()))
        timer.start()
        self.addCleanup(timer.cancel)
        self.assertTrue(released.wait(30))
        waiter.finish(self)
        held = pool.histograms()["held"]
        self.assertEqual(held.count, 2)
        # Ours held it a second; the waiter held it for no time at all,
        # however long it waited.
        self.assertGreaterEqual(held.sum, 1.0)
        below = dict(held.cumulative())[0.5]
        self.assertEqual(below, 1, held.as_dict())


    def test_a_threads_hold_starts_at_each_transaction(self):
        # Between its transactions a thread's connection is parked: kept
        # for it, but not held. Each transaction is one hold of its own.
        pool = self._makeOne(maxconn=1)
        pool.record_held_times()
        for parked_for in (1.5, 0):
            transaction.begin()
            pool.connection().cursor().execute("SELECT 1")
            transaction.commit()
            time.sleep(parked_for)
        held = pool.histograms()["held"]
        self.assertEqual(held.count, 2)
        self.assertLess(held.sum, 1.5, held.as_dict())

    def test_histograms_are_copies(self):
        # What histograms() returned is a picture of that moment: later
        # waits and holds change the pool's histograms, not the picture.
        pool = self._makeOne(maxconn=1, timeout=0)
        pool.record_held_times()
        conn = pool.getconn()
        with self.assertRaises(PoolTimeout):
            pool.getconn()
        pool.putconn(conn)
        before = pool.histograms()
        self.assertEqual((before["wait"].count, before["held"].count), (1, 1))
        conn = pool.getconn()
        with self.assertRaises(PoolTimeout):
            pool.getconn()
        pool.putconn(conn)
        self.assertEqual((before["wait"].count, before["held"].count), (1, 1))
        after = pool.histograms()
        self.assertEqual((after["wait"].count, after["held"].count), (2, 2))


class RegistryTests(MetricsTestCase):

    def setUp(self):
        zope.component.testing.setUp()

    def tearDown(self):
        zope.component.testing.tearDown()

    def test_pools_registered_as_utilities(self):
        alpha = self._makeOne(maxconn=3)
        beta = self._makeOne(maxconn=2)
        zope.component.provideUtility(alpha, IConnectionPool, name="alpha")
        zope.component.provideUtility(beta, IConnectionPool, name="beta")
        for _ in range(2):
            alpha.putconn(alpha.getconn())
        beta.putconn(beta.getconn())

        samples = parse()
        self.assertEqual(set(samples["zpgpool_checkouts_total"]),
                         {"alpha", "beta"})
        self.assertEqual(value(samples, "zpgpool_checkouts_total", "alpha"),
                         2)
        self.assertEqual(value(samples, "zpgpool_checkouts_total", "beta"),
                         1)
        self.assertEqual(value(samples, "zpgpool_maxconn", "alpha"), 3)
        self.assertEqual(value(samples, "zpgpool_maxconn", "beta"), 2)

        picture = stats.snapshot()
        self.assertEqual([p["utility_name"] for p in picture["pools"]],
                         ["alpha", "beta"])
        self.assertEqual([p["name"] for p in picture["pools"]],
                         [alpha.name, beta.name])
        self.assertEqual(picture["pools"][0]["checkouts"], 2)
        self.assertEqual(set(picture["pools"][0]["histograms"]),
                         {"wait", "held"})

        zope.component.getSiteManager().unregisterUtility(
            beta, IConnectionPool, name="beta")
        self.assertEqual(set(parse()["zpgpool_checkouts_total"]), {"alpha"})

    def test_no_pool_registered(self):
        body, _content_type = metrics.exposition()
        families = {f.name: f for f in text_string_to_metric_families(
            body.decode("utf-8"))}
        self.assertIn("zpgpool_connections", families)
        self.assertEqual(families["zpgpool_connections"].samples, [])
        self.assertEqual(stats.snapshot()["pools"], [])


class HistogramTests(unittest.TestCase):

    def test_a_value_on_a_bound_is_in_that_bucket(self):
        histogram = Histogram()
        histogram.record(0.001)
        histogram.record(0.0011)
        cumulative = dict(histogram.cumulative())
        self.assertEqual(cumulative[0.0005], 0)
        self.assertEqual(cumulative[0.001], 1)
        self.assertEqual(cumulative[0.0025], 2)
        self.assertEqual(histogram.count, 2)
        self.assertAlmostEqual(histogram.sum, 0.0021)

    def test_quantiles_interpolate_within_a_bucket(self):
        histogram = Histogram()
        for _ in range(100):
            histogram.record(0.003)          # in (0.0025, 0.005]
        self.assertAlmostEqual(histogram.quantile(0.5), 0.00375)
        self.assertAlmostEqual(histogram.quantile(1), 0.005)
        histogram.record(1000.0)             # beyond the last bound
        self.assertEqual(histogram.quantile(1), 60.0)
        data = histogram.as_dict()
        self.assertEqual(data["count"], 101)
        self.assertEqual(data["bounds"][-1], "+Inf")
        self.assertEqual(len(data["counts"]), len(BOUNDS))
        self.assertAlmostEqual(data["p50"], 0.0025 + 0.0025 * 50.5 / 100)
        self.assertAlmostEqual(data["p99"], 0.0025 + 0.0025 * 99.99 / 100)

    def test_no_observations(self):
        histogram = Histogram()
        self.assertIsNone(histogram.quantile(0.5))
        self.assertEqual(histogram.as_dict()["p99"], None)

    def test_bad_quantile(self):
        for q in (0, -0.5, 1.5):
            with self.assertRaises(ValueError) as caught:
                Histogram().quantile(q)
            self.assertIn("above 0 and at most 1, got %r" % q,
                          str(caught.exception))

    def test_snapshot_is_a_copy(self):
        histogram = Histogram(bounds=(1.0, 2.0))
        self.assertEqual(histogram.bounds, (1.0, 2.0, float("inf")))
        histogram.record(1.5)
        copy = histogram.snapshot()
        histogram.record(0.5)
        self.assertEqual(copy.counts, [0, 1, 0])
        self.assertEqual(histogram.counts, [1, 1, 0])
