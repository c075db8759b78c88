"""``zpgpool demo``: serve the demo application (``zpgpool.demo``) with
waitress, on a throwaway PostgreSQL server unless ``--dsn`` names one."""
import contextlib
import logging
import os
import signal
import socket
import threading

import psycopg2
import psycopg2.pool

from zpgpool.conninfo import hide_passwords
from zpgpool.cli.common import PROG
from zpgpool.cli.common import DEMO_DSN_ENV
from zpgpool.cli.common import CommandError
from zpgpool.cli.common import _say
from zpgpool.cli.common import _warn
from zpgpool.cli.site import _close_pools
from zpgpool.cli.site import load_zcml
from zpgpool.cli.site import resolve_dsn
from zpgpool.cli.site import short_dsn


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM or SIGHUP, like
    KeyboardInterrupt by SIGINT, so that everything started is stopped on
    the way out."""


#: The signals that stop the demo cleanly besides SIGINT: SIGTERM (kill,
#: a service manager) and SIGHUP (its terminal was closed).  Left to their
#: default, both end the process at once and leave the throwaway
#: PostgreSQL server running.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_on_signals():
    # Python runs signal handlers in the main thread only, and only the
    # main thread may install them.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Stop()

    # A signal the demo was started with ignored stays ignored: under
    # nohup (SIGHUP ignored) it outlives its terminal, as asked.
    previous = {signum: signal.signal(signum, handler)
                for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@contextlib.contextmanager
def _environ(name, value):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


class _WebServer:
    """waitress serving ``app`` in a thread of its own, until ``stop()``.

    The listening socket is made here, before waitress starts its worker
    threads, so that an address in use fails with nothing to clean up.
    """

    def __init__(self, app, host, port, threads):
        import waitress.server
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self.server = waitress.server.create_server(
            app, sockets=[sock], threads=threads, ident="zpgpool-demo",
            clear_untrusted_proxy_headers=True)
        self.thread = threading.Thread(target=self.server.run,
                                       name="zpgpool-demo-waitress",
                                       daemon=True)

    @property
    def url(self):
        host = self.server.effective_host
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%s/" % (host, self.server.effective_port)

    def start(self):
        self.thread.start()

    def stop(self, timeout=10):
        """Stop serving: finish the requests in progress (waiting up to
        ``timeout`` seconds for them), send their answers, close every
        socket.

        The order matters.  waitress's worker threads write an answer into
        its connection's buffer, then wake the serving loop through the
        trigger, a pipe.  Closing the pipe or a connection while a worker
        still runs makes that worker write to a closed (or, worse, reused)
        file descriptor: EBADF.  So the workers are stopped first, the
        sockets are closed by the serving loop's own thread once their
        answers are out, and the trigger's pipe last, when neither the
        workers nor the loop can use it any more.
        """
        from waitress import wasyncore
        server = self.server
        socket_map = server._map
        trigger = server.trigger

        def stop_listening():
            # Not server.close(): it would close the trigger as well.
            wasyncore.dispatcher.close(server)

        def close_connections():
            # The loop ends when its map is empty: take the trigger out
            # (its pipe stays open until the loop has ended), close the
            # idle connections, and let waitress close the others once
            # their answers are sent.
            trigger.del_channel()
            for each in list(socket_map.values()):
                if getattr(each, "total_outbufs_len", 0):
                    each.close_when_flushed = True
                else:
                    each.close()

        # 1. No new connections.
        trigger.pull_trigger(stop_listening)
        # 2. The requests in progress finish; the workers exit.
        server.task_dispatcher.shutdown(timeout=timeout)
        workers_left = bool(server.task_dispatcher.threads)
        # 3. Nobody but the loop touches a socket now.
        trigger.pull_trigger(close_connections)
        self.thread.join(timeout)
        if self.thread.is_alive() or workers_left:  # pragma: no cover
            # A request or a client that would not finish: leave the pipe
            # open (a daemon thread may still use it) for the process's
            # exit to close.
            _warn("%s demo: the web server did not stop within %g s"
                  % (PROG, timeout))
            return
        trigger.close()


def _configure_logging():
    """Log warnings with a time stamp, when run from the command line."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")


def cmd_demo(args):
    if args.threads < 1:
        raise CommandError("--threads must be 1 or more, got %d"
                           % args.threads)
    try:
        import pyramid  # noqa: F401
        import pyramid_tm  # noqa: F401
        import waitress  # noqa: F401
    except ImportError as exc:
        raise CommandError("the demo needs pyramid, pyramid_tm and waitress "
                           "(%s); install them with: pip install "
                           "'zpgpool[demo]'" % exc) from None
    # waitress warns when requests queue for a thread; in the demo that is
    # the point (more clients than threads), not a problem.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    with _stop_on_signals(), contextlib.ExitStack() as stack:
        try:
            return _run_demo(args, stack)
        except (KeyboardInterrupt, _Stop):
            _say("%s demo: interrupted; stopping" % PROG)
            return 0 if not args.check else 1


def _run_demo(args, stack):
    from zope.component import getUtility
    from zpgpool.interfaces import IConnectionPool
    from zpgpool import testing

    dsn = args.dsn
    if dsn is not None:
        dsn = resolve_dsn("--dsn", dsn, args)
    else:
        _say("%s demo: starting a throwaway PostgreSQL server" % PROG)
        try:
            server = testing.PostgresServer()
            stack.callback(_stop_server, server)
            server.start()
        except (testing.PostgresUnavailable,
                testing.PostgresServerError) as exc:
            raise CommandError("cannot start a throwaway PostgreSQL server: "
                               "%s\nOr give the demo a server with --dsn."
                               % exc) from None
        _say("%s demo: PostgreSQL %s on %s:%s, in %s (removed when the demo"
             " stops)" % (PROG, server.version, server.host, server.port,
                          server.base_dir))
        dsn = server.dsn()

    from zpgpool import demo
    from zpgpool.demo import app as demo_app
    with _environ(DEMO_DSN_ENV, dsn):
        path = os.path.join(os.path.dirname(demo.__file__), "demo.zcml")
        load_zcml(path)
    pool = getUtility(IConnectionPool, name=demo_app.POOL_NAME)
    stack.callback(_close_pools, [(pool.name, pool)])
    try:
        demo_app.create_schema(pool)
    except (psycopg2.Error, psycopg2.pool.PoolError) as exc:
        raise CommandError("cannot use the database: %s" % hide_passwords(
            " ".join(str(exc).split()))) from None

    try:
        web = _WebServer(demo_app.make_app(), args.host, args.port,
                         args.threads)
    except OSError as exc:
        raise CommandError("cannot listen on %s:%s: %s" % (
            args.host, args.port, exc.strerror or exc)) from None
    web.start()
    stack.callback(_stop_web, web)
    _say("%s demo: pool %r (%s), maxconn %d, %d server threads"
         % (PROG, pool.name, short_dsn(pool), pool.maxconn, args.threads))
    _say("%s demo: serving %s" % (PROG, web.url))

    if args.check:
        from zpgpool.demo.check import run_check
        _say("%s demo: checking %s" % (PROG, web.url))
        passed = run_check(web.url, clients=2 * args.threads,
                           notes=6 * args.threads)
        _say("%s demo: check %s" % (PROG, "passed" if passed else "FAILED"))
        return 0 if passed else 1

    _say("%s demo: press Ctrl-C to stop" % PROG)
    # Ctrl-C (or SIGTERM) interrupts the wait; waitress's loop itself only
    # ends when stop() is called.
    web.thread.join()
    raise CommandError(  # pragma: no cover
        "the web server stopped unexpectedly")


def _stop_web(web):
    web.stop()


def _stop_server(server):
    _say("%s demo: removing the throwaway PostgreSQL server" % PROG)
    server.cleanup()


NAME = "demo"
HELP = "serve the demo application"
DESCRIPTION = ("Serve a small Pyramid application whose views use a pool "
               "declared in ZCML, on a throwaway PostgreSQL server unless "
               "--dsn names one.")


def add_arguments(demo):
    demo.add_argument("--dsn", help="the database to use: a libpq "
                      "connection string, env:NAME or file:PATH (default: "
                      "start a throwaway server and remove it afterwards)")
    demo.add_argument("--host", default="127.0.0.1",
                      help="the address to listen on (default: %(default)s)")
    demo.add_argument("--port", type=int, default=0,
                      help="the port to listen on (default: a free one)")
    demo.add_argument("--threads", type=int, default=4,
                      help="waitress's worker threads (default: %(default)s)")
    demo.add_argument("--check", action="store_true",
                      help="run a scripted session against the demo and exit"
                           " 0 when it passes, 1 when not")


run = cmd_demo
