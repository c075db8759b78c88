"""Headless Chromium, driven over the DevTools protocol, for the
dashboard's tests and its screenshot (docs/dashboard.png).

Chromium is started with ``--remote-debugging-pipe``: it reads protocol
commands from its file descriptor 3 and writes answers and events to its
descriptor 4, each message a JSON text ended by a NUL byte.  No port, no
websocket library: two pipes.  One page (a "target") is opened and
attached in flat mode, so commands to it carry its session id.

Errors the page would show a developer are collected in ``errors``: a
``console.error()`` call, an exception nobody caught, and what the
browser itself logs as an error (a failed request, say).
"""
import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

#: Debian's package of the browser.
PACKAGE = "chromium"

#: Seconds a protocol command may take before the test gives up.
COMMAND_TIMEOUT = 60.0

FLAGS = [
    "--headless",
    "--no-sandbox",                 # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",      # a container's /dev/shm is small
    "--remote-debugging-pipe",
]


class BrowserError(Exception):
    """The browser is missing, died, or refused a command."""


def find_chromium():
    """The path of the chromium executable, or BrowserError saying which
    package to install."""
    path = os.environ.get("ZPGPOOL_CHROMIUM") or shutil.which("chromium")
    if not path:
        raise BrowserError(
            "the dashboard's browser tests need headless Chromium, and no "
            "'chromium' is on PATH: apt-get install %s (Debian's package; "
            "scripts/test installs it when CI=true), or set ZPGPOOL_CHROMIUM"
            " to a Chromium executable" % PACKAGE)
    return path


def _pipe():
    """A pipe whose ends are above 4, so that the shell's redirections to
    3 and 4 overwrite none of them."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return tuple(ends)


class Browser:
    """One headless Chromium with one page, until ``close()``."""

    def __init__(self, width=1280, height=900):
        self.profile = tempfile.mkdtemp(prefix="zpgpool-chromium-")
        self.errors = []
        self._ids = iter(range(1, 1 << 30))
        self._pending = {}            # command id -> queue of its answer
        self._lock = threading.Lock()
        self.session = None
        commands_read, self._commands = _pipe()
        self._answers, answers_write = _pipe()
        # bash (dash takes no fd above 9) puts the pipes where Chromium
        # looks for them (3 and 4),
        # then becomes Chromium.
        self.process = subprocess.Popen(
            ["bash", "-c", 'exec "$0" "$@" 3<&%d 4>&%d %d<&- %d>&-'
             % (commands_read, answers_write, commands_read, answers_write),
             find_chromium()] + FLAGS + [
                 "--user-data-dir=" + self.profile,
                 "--window-size=%d,%d" % (width, height)],
            pass_fds=(commands_read, answers_write),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(commands_read)
        os.close(answers_write)
        self._stderr = []
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True,
                             name="chromium-stderr"),
            threading.Thread(target=self._read_answers, daemon=True,
                             name="chromium-cdp")]
        for reader in self._readers:
            reader.start()
        try:
            target = self.send("Target.createTarget", url="about:blank")
            self.session = self.send("Target.attachToTarget",
                                     targetId=target["targetId"],
                                     flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(domain + ".enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width,
                      height=height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # -- the protocol -------------------------------------------------------

    def _read_stderr(self):
        for line in self.process.stderr:
            self._stderr.append(line.decode("utf-8", "replace"))
            del self._stderr[:-40]

    def _read_answers(self):
        buffered = b""
        with os.fdopen(self._answers, "rb", buffering=0) as answers:
            while True:
                chunk = answers.read(65536)
                if not chunk:
                    break
                buffered += chunk
                *messages, buffered = buffered.split(b"\0")
                for message in messages:
                    self._dispatch(json.loads(message))
        # The browser is gone: wake every caller still waiting.
        with self._lock:
            pending, self._pending = self._pending, {}
        for answers_queue in pending.values():
            answers_queue.put({"error": {"message": "Chromium exited"}})

    def _dispatch(self, message):
        if "id" in message:
            with self._lock:
                answers_queue = self._pending.pop(message["id"], None)
            if answers_queue is not None:
                answers_queue.put(message)
            return
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("uncaught: %s" % details.get(
                "exception", {}).get("description", details.get("text")))
        elif method == "Runtime.consoleAPICalled" \
                and params.get("type") in ("error", "assert"):
            self.errors.append("console.%s: %s" % (params["type"], " ".join(
                str(arg.get("value", arg.get("description")))
                for arg in params.get("args", ()))))
        elif method == "Log.entryAdded" \
                and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append("%s: %s %s" % (entry.get("source"),
                                              entry.get("text"),
                                              entry.get("url", "")))

    def send(self, method, session=None, **params):
        """Send one command; return its result."""
        answers_queue = queue.Queue()
        with self._lock:
            command_id = next(self._ids)
            self._pending[command_id] = answers_queue
        message = {"id": command_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self._commands, json.dumps(message).encode() + b"\0")
        except OSError as exc:
            raise BrowserError("Chromium is gone (%s); it said:\n%s"
                               % (exc, "".join(self._stderr))) from None
        try:
            answer = answers_queue.get(timeout=COMMAND_TIMEOUT)
        except queue.Empty:
            raise BrowserError("Chromium did not answer %s within %s s"
                               % (method, COMMAND_TIMEOUT)) from None
        if "error" in answer:
            raise BrowserError("%s failed: %s\n%s" % (
                method, answer["error"].get("message"),
                "".join(self._stderr)))
        return answer.get("result", {})

    def call(self, method, **params):
        """Send one command to the page."""
        return self.send(method, session=self.session, **params)

    # -- what the tests do --------------------------------------------------

    def open(self, url, timeout=30.0):
        """Load ``url`` and wait until its document is complete."""
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError("cannot open %s: %s" % (url,
                                                       answer["errorText"]))
        self.wait_for("document.readyState === 'complete'", timeout,
                      "%s to load" % url)

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page."""
        answer = self.call("Runtime.evaluate", expression=expression,
                           returnByValue=True)
        if "exceptionDetails" in answer:
            raise BrowserError("%s raised %s" % (
                expression, answer["exceptionDetails"].get(
                    "exception", {}).get("description")))
        return answer["result"].get("value")

    def wait_for(self, expression, timeout=30.0, what=None):
        """Poll ``expression`` in the page until it is true; return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("timed out after %s s waiting for %s"
                                     % (timeout, what or expression))
            time.sleep(0.05)

    def screenshot(self, path):
        """Write a PNG of the page's viewport to ``path``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        if self.process.poll() is None:
            try:
                os.write(self._commands,
                         json.dumps({"id": 0, "method": "Browser.close"})
                         .encode() + b"\0")
                self.process.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(15)
        try:
            os.close(self._commands)
        except OSError:
            pass
        # Both pipes end with the browser.
        for reader in self._readers:
            reader.join(15)
        self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)
