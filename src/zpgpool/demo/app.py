"""The WSGI application of ``zpgpool demo``: a list of notes.

It is written the way an application using zpgpool is written. Each view
finds the pool with ``getUtility(IConnectionPool, name="demo")``, takes the
thread's connection with ``.connection()`` and runs its SQL; it never
commits. pyramid_tm begins a transaction of the pool's transaction manager
for each request and commits it when the view returns, or aborts it when
the view raises, so a note inserted by a failing request is never saved.

The pages (no templates: the HTML is small enough to build here):

``GET /``
    The notes, newest first, with the server thread and the PostgreSQL
    backend that wrote each one, and a form to add one.
``POST /notes``
    Insert the note in the form field ``text``. Answers 201 with the note as
    JSON to a client that accepts JSON, else redirects to ``/``.
``GET /notes``
    The notes as JSON; ``?prefix=`` keeps those whose text starts with it.
``/fail``
    Insert a note (``?text=``), then raise: the response is a 500 and the
    transaction is aborted, so the note is not saved.
``GET /stats``
    The pool's ``stats()`` as JSON.
``GET /stats.html``, ``GET /stats/snapshot.json``
    zpgpool's live dashboard (zpgpool.dashboard), and the figures of every
    registered pool it reads, with their wait and hold time histograms.
``GET /metrics``
    The Prometheus metrics of every registered pool; a 501 that says what
    to install when prometheus_client is missing.
"""
import html
import threading

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPBadRequest
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.response import Response
from zope.component import getUtility

from zpgpool import dashboard
from zpgpool.interfaces import IConnectionPool


#: The name the demo's ZCML registers the pool under.
POOL_NAME = "demo"

#: The table of notes; created at start-up when missing.
TABLE = "zpgpool_demo_note"

#: The longest note accepted, in characters.
MAX_TEXT = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS zpgpool_demo_note (
    id serial PRIMARY KEY,
    text text NOT NULL,
    thread text NOT NULL,
    backend_pid integer NOT NULL DEFAULT pg_backend_pid(),
    created timestamptz NOT NULL DEFAULT now()
)
"""


class DemoFailure(Exception):
    """Raised by ``/fail`` on purpose, after it inserted a note."""


def get_pool():
    """Return the demo's pool, as every view of an application finds it."""
    return getUtility(IConnectionPool, name=POOL_NAME)


def create_schema(pool):
    """Create the notes table when it does not exist yet.

    Runs outside any request, so it takes a connection of its own with
    ``checkout()``, which commits when the block ends.
    """
    with pool.checkout() as conn:
        with conn.cursor() as cur:
            cur.execute(_SCHEMA)


# -- SQL ----------------------------------------------------------------------

def insert_note(text):
    """Insert a note in the current transaction and return it as a dict."""
    conn = get_pool().connection()
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO zpgpool_demo_note (text, thread) VALUES (%s, %s)"
            " RETURNING id, text, thread, backend_pid, created",
            (text, threading.current_thread().name))
        return _note(cur.fetchone())


def list_notes(prefix=None, limit=None):
    """Return the notes, newest first, as dicts."""
    conn = get_pool().connection()
    query = ("SELECT id, text, thread, backend_pid, created"
             " FROM zpgpool_demo_note")
    params = []
    if prefix:
        query += " WHERE left(text, length(%s)) = %s"
        params += [prefix, prefix]
    query += " ORDER BY id DESC"
    if limit is not None:
        query += " LIMIT %s"
        params.append(limit)
    with conn.cursor() as cur:
        cur.execute(query, params)
        return [_note(row) for row in cur.fetchall()]


def _note(row):
    id_, text, thread, pid, created = row
    return {"id": id_, "text": text, "thread": thread, "backend_pid": pid,
            "created": created.isoformat()}


# -- views --------------------------------------------------------------------

def _wants_json(request):
    offers = request.accept.acceptable_offers(["text/html",
                                               "application/json"])
    return bool(offers) and offers[0][0] == "application/json"


def home(request):
    notes = list_notes(limit=100)
    stats = get_pool().stats()
    rows = "".join(
        "<tr><td>%d</td><td>%s</td><td>%s</td><td>%d</td><td>%s</td></tr>"
        % (n["id"], html.escape(n["text"]), html.escape(n["thread"]),
           n["backend_pid"], html.escape(n["created"][:19]))
        for n in notes) or '<tr><td colspan="5">No notes yet.</td></tr>'
    body = """
<p>Each request runs in a transaction that pyramid_tm commits, or aborts when
the view fails. The pool <b>%(name)s</b> has %(size)d of at most
%(maxconn)d connections open (<a href="/stats.html">live stats</a>).</p>
<form method="post" action="/notes">
  <input name="text" size="40" maxlength="%(max)d" required autofocus>
  <button>Add a note</button>
</form>
<form method="post" action="/fail">
  <input name="text" size="40" maxlength="%(max)d"
         value="This note is inserted, then the request fails">
  <button>Add, then fail</button>
</form>
<table>
<tr><th>#</th><th>note</th><th>server thread</th><th>backend pid</th>
<th>created</th></tr>
%(rows)s
</table>
""" % {"name": html.escape(stats["name"]), "size": stats["size"],
       "maxconn": stats["maxconn"], "max": MAX_TEXT, "rows": rows}
    return _page("Notes", body)


def add_note(request):
    text = request.POST.get("text", "").strip()
    if not text or len(text) > MAX_TEXT:
        raise HTTPBadRequest("The form field 'text' must hold 1 to %d "
                             "characters." % MAX_TEXT)
    note = insert_note(text)
    if _wants_json(request):
        response = Response(json=note, status=201)
        response.location = request.route_url("notes")
        return response
    return HTTPSeeOther(location=request.route_url("home"))


def notes_json(request):
    return {"notes": list_notes(prefix=request.params.get("prefix"))}


def fail(request):
    text = request.params.get("text", "").strip() \
        or "This note must never be saved"
    note = insert_note(text[:MAX_TEXT])
    raise DemoFailure("inserted note %d, then failed on purpose" % note["id"])


def failure_view(exc, request):
    """Render DemoFailure; pyramid_tm still aborts the transaction."""
    body = """
<p>The view inserted a note and then raised <code>DemoFailure</code>
(%s). pyramid_tm aborted the request's transaction, so PostgreSQL rolled the
insert back: the note is not in the <a href="/">list</a>.</p>
""" % html.escape(str(exc))
    return _page("The request failed, on purpose", body, status=500)


def stats_json(request):
    return get_pool().stats()


def stats_page(request):
    return Response(dashboard.page(
        request.route_path("stats_snapshot"), title="zpgpool demo: pools",
        links=[("notes", request.route_path("home")),
               ("JSON", request.route_path("stats_snapshot")),
               ("Prometheus metrics", request.route_path("metrics"))]),
        content_type="text/html", charset="utf-8")


def stats_snapshot(request):
    return Response(dashboard.snapshot_json(), content_type="application/json",
                    charset="utf-8")


def metrics(request):
    status, body, content_type = dashboard.metrics()
    response = Response(body, status=status)
    # Set whole: Prometheus's type carries a version parameter.
    response.headers["Content-Type"] = content_type
    return response


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; }
table { border-collapse: collapse; margin-top: 1em; }
td, th { border-bottom: 1px solid #ccc; padding: .2em .8em; text-align: left; }
form { display: inline-block; margin-right: 1em; }
"""


def _page(title, body, status=200):
    text = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>zpgpool demo: %(title)s</title>
<style>%(style)s</style></head>
<body><h1>%(title)s</h1>
<nav><a href="/">notes</a> | <a href="/stats.html">pool stats</a></nav>
%(body)s
</body></html>
""" % {"title": html.escape(title), "style": _STYLE, "body": body}
    return Response(text, status=status, content_type="text/html",
                    charset="utf-8")


# -- the application ----------------------------------------------------------

def _transaction_manager(request):
    # pyramid_tm asks which transaction manager a request runs in: the one
    # whose transactions the pool's connections join.
    return get_pool().transaction_manager


def make_app():
    """Return the demo's WSGI application.

    The pool must be registered already (by loading ``demo.zcml``).
    """
    config = Configurator(settings={
        "tm.manager_hook": _transaction_manager,
    })
    config.include("pyramid_tm")
    config.add_route("home", "/")
    config.add_route("notes", "/notes")
    config.add_route("fail", "/fail")
    config.add_route("stats", "/stats")
    config.add_route("stats_page", "/stats.html")
    config.add_route("stats_snapshot", "/stats/snapshot.json")
    config.add_route("metrics", "/metrics")
    config.add_view(home, route_name="home", request_method="GET")
    config.add_view(add_note, route_name="notes", request_method="POST")
    config.add_view(notes_json, route_name="notes", request_method="GET",
                    renderer="json")
    config.add_view(fail, route_name="fail")
    config.add_view(failure_view, context=DemoFailure)
    config.add_view(stats_json, route_name="stats", renderer="json",
                    http_cache=0)
    config.add_view(stats_page, route_name="stats_page",
                    request_method="GET")
    config.add_view(stats_snapshot, route_name="stats_snapshot",
                    request_method="GET", http_cache=0)
    config.add_view(metrics, route_name="metrics", request_method="GET",
                    http_cache=0)
    return config.make_wsgi_app()
