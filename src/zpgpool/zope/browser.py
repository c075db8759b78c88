"""zpgpool's dashboard in Zope: views of the application root, for
managers (``zope2.ViewManagementScreens``, registered in configure.zcml).

``@@zpgpool-stats``
    The live dashboard of every pool registered in the site
    (zpgpool.dashboard).
``@@zpgpool-stats.json``
    The figures it reads: ``zpgpool.stats.snapshot()`` as JSON.
``@@zpgpool-metrics``
    The pools' Prometheus metrics, for a scraper that logs in as a
    manager; a 501 that says what to install when prometheus_client is
    missing.
"""
from zpgpool import dashboard


class _View:

    def __init__(self, context, request):
        self.context = context
        self.request = request

    def answer(self, body, content_type, status=200):
        response = self.request.response
        response.setStatus(status)
        response.setHeader("Content-Type", content_type)
        # Figures of now: no cache may keep them.
        response.setHeader("Cache-Control", "no-store")
        return body


class StatsPage(_View):
    """The dashboard, reading ``@@zpgpool-stats.json`` every second."""

    def __call__(self):
        base = self.context.absolute_url()
        return self.answer(
            dashboard.page(base + "/@@zpgpool-stats.json",
                           title="zpgpool pools",
                           links=[("ZMI", base + "/manage_main"),
                                  ("JSON", base + "/@@zpgpool-stats.json"),
                                  ("Prometheus metrics",
                                   base + "/@@zpgpool-metrics")]),
            dashboard.HTML_TYPE)


class StatsJSON(_View):
    """Every registered pool's figures, as JSON."""

    def __call__(self):
        return self.answer(dashboard.snapshot_json(), dashboard.JSON_TYPE)


class Metrics(_View):
    """The Prometheus text exposition of every registered pool."""

    def __call__(self):
        status, body, content_type = dashboard.metrics()
        return self.answer(body, content_type, status)
