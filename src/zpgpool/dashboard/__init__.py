"""zpgpool's live dashboard, and the data it and Prometheus read.

The dashboard is one HTML page (``dashboard.html`` here, with
``dashboard.css`` and ``dashboard.js`` written into it, so that it is a
single response that needs nothing from elsewhere, not even a network)
that polls a JSON URL every second and draws every registered pool: its
connections by state, checkouts and waits per second over the last two
minutes, wait and hold times, and its counters.

A web framework serves three things, each from one function here:

``page(source)``
    The page, reading its data from the URL ``source``.
``snapshot_json()``
    That data: ``zpgpool.stats.snapshot()`` as JSON.
``metrics()``
    The Prometheus text of ``zpgpool.metrics``, or a 501 answer saying how
    to install it when prometheus_client is missing.

The demo serves them at ``/stats.html``, ``/stats/snapshot.json`` and
``/metrics``; Zope at ``@@zpgpool-stats``, ``@@zpgpool-stats.json`` and
``@@zpgpool-metrics`` (zpgpool.zope.browser).
"""
import html
import json
import re
from importlib import resources

from zpgpool.stats import registered_pools
from zpgpool.stats import snapshot

#: Content types of the three answers.
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

#: The body of ``metrics()``'s 501 answer.
METRICS_MISSING = (
    "Prometheus metrics need the prometheus_client package, which is not "
    "installed here: pip install 'zpgpool[metrics]'\n")


_MARKER = re.compile(r"\{\{(\w+)\}\}")


def _asset(name):
    return resources.files(__name__).joinpath(name).read_text("utf-8")


def page(source, title="zpgpool pools", links=(), interval=1.0):
    """Return the dashboard's HTML, reading its data from ``source``.

    ``source`` is the URL of ``snapshot_json()``'s answer, absolute or
    relative to the page's. ``links`` are (text, URL) pairs shown in the
    page's corner (the Prometheus metrics, the JSON). ``interval`` is how
    often the page polls, in seconds.
    """
    if not source:
        raise ValueError("the dashboard needs the URL of its data, got %r"
                         % (source,))
    if not interval > 0:
        raise ValueError("the dashboard's polling interval must be above "
                         "0 seconds, got %r" % (interval,))
    text = _asset("dashboard.html")
    values = {
        "title": html.escape(title),
        "source": html.escape(source),
        "interval": str(int(interval * 1000)),
        "links": " \u00b7 ".join(
            '<a href="%s">%s</a>' % (html.escape(url), html.escape(label))
            for label, url in links),
        "style": _asset("dashboard.css"),
        "script": _asset("dashboard.js"),
    }
    # One pass over the template: what is written in is not read again.
    return _MARKER.sub(lambda match: values[match.group(1)], text)


def snapshot_json(pools=registered_pools):
    """Return the JSON text the dashboard reads: every pool's figures.

    Like a Prometheus scrape, the first call turns on the recording of
    how long connections are held, which the dashboard shows.
    """
    for _name, pool in pools():
        pool.record_held_times()
    return json.dumps(snapshot(pools))


def metrics(pools=registered_pools):
    """Return (HTTP status, body bytes, content type) of the Prometheus
    metrics of ``pools``: 200 and the text exposition, or 501 and
    ``METRICS_MISSING`` when prometheus_client is not installed."""
    # Imported here, not at the top: prometheus_client is optional (the
    # metrics extra), and the page and its JSON work without it.
    try:
        from zpgpool.metrics import exposition
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "prometheus_client":
            raise
        return 501, METRICS_MISSING.encode("utf-8"), TEXT_TYPE
    body, content_type = exposition(pools)
    return 200, body, content_type
