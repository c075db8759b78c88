"""Tests for zpgpool.dashboard: the page, its JSON and the metrics answer,
as the demo serves them, as Zope serves them (to managers only), and as a
real browser shows them.

The browser is Debian's headless Chromium, driven over the DevTools
protocol (tests/browserhelpers.py); a machine without it fails these tests
with a message naming the package.
"""
import json
import os
import sys
import threading
import unittest
import unittest.mock

import transaction
import webtest
import zope.component
import zope.component.testing
from prometheus_client.parser import text_string_to_metric_families

from zpgpool import ConnectionPool
from zpgpool import cli
from zpgpool import dashboard
from zpgpool.demo import app as demo_app
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing import POSTGRES_LAYER

from tests import browserhelpers
from tests.browserhelpers import Browser
from tests.poolhelpers import WAIT
from tests.poolhelpers import close_pool
from tests.poolhelpers import wait_for
from tests.test_demo import load_demo_zcml
from tests.zsqlhelpers import MANAGER
from tests.zsqlhelpers import ZSQL_LAYER


def without_prometheus_client():
    """sys.modules as on a machine without prometheus_client (None makes
    an import fail, as a missing package does; it cannot be uninstalled
    for one test)."""
    patch = unittest.mock.patch.dict(sys.modules)
    patch.start()
    sys.modules.pop("zpgpool.metrics", None)
    sys.modules["prometheus_client"] = None
    return patch


def metric_pools(text):
    """The pool labels of the exposition ``text``, read by
    prometheus_client's parser."""
    return {sample.labels["pool"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples}


class PageTests(unittest.TestCase):
    """The page and the answers, without a server."""

    def test_the_page_is_one_self_contained_document(self):
        text = dashboard.page("/data?a=1&b=2", title="Pools <of> mine",
                              links=[("metrics", "/m?x=<1>")], interval=0.5)
        self.assertIn('data-source="/data?a=1&amp;b=2"', text)
        self.assertIn('data-interval="500"', text)
        self.assertIn('<a href="/m?x=&lt;1&gt;">metrics</a>', text)
        self.assertIn("<title>Pools &lt;of&gt; mine</title>", text)
        self.assertNotIn("{{", text)
        # The script and the style are in the page; nothing is loaded
        # from elsewhere.
        self.assertIn("function drawChart(", text)
        self.assertIn(".zp-bar .in_use", text)
        self.assertNotIn("src=", text)
        self.assertNotIn("http", text.replace(
            "http://www.w3.org/2000/svg", ""))

    def test_bad_arguments(self):
        with self.assertRaises(ValueError) as caught:
            dashboard.page("")
        self.assertEqual(str(caught.exception),
                         "the dashboard needs the URL of its data, got ''")
        with self.assertRaises(ValueError) as caught:
            dashboard.page("/data", interval=0)
        self.assertEqual(str(caught.exception),
                         "the dashboard's polling interval must be above 0 "
                         "seconds, got 0")

    def test_metrics_without_prometheus_client(self):
        patch = without_prometheus_client()
        try:
            status, body, content_type = dashboard.metrics(lambda: [])
        finally:
            patch.stop()
        self.assertEqual(status, 501)
        self.assertEqual(content_type, "text/plain; charset=utf-8")
        self.assertIn(b"pip install 'zpgpool[metrics]'", body)

    def test_other_import_errors_are_not_hidden(self):
        with unittest.mock.patch.dict(sys.modules,
                                      {"zpgpool.metrics": None}):
            with self.assertRaises(ImportError) as caught:
                dashboard.metrics(lambda: [])
        self.assertEqual(caught.exception.name, "zpgpool.metrics")

    def test_missing_chromium_is_named(self):
        with unittest.mock.patch.dict(os.environ, {"PATH": "/nonexistent"}):
            os.environ.pop("ZPGPOOL_CHROMIUM", None)
            with self.assertRaises(browserhelpers.BrowserError) as caught:
                browserhelpers.find_chromium()
        self.assertIn("apt-get install chromium", str(caught.exception))


class DemoTests(unittest.TestCase):
    """The demo's /stats.html, /stats/snapshot.json and /metrics."""

    layer = POSTGRES_LAYER

    def setUp(self):
        zope.component.testing.setUp()
        self.pool = load_demo_zcml(self.layer.new_database("zpgpool_dash"))
        self.app = webtest.TestApp(demo_app.make_app())

    def tearDown(self):
        transaction.abort()
        self.pool.close(timeout=0)
        zope.component.testing.tearDown()

    def test_stats_html_is_the_dashboard(self):
        page = self.app.get("/stats.html")
        self.assertEqual(page.content_type, "text/html")
        self.assertIn('data-source="/stats/snapshot.json"', page.text)
        self.assertIn('<a href="/metrics">Prometheus metrics</a>', page.text)

    def test_snapshot_json(self):
        self.pool.putconn(self.pool.getconn())
        response = self.app.get("/stats/snapshot.json")
        self.assertEqual(response.content_type, "application/json")
        self.assertIn("no-store", response.headers["Cache-Control"])
        [figures] = response.json["pools"]
        self.assertEqual(figures["utility_name"], "demo")
        self.assertEqual(figures["checkouts"],
                         self.pool.stats()["checkouts"])
        self.assertGreaterEqual(figures["checkouts"], 1)
        self.assertEqual(figures["histograms"]["wait"]["count"],
                         figures["waits"])
        self.assertEqual(figures["histograms"]["wait"]["bounds"][-1], "+Inf")
        # Serving the dashboard turned on the held-time histogram.
        self.pool.putconn(self.pool.getconn())
        held = self.app.get("/stats/snapshot.json").json[
            "pools"][0]["histograms"]["held"]
        self.assertEqual(held["count"], 1)
        self.assertIsNotNone(held["p50"])

    def test_metrics(self):
        response = self.app.get("/metrics")
        self.assertTrue(response.headers["Content-Type"].startswith(
            "text/plain; version="), response.headers["Content-Type"])
        self.assertEqual(metric_pools(response.text), {"demo"})

    def test_metrics_without_prometheus_client(self):
        patch = without_prometheus_client()
        try:
            response = self.app.get("/metrics", status=501)
        finally:
            patch.stop()
        self.assertEqual(response.headers["Content-Type"],
                         "text/plain; charset=utf-8")
        self.assertIn("pip install 'zpgpool[metrics]'", response.text)


class BrowserTests(unittest.TestCase):
    """The demo's dashboard in headless Chromium, with two pools."""

    layer = POSTGRES_LAYER

    def setUp(self):
        zope.component.testing.setUp()
        self.addCleanup(zope.component.testing.tearDown)
        dsn = self.layer.new_database("zpgpool_dash")
        self.pool = load_demo_zcml(dsn)
        self.addCleanup(self.pool.close, timeout=0)
        self.other = ConnectionPool(dsn, name="reports", minconn=0,
                                    maxconn=5)
        self.addCleanup(close_pool, self, self.other)
        zope.component.provideUtility(self.other, IConnectionPool,
                                      name="reports")
        self.web = self.serve(0)
        self.browser = Browser()
        self.addCleanup(self.browser.close)

    def serve(self, port):
        web = cli._WebServer(demo_app.make_app(), "127.0.0.1", port, 4)
        web.start()
        # Unless the test stopped it already.
        self.addCleanup(lambda: web.thread.is_alive() and web.stop())
        return web

    def card(self, pool, expression):
        """Evaluate ``expression`` on the card of ``pool`` (``card``)."""
        return self.browser.evaluate(
            "(function (card) { return %s; })(document.querySelector("
            "'[data-pool=\"%s\"]'))" % (expression, pool))

    def figure(self, pool, key):
        """The text of one figure of ``pool``'s card."""
        return self.card(pool, "card.querySelector('[data-figure=%s]')"
                         ".textContent" % key)

    def chart(self, pool, series):
        return self.card(pool, "(function (svg) { return {"
                         "points: svg.querySelector('polyline')"
                         ".getAttribute('points'), count: "
                         "Number(svg.dataset.count), last: svg.dataset.last"
                         "}; })(card.querySelector('[data-series=%s] svg'))"
                         % series)

    def load(self, pool, stop, threads=6):
        """Threads taking and returning connections of ``pool`` (more of
        them than its maxconn, so that some wait) until ``stop`` is set."""
        def work():
            while not stop.is_set():
                conn = pool.getconn()
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_sleep(0.002)")
                    conn.rollback()
                finally:
                    pool.putconn(conn)
        workers = [threading.Thread(target=work, daemon=True)
                   for _ in range(threads)]
        for worker in workers:
            worker.start()
        return workers

    def test_pools_drawn_and_series_moving_under_load(self):
        self.browser.open(self.web.url + "stats.html")
        self.browser.wait_for(
            "document.querySelectorAll('svg.zp-bar').length === 2")
        self.assertEqual(self.browser.evaluate(
            "Array.from(document.querySelectorAll('.zp-pool'))"
            ".map(function (n) { return n.dataset.pool; })"),
            ["demo", "reports"])
        self.assertEqual(self.card("reports", "card.querySelector("
                                   "'rect.free').dataset.count"), "5")
        self.browser.wait_for("document.querySelector('.zp-status')"
                              ".classList.contains('live')")
        before = self.chart("demo", "checkouts")

        stop = threading.Event()
        workers = self.load(self.pool, stop)
        try:
            # Both series of the loaded pool rise above zero.
            for series in ("checkouts", "waits"):
                self.browser.wait_for(
                    "Number(document.querySelector('[data-pool=\"demo\"] "
                    "[data-series=%s] svg').dataset.last) > 0" % series,
                    WAIT, "%s per second above 0" % series)
        finally:
            stop.set()
            for worker in workers:
                worker.join(WAIT)
        self.assertFalse(any(worker.is_alive() for worker in workers))
        after = self.chart("demo", "checkouts")
        self.assertNotEqual(after["points"], before["points"])
        self.assertGreater(after["count"], before["count"])
        # The idle pool's series stays at zero.
        self.assertEqual(float(self.chart("reports", "checkouts")["last"]),
                         0.0)

        # Once the load is over, the figures shown are the pool's.
        figures = self.pool.stats()
        wait_for(lambda: self.figure("demo", "checkouts")
                 == str(figures["checkouts"]), "the checkouts shown")
        self.assertEqual(self.figure("demo", "waits"), str(figures["waits"]))
        for key in ("wait_p50", "wait_p99", "held_p50", "held_p99"):
            self.assertRegex(self.figure("demo", key),
                             r"^[\d.]+ (\u00b5s|ms|s)$", key)
        bar = self.card("demo", "card.querySelector('svg.zp-bar')"
                        ".getAttribute('aria-label')")
        self.assertIn("0 in use", bar)
        self.assertEqual(self.browser.errors, [])

    def test_disconnected_then_live_again(self):
        self.browser.open(self.web.url + "stats.html")
        self.browser.wait_for("document.querySelector('.zp-status')"
                              ".classList.contains('live')")
        port = self.web.server.effective_port
        self.web.stop()
        status = self.browser.wait_for(
            "document.body.classList.contains('disconnected') && "
            "document.querySelector('.zp-status').textContent")
        self.assertIn("disconnected", status)
        # The cards stay, dimmed, and the page keeps trying.
        self.assertEqual(self.browser.evaluate(
            "document.querySelectorAll('svg.zp-bar').length"), 2)
        self.serve(port)
        self.browser.wait_for("!document.body.classList.contains("
                              "'disconnected')", WAIT, "live again")
        # The refused requests are the browser's network errors; the
        # page's own script raised nothing and logged no error.
        script_errors = [e for e in self.browser.errors
                         if not e.startswith("network:")]
        self.assertEqual(script_errors, [])


class ZopeTests(unittest.TestCase):
    """The views of zpgpool.zope in the Zope site of ZSQL_LAYER."""

    layer = ZSQL_LAYER

    VIEWS = ("@@zpgpool-stats", "@@zpgpool-stats.json", "@@zpgpool-metrics")

    @property
    def zope(self):
        return self.layer.zope

    def test_managers_see_the_dashboard(self):
        page = self.zope.request("@@zpgpool-stats")
        self.assertEqual(page.status, 200, page)
        self.assertIn('data-source="%s/@@zpgpool-stats.json"'
                      % self.zope.url, page.text)

    def test_the_json_has_the_sites_pools(self):
        before = self.zope.request("@@zpgpool-stats.json")
        self.assertEqual(before.status, 200, before)
        names = [p["utility_name"] for p in before.json["pools"]]
        self.assertEqual(names, sorted(names))
        self.assertTrue({"example", "example2pc", "exampleserial"}
                        <= set(names), names)
        # A ZSQL Method on the pool "example" checks a connection out.
        result = self.zope.request("site/named/page_list?kind=fruit")
        self.assertEqual(result.status, 200, result)
        after = self.zope.request("@@zpgpool-stats.json")
        [old] = [p for p in before.json["pools"]
                 if p["utility_name"] == "example"]
        [new] = [p for p in after.json["pools"]
                 if p["utility_name"] == "example"]
        self.assertGreater(new["checkouts"], old["checkouts"])

    def test_metrics(self):
        result = self.zope.request("@@zpgpool-metrics")
        self.assertEqual(result.status, 200, result)
        self.assertTrue({"example", "example2pc"}
                        <= metric_pools(result.text))

    def test_anonymous_users_are_refused(self):
        for view in self.VIEWS:
            result = self.zope.request(view, auth=None)
            self.assertIn(result.status, (401, 302), (view, result))
            self.assertNotIn("zpgpool_checkouts", result.text)
            self.assertNotIn("utility_name", result.text)

    def test_no_view_elsewhere(self):
        result = self.zope.request("site/@@zpgpool-stats")
        self.assertEqual(result.status, 404, result)
