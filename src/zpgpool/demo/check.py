"""The scripted session of ``zpgpool demo --check``.

It talks to the running demo over real HTTP, as a browser would, and checks
what a user of zpgpool relies on: concurrent requests each commit their own
work, a failing request leaves nothing behind, and the pool's statistics add
up once the requests are done. Each step prints ``ok`` or ``FAIL`` and why.
"""
import concurrent.futures
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request


#: Seconds a single request of the check may take.
REQUEST_TIMEOUT = 30.0


class StepFailed(Exception):
    """A step of the session did not see what it expected."""


class Session:
    """A client of the demo at ``url``, and the steps of the check."""

    def __init__(self, url, clients=8, notes=24, out=None):
        self.url = url.rstrip("/")
        self.clients = clients
        self.notes = notes
        self.out = out
        # Notes of this run start with a marker of their own, so that the
        # check also works against a database holding earlier notes.
        self.marker = "check-%s" % secrets.token_hex(4)
        self.failures = 0
        self.steps = 0

    # -- HTTP -----------------------------------------------------------------

    def request(self, path, data=None, accept="application/json"):
        """Return (status, content type, body text) of one request."""
        body = None
        if data is not None:
            body = urllib.parse.urlencode(data).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
                return (resp.status, resp.headers.get_content_type(),
                        resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            with exc:
                return (exc.code, exc.headers.get_content_type(),
                        exc.read().decode("utf-8", "replace"))

    def get_json(self, path):
        status, ctype, text = self.request(path)
        if status != 200 or ctype != "application/json":
            raise StepFailed("GET %s answered %d %s" % (path, status, ctype))
        return json.loads(text)

    # -- running --------------------------------------------------------------

    def run(self):
        """Run every step; return True when all passed."""
        for step in (self.step_home, self.step_concurrent_notes,
                     self.step_listed, self.step_fail, self.step_stats,
                     self.step_stats_page):
            self.steps += 1
            title = step.__doc__.strip().splitlines()[0]
            try:
                detail = step()
            except StepFailed as exc:
                self.failures += 1
                self.say("FAIL  %s: %s" % (title, exc))
            except (OSError, ValueError) as exc:
                # The server went away, or answered nonsense.
                self.failures += 1
                self.say("FAIL  %s: %s: %s"
                         % (title, type(exc).__name__, exc))
            else:
                self.say("ok    %s%s" % (title, " (%s)" % detail
                                         if detail else ""))
        return self.failures == 0

    def say(self, line):
        print(line, file=self.out, flush=True)

    # -- the steps ------------------------------------------------------------

    def step_home(self):
        """GET / shows the notes page"""
        status, ctype, text = self.request("/", accept="text/html")
        if status != 200 or ctype != "text/html" or "<h1>Notes</h1>" \
                not in text:
            raise StepFailed("answered %d %s" % (status, ctype))

    def step_concurrent_notes(self):
        """POST /notes from several clients at once"""
        texts = ["%s note %d" % (self.marker, i) for i in range(self.notes)]

        def add(text):
            status, ctype, body = self.request("/notes", {"text": text})
            if status != 201 or ctype != "application/json":
                return "%r answered %d %s" % (text, status, ctype)
            if json.loads(body).get("text") != text:
                return "%r came back as %s" % (text, body)
            return None

        with concurrent.futures.ThreadPoolExecutor(self.clients) as pool:
            errors = [e for e in pool.map(add, texts) if e]
        if errors:
            raise StepFailed("%d of %d failed; first: %s"
                             % (len(errors), len(texts), errors[0]))
        return "%d notes from %d clients" % (len(texts), self.clients)

    def step_listed(self):
        """GET /notes lists every note once"""
        notes = self.get_json("/notes?" + urllib.parse.urlencode(
            {"prefix": self.marker + " note"}))["notes"]
        texts = sorted(n["text"] for n in notes)
        expected = sorted("%s note %d" % (self.marker, i)
                          for i in range(self.notes))
        if texts != expected:
            missing = sorted(set(expected) - set(texts))
            raise StepFailed("expected %d notes, got %d (missing: %s)" % (
                len(expected), len(texts), ", ".join(missing) or "none"))
        threads = {n["thread"] for n in notes}
        backends = {n["backend_pid"] for n in notes}
        return "written by %d server threads over %d connections" % (
            len(threads), len(backends))

    def step_fail(self):
        """/fail inserts, raises, and leaves nothing behind"""
        text = "%s failed" % self.marker
        status, _ctype, _body = self.request("/fail", {"text": text})
        if status != 500:
            raise StepFailed("expected 500, got %d" % status)
        left = self.get_json("/notes?" + urllib.parse.urlencode(
            {"prefix": text}))["notes"]
        if left:
            raise StepFailed("the note of the failed request was committed:"
                             " %r" % left)
        return "500, transaction aborted"

    def step_stats(self):
        """GET /stats adds up after the requests"""
        stats = self.get_json("/stats")
        problems = []
        if stats["in_use"] != 0:
            problems.append("in_use is %d, not 0" % stats["in_use"])
        if stats["size"] > stats["maxconn"]:
            problems.append("size %d is above maxconn %d"
                            % (stats["size"], stats["maxconn"]))
        parts = stats["idle"] + stats["bound_idle"] + stats["in_use"]
        if stats["size"] != parts:
            problems.append("size %d != idle %d + bound_idle %d + in_use %d"
                            % (stats["size"], stats["idle"],
                               stats["bound_idle"], stats["in_use"]))
        if stats["timeouts"]:
            problems.append("%d callers timed out" % stats["timeouts"])
        if stats["waiting"]:
            problems.append("%d callers still waiting" % stats["waiting"])
        if problems:
            raise StepFailed("; ".join(problems))
        return "size %d <= maxconn %d, in_use 0, %d checkouts, %d waits" % (
            stats["size"], stats["maxconn"], stats["checkouts"],
            stats["waits"])

    def step_stats_page(self):
        """GET /stats.html shows the dashboard, fed by /stats/snapshot.json"""
        status, ctype, text = self.request("/stats.html", accept="text/html")
        if status != 200 or ctype != "text/html" \
                or 'data-source="/stats/snapshot.json"' not in text:
            raise StepFailed("answered %d %s" % (status, ctype))
        data = self.get_json("/stats/snapshot.json")
        names = [pool.get("utility_name") for pool in data.get("pools", ())]
        if "demo" not in names:
            raise StepFailed("/stats/snapshot.json has no pool 'demo', only "
                             "%s" % (", ".join(map(repr, names)) or "none"))
        return "%d pool%s" % (len(names), "" if len(names) == 1 else "s")


def run_check(url, clients=8, notes=24, out=None):
    """Run the scripted session against the demo at ``url``.

    Print each step to ``out`` (default: standard output) and return True
    when every step passed.
    """
    return Session(url, clients=clients, notes=notes, out=out).run()
