"""A watcher that cleans up after a process that died without doing so.

A server started for tests must not outlive the process that started it,
whatever ended that process: a normal exit, Ctrl-C, a closed terminal
(SIGHUP), or SIGKILL, which leaves no chance to run any clean-up code.  So
the first time a process starts a server, it also starts a small watcher
process and keeps the only writing end of a pipe to it.  Through the pipe
it sends orders: "watch this folder, and the process whose pid file lies
there" when a server starts, "forget it" when the server has been cleaned
up.  However the starter ends, the kernel closes its end of the pipe; the
watcher then reads end of file, stops the processes it still watches and
removes their folders.  After a normal exit nothing is left to watch, and
the watcher just exits.

One watcher serves every server, bouncer and copy of the binaries a
process makes.  It runs this file as a script (``python -I -S``), so this
module imports nothing but the standard library.
"""
import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

#: Seconds a watched process has, after its first signal, before the
#: watcher kills it.
GRACE = 20


def _process_alive(pid):
    """Tell whether process *pid* exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        # EPERM: alive, but not ours to signal.
        return e.errno == errno.EPERM
    # A postmaster that has exited stays a zombie until whoever inherited
    # it (init, or a container's first process) reaps it, which may take a
    # while; it holds no port and no memory any more.
    try:
        with open('/proc/%d/stat' % pid, encoding='ascii',
                  errors='replace') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):  # pragma: no cover (no /proc)
        return True
    return state not in ('Z', 'X')


def _pid_in(pidfile):
    """Return the pid on the first line of *pidfile*, or None."""
    try:
        with open(pidfile, encoding='ascii', errors='replace') as f:
            return int(f.readline().strip())
    except (OSError, ValueError, TypeError):
        return None


def _runs(pid, program):
    """Tell whether process *pid* runs *program*, so that a stale pid file
    whose pid was handed out again does not get an innocent process
    killed."""
    try:
        with open('/proc/%d/comm' % pid, encoding='utf-8',
                  errors='replace') as f:
            return f.read().strip() == program[:15]
    except OSError:  # pragma: no cover (no /proc, or the process just left)
        return not os.path.isdir('/proc/self')


# ---------------------------------------------------------------------------
# The watcher's side
# ---------------------------------------------------------------------------

def read_orders(stream):
    """Read orders from *stream* until end of file.

    Return the ``watch`` orders that no ``forget`` order cancelled, oldest
    first.
    """
    watched = {}
    for line in stream:
        try:
            order = json.loads(line)
        except ValueError:
            continue    # a line cut short by the starter's death
        if order.get('op') == 'watch':
            watched[order['id']] = order
        elif order.get('op') == 'forget':
            watched.pop(order.get('id'), None)
    return list(watched.values())


def stop_process(order, grace=GRACE):
    """Stop the process that *order*'s pid file names, if it still runs.

    Send it the order's signal, and SIGKILL when it is still there *grace*
    seconds later.  Return whether a process was signalled.
    """
    pid = _pid_in(order.get('pidfile'))
    if pid is None or not _process_alive(pid):
        return False
    if not _runs(pid, order.get('program') or ''):
        return False
    try:
        os.kill(pid, order.get('signal') or signal.SIGTERM)
    except OSError:  # pragma: no cover (it left just now)
        return False
    deadline = time.monotonic() + grace
    while _process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _process_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # pragma: no cover (it left just now)
            pass
    return True


def clean_up(orders, grace=GRACE):
    """Carry out *orders*: stop their processes, then remove their folders.

    All processes are stopped before any folder goes, because a process
    may still be writing into a folder of another order (a server into a
    copy of the binaries, say).
    """
    for order in orders:
        stop_process(order, grace)
    for order in orders:
        for path in order.get('remove') or ():
            shutil.rmtree(path, ignore_errors=True)


def _main():  # pragma: no cover (runs as a detached process, unmeasured)
    # Fork once more and let the starter reap the first process at once:
    # the watcher then belongs to init, not to the starter, whose exit it
    # has to outlive.
    if os.fork():
        os._exit(0)
    # The starter put us in a session of our own, so a terminal's Ctrl-C
    # or hang-up does not reach us; ignore them anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    clean_up(read_orders(sys.stdin.buffer))


# ---------------------------------------------------------------------------
# The starter's side
# ---------------------------------------------------------------------------

class _Watchdog:
    """The starter's end of the pipe to its watcher, started when first
    needed."""

    def __init__(self):
        # Protects _fd and _orders, and is held while an order is written,
        # so that the orders of two threads never interleave.
        self._lock = threading.Lock()
        self._fd = None
        self._orders = {}   # id -> watch order not forgotten yet
        self._ids = itertools.count(1)
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self):
        # A forked child must not keep its parent's watcher waiting after
        # the parent is gone: close its copy of the writing end.  What the
        # child starts gets a watcher of its own.
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:  # pragma: no cover
                pass
        self._fd = None
        self._orders = {}
        self._lock = threading.Lock()

    def _start(self):
        # os.pipe() makes both ends non-inheritable: no other child of ours
        # (pg_ctl, and the server it starts) keeps the pipe open.
        read_end, write_end = os.pipe()
        try:
            first = subprocess.Popen(
                [sys.executable, '-I', '-S', os.path.abspath(__file__)],
                stdin=read_end, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd='/', start_new_session=True)
            first.wait(timeout=60)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._fd = write_end
        for order in self._orders.values():
            self._write(order)

    def _write(self, order):
        data = (json.dumps(order) + '\n').encode('utf-8')
        while data:
            data = data[os.write(self._fd, data):]

    def _send(self, order):
        if self._fd is None:
            self._start()
        try:
            self._write(order)
        except BrokenPipeError:
            # The watcher died (someone killed it): start another one and
            # tell it everything that is still to be watched, which takes
            # this order into account.
            os.close(self._fd)
            self._fd = None
            self._start()

    def watch(self, remove=(), pidfile=None, program=None, sig=None):
        order = {'op': 'watch', 'id': next(self._ids),
                 'remove': [os.path.abspath(p) for p in remove],
                 'pidfile': pidfile, 'program': program,
                 'signal': int(sig or signal.SIGTERM)}
        with self._lock:
            self._orders[order['id']] = order
            self._send(order)
        return order['id']

    def forget(self, order_id):
        with self._lock:
            if self._orders.pop(order_id, None) is None:
                return
            self._send({'op': 'forget', 'id': order_id})


_watchdog = None
_create_lock = threading.Lock()


def _the_watchdog():
    global _watchdog
    with _create_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
        return _watchdog


def watch(remove=(), pidfile=None, program=None, sig=None):
    """Have the watcher clean up should this process die first.

    When this process is gone and the order not forgotten, the watcher
    sends *sig* (default SIGTERM) to the process whose pid stands in
    *pidfile*, provided it runs *program*, kills it after ``GRACE`` seconds
    if it is still there, and then removes the folders *remove*.  Return
    the order's id, for ``forget()``.
    """
    return _the_watchdog().watch(remove, pidfile, program, sig)


def forget(order_id):
    """Cancel the order *order_id*: its owner has cleaned up itself.

    Forgetting an order twice, or None, does nothing.
    """
    if order_id is not None and _watchdog is not None:
        _watchdog.forget(order_id)


if __name__ == '__main__':  # pragma: no cover
    _main()
