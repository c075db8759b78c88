"""The ``zpgpool`` command: ``demo``, ``check`` and ``recover``.

``zpgpool demo``
    Serve the demo application (``zpgpool.demo``) with waitress, on a
    throwaway PostgreSQL server unless ``--dsn`` names one; ``--check``
    runs a scripted session against it instead of serving until Ctrl-C.
``zpgpool check site.zcml``
    Load a site's ZCML, connect each registered pool once and print a
    table; exit with 1 when a pool cannot serve.  ``--zope-conf`` first
    sets the variables of a Zope ``zope.conf``'s ``<environment>``
    section, as Zope does when it starts.
``zpgpool recover``
    List the in-doubt prepared transactions of a pool, and commit or roll
    them back.

``main(argv)`` returns the exit status instead of exiting, so that tests
can run the commands in-process. An error is a message on standard error
(``zpgpool CMD: error: ...``) and exit status 1; a wrong command line is
argparse's usage message and exit status 2. No pool logic lives here: the
commands only call the pool's public API.
"""
import argparse
import contextlib
import datetime
import difflib
import importlib.metadata
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import psycopg2
import psycopg2.extensions
import psycopg2.pool

from zpgpool.conninfo import hide_passwords


PROG = "zpgpool"

#: The environment variable the demo's ZCML reads its DSN from.
DEMO_DSN_ENV = "ZPGPOOL_DEMO_DSN"

# The parts of a DSN that say where a pool connects; the table of
# ``check`` shows these and leaves out the defaults the pool adds
# (application_name, keepalives, time-outs).
_TARGET_KEYS = ("service", "host", "hostaddr", "port", "dbname", "user",
                "password", "sslmode")


class CommandError(Exception):
    """What went wrong, in the user's terms; exit status 1."""


def _say(*parts):
    print(*parts, flush=True)


def _warn(line):
    print(line, file=sys.stderr, flush=True)


# -- a Zope zope.conf's <environment> section ----------------------------------

class ZopeConfError(CommandError):
    """A zope.conf that cannot be read as far as ``--zope-conf`` needs."""


# ZConfig's substitutions: $name and ${name} (from %define, any case),
# $(NAME) (the process environment) and $$ (a dollar sign).
_SUBSTITUTION = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<braced>[A-Za-z_][\w.-]*)\}"
    r"|\((?P<env>[A-Za-z_][\w.-]*)\)|(?P<plain>[A-Za-z_][\w.-]*))")


def read_zope_environment(path, _defines=None, _seen=()):
    """Return the variables a Zope ``zope.conf`` sets in its
    ``<environment>`` section, as a dict in the order of the file.

    Reads what ``zpgpool`` needs and no more, the way ZConfig reads it: a
    line is ``NAME value`` (the value is the rest of the line); a line
    whose first character is ``#`` is a comment; ``%define`` names are
    substituted (``$name``, ``${name}``), as are ``$(NAME)`` from the
    environment and ``$$``; ``%include`` files are read too.  Everything
    else in the file is skipped.  Raises ZopeConfError, naming the file and
    line, for what it cannot make sense of.
    """
    defines = {} if _defines is None else _defines
    path = os.path.abspath(path)
    if path in _seen:
        raise ZopeConfError("--zope-conf %s: it includes itself" % path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeError) as exc:
        raise ZopeConfError("--zope-conf %s: cannot read it: %s" % (
            path, getattr(exc, "strerror", None) or exc)) from None
    environment = {}
    section_line = None         # where the open <environment> began

    def fail(number, what):
        raise ZopeConfError("--zope-conf %s, line %d: %s"
                            % (path, number, what))

    def substitute(number, text):
        def replace(match):
            if match.group("dollar"):
                return "$"
            if match.group("env"):
                value = os.environ.get(match.group("env"))
                if value is None:
                    fail(number, "$(%s): the environment variable %s is not"
                                 " set" % (match.group("env"),
                                           match.group("env")))
                return value
            name = match.group("braced") or match.group("plain")
            if name.lower() not in defines:
                fail(number, "$%s is not defined by a %%define above it"
                     % name)
            return defines[name.lower()]
        result = _SUBSTITUTION.sub(replace, text)
        if "$" in _SUBSTITUTION.sub("", text):
            fail(number, "a lone '$' (write $$ for a dollar sign)")
        return result

    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        lowered = line.lower()
        if section_line is None and line.startswith("%"):
            directive, argument = (line[1:].split(None, 1) + [""])[:2]
            if directive.lower() == "define":
                name, value = (argument.split(None, 1) + [""])[:2]
                defines[name.lower()] = substitute(number, value.strip())
            elif directive.lower() == "include":
                included = os.path.join(os.path.dirname(path),
                                        substitute(number, argument))
                environment.update(read_zope_environment(
                    included, defines, _seen + (path,)))
            continue
        if re.match(r"<environment\s*>$", lowered):
            if section_line is not None:
                fail(number, "<environment> inside <environment> (line %d)"
                     % section_line)
            section_line = number
        elif section_line is not None:
            if re.match(r"</environment\s*>$", lowered):
                section_line = None
            elif line.startswith("<"):
                fail(number, "%s inside <environment> (line %d), which"
                             " holds only NAME value lines"
                     % (line, section_line))
            else:
                name, value = (line.split(None, 1) + [""])[:2]
                environment[name] = substitute(number, value.strip())
    if section_line is not None:
        fail(section_line, "<environment> is never closed by"
                           " </environment>")
    return environment


@contextlib.contextmanager
def _environment(variables):
    """Set ``variables`` in os.environ (as Zope does with its
    <environment> section: they win over what is set already); put back
    what was there on the way out."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _zope_environment(stack, args):
    """Apply the <environment> of ``--zope-conf`` for the command's
    duration; return the variables it set (empty without the option)."""
    if getattr(args, "zope_conf", None) is None:
        return {}
    variables = read_zope_environment(args.zope_conf)
    stack.enter_context(_environment(variables))
    return variables


def _missing_variable_hint(variable, args):
    """What to say when the ``env:`` DSN ``variable`` is not set."""
    zope_conf = getattr(args, "zope_conf", None)
    if zope_conf is None:
        return ("%s is not set in this shell. When Zope gets it from the"
                " <environment> section of its zope.conf, pass that file:"
                " --zope-conf /path/to/instance/etc/zope.conf; or set it:"
                " export %s=..." % (variable, variable))
    named = sorted(read_zope_environment(zope_conf))
    return ("--zope-conf %s does not set %s either (its <environment>"
            " section sets %s); add a line '%s <dsn>' there, or set it in"
            " this shell" % (zope_conf, variable,
                             ", ".join(named) if named else "nothing",
                             variable))


# -- a DSN given on the command line ------------------------------------------

def resolve_dsn(option, value, args):
    """Turn the command-line ``value`` of ``option`` into a DSN, as the
    ``dsn`` attribute of ``<zpgpool:pool>`` does: ``env:NAME`` reads the
    environment variable NAME, ``file:PATH`` the file PATH (relative to
    the current directory); anything else is the DSN itself.  Raises
    CommandError saying what was wrong (never with the DSN's secret)."""
    from zope.schema import ValidationError
    # The field of the ZCML directive, so that both accept the same forms
    # and explain a bad one alike.  Unbound, a relative file: path is taken
    # relative to the current directory.
    from zpgpool.zcml import IPoolDirective
    try:
        return IPoolDirective["dsn"].fromUnicode(value)
    except ValidationError as exc:
        message = str(exc)
        # The field speaks of its attribute, "dsn"; here it is the option.
        if message.startswith("dsn"):
            message = option + message[len("dsn"):]
        else:  # pragma: no cover - every message of the field starts so
            message = "%s: %s" % (option, message)
        text = value.strip()
        variable = text[4:].strip() if text.startswith("env:") else ""
        if variable and variable not in os.environ:
            message += "\n" + _missing_variable_hint(variable, args)
        raise CommandError(hide_passwords(message)) from None


# -- loading a site's ZCML ----------------------------------------------------

def load_zcml(path, args=None):
    """Load the ZCML file ``path``; raise CommandError saying where it failed.

    Its registrations go into the global component registry, where
    ``getUtility`` finds them (a command is a process of its own).
    ``args`` (the command line) only improves the errors' advice.
    """
    from zope.configuration import xmlconfig
    from zope.configuration.exceptions import ConfigurationError

    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CommandError("cannot load %s: %s" % (
            path, exc.strerror or exc)) from None
    try:
        xmlconfig.file(os.path.abspath(path))
    except ConfigurationError as exc:
        # zope.configuration's text names the file and line of the
        # directive, and what was wrong with it; some of its errors need
        # zpgpool's words added to be understood.
        text = str(exc).strip()
        advice = _explain_zcml_error(exc, text, args)
        if advice:
            text += "\n" + advice
        raise CommandError("cannot load %s:\n%s" % (
            path, hide_passwords(text))) from None


def _zpgpool_directives():
    """(namespace, {directive name: its schema}) from zpgpool's meta.zcml:
    read there, so that this stays true when a directive is added."""
    import xml.etree.ElementTree as ElementTree
    from zope.configuration.name import resolve
    import zpgpool

    meta = os.path.join(os.path.dirname(zpgpool.__file__), "meta.zcml")
    tag = "{http://namespaces.zope.org/meta}"
    namespace, directives = None, {}
    for group in ElementTree.parse(meta).getroot().iter(tag + "directives"):
        namespace = group.get("namespace")
        for each in group.iter(tag + "directive"):
            directives[each.get("name")] = resolve(each.get("schema"),
                                                   "zpgpool")
    return namespace, directives


# How zope.configuration's text names where a directive is.
_LOCATION = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)'
                       r'\.(?P<column>\d+)')


def _element_at(text):
    """The (namespace, name, attributes) of the directive that the last
    (innermost) location in the error ``text`` points at, or None."""
    import xml.parsers.expat
    locations = list(_LOCATION.finditer(text))
    if not locations:
        return None
    where = locations[-1]
    wanted = (int(where.group("line")), int(where.group("column")))
    found = []
    # expat reports the positions zope.configuration reports (it reads
    # the file through expat too).
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")

    def start(name, attributes):
        if (parser.CurrentLineNumber, parser.CurrentColumnNumber) == wanted:
            namespace, _, local = name.rpartition(" ")
            found.append((namespace, local, attributes))

    parser.StartElementHandler = start
    try:
        with open(where.group("file"), "rb") as f:
            parser.ParseFile(f)
    except (OSError, xml.parsers.expat.ExpatError):
        return None
    return found[0] if found else None


def _explain_zcml_error(exc, text, args):
    """Advice on a ZCML error whose raw text leaves a newcomer guessing,
    or None."""
    namespace, directives = _zpgpool_directives()
    reason = exc.args[0] if exc.args else None

    if reason == "Unknown directive" and len(exc.args) == 3 \
            and exc.args[1] == namespace:
        name = exc.args[2]
        where = _LOCATION.findall(text)
        in_file = " in %s" % where[-1][0] if where else ""
        if name in directives:
            return ("<zpgpool:%s> is unknown because zpgpool's ZCML is not"
                    " included: put <include package=\"zpgpool\" /> (or"
                    " <include package=\"zpgpool\" file=\"meta.zcml\" />"
                    " for the directives alone) inside <configure>, before"
                    " the first <zpgpool:...> directive%s."
                    % (name, in_file))
        return ("zpgpool has no directive <zpgpool:%s>; it has %s.%s" % (
            name, ", ".join("<zpgpool:%s>" % d for d in sorted(directives)),
            _did_you_mean(name, directives)))

    element = _element_at(text)
    if element is None or element[0] != namespace \
            or element[1] not in directives:
        return None
    name, attributes = element[1], element[2]
    if reason == "Unrecognized parameters:":
        fields = _field_names(directives[name])
        lines = ["<zpgpool:%s> has no attribute %r.%s" % (
            name, unknown, _did_you_mean(unknown, fields))
            for unknown in exc.args[1:]]
        lines.append("Its attributes are: %s." % ", ".join(fields))
        return "\n".join(lines)
    dsn = attributes.get("dsn", "").strip()
    if dsn.startswith("env:"):
        variable = dsn[4:].strip()
        if variable and variable not in os.environ:
            return _missing_variable_hint(variable, args)
    return None


def _field_names(schema):
    from zope.schema import getFieldNamesInOrder
    return getFieldNamesInOrder(schema)


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(word, list(choices), n=1)
    return " Did you mean %r?" % close[0] if close else ""


def registered_pools():
    """Return (name, pool) of every IConnectionPool utility, by name."""
    from zope.component import getUtilitiesFor
    from zpgpool.interfaces import IConnectionPool
    return sorted(getUtilitiesFor(IConnectionPool), key=lambda item: item[0])


def _close_pools(pools):
    for _name, pool in pools:
        try:
            pool.close(timeout=1.0)
        except Exception as exc:  # pragma: no cover - close() must not fail
            _warn("%s: closing pool %r failed: %s" % (PROG, pool.name, exc))


def short_dsn(pool):
    """The pool's masked DSN, reduced to where it connects."""
    params = psycopg2.extensions.parse_dsn(pool.dsn)
    shown = ["%s=%s" % (k, params[k]) for k in _TARGET_KEYS if k in params]
    return " ".join(shown) or "(libpq defaults)"


def _label(name):
    return name if name else '""'


@contextlib.contextmanager
def _quiet_pool_log():
    """Keep the pool's own warnings off the terminal: the commands report
    the same failures themselves, once."""
    logger = logging.getLogger("zpgpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- zpgpool check ------------------------------------------------------------

def probe(pool):
    """Connect ``pool`` once; return what ``check`` shows about it.

    A dict with ``version``, ``connect_ms``, ``rtt_ms`` (the best of three
    ``SELECT 1`` round trips) and ``prepared`` (max_prepared_transactions).
    Raises what the pool raises when it cannot serve.
    """
    start = time.monotonic()
    with pool.checkout() as conn:
        connected = time.monotonic() - start
        with conn.cursor() as cur:
            rtt = None
            for _ in range(3):
                t0 = time.monotonic()
                cur.execute("SELECT 1")
                cur.fetchone()
                took = time.monotonic() - t0
                rtt = took if rtt is None else min(rtt, took)
            cur.execute("SELECT current_setting('server_version'),"
                        " current_setting('max_prepared_transactions')::int")
            version, prepared = cur.fetchone()
    return {"version": version.split()[0], "connect_ms": connected * 1000,
            "rtt_ms": rtt * 1000, "prepared": prepared}


def _table(header, rows):
    widths = [max(len(str(row[i])) for row in [header] + rows)
              for i in range(len(header))]
    for row in [header] + rows:
        _say("  ".join(str(cell).ljust(width)
                       for cell, width in zip(row, widths)).rstrip())


def cmd_check(args):
    with contextlib.ExitStack() as stack:
        _zope_environment(stack, args)
        load_zcml(args.zcml, args)
    pools = registered_pools()
    if not pools:
        raise CommandError("%s registers no pool: declare one with "
                           "<zpgpool:pool name=... dsn=... />" % args.zcml)
    rows = []
    problems = []
    try:
        with _quiet_pool_log():
            for name, pool in pools:
                try:
                    info = probe(pool)
                except (psycopg2.Error, psycopg2.pool.PoolError) as exc:
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    problems.append((name, hide_passwords(reason)))
                    rows.append((_label(name), short_dsn(pool), "-", "-", "-",
                                 "-", "FAILED"))
                    continue
                if info["prepared"] > 0:
                    twophase = "yes"
                else:
                    twophase = "no"
                    if pool.twophase:
                        problems.append((name, (
                            "the pool has twophase=True, but the server's "
                            "max_prepared_transactions is 0; set it above 0 "
                            "in postgresql.conf and restart the server")))
                rows.append((
                    _label(name), short_dsn(pool), info["version"],
                    "%.1f ms" % info["connect_ms"],
                    "%.2f ms" % info["rtt_ms"],
                    "%s (max_prepared_transactions=%d)"
                    % (twophase, info["prepared"]),
                    "ok" if name not in dict(problems) else "FAILED"))
    finally:
        _close_pools(pools)
    _table(("pool", "dsn", "server", "connect", "round trip", "two-phase",
            "status"), rows)
    for name, reason in problems:
        _warn("%s check: pool %s cannot serve: %s"
              % (PROG, _label(name), reason))
    if problems:
        _warn("%s check: %d of %d pools cannot serve"
              % (PROG, len(problems), len(pools)))
        return 1
    return 0


# -- zpgpool recover ----------------------------------------------------------

def _age(prepared):
    seconds = max(0, int((datetime.datetime.now(datetime.timezone.utc)
                          - prepared).total_seconds()))
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%.1f h" % (seconds / 3600)


def _recover_pool(pool, older_than, commit=None, zodb=None):
    """List one pool's in-doubt transactions; resolve them when ``commit``
    is True or False, or as the ZODB storage ``zodb`` says."""
    from zpgpool.twophase import gid_prefix
    from zpgpool.twophase import list_prepared
    from zpgpool.twophase import zodb_decider

    prefix = gid_prefix(pool)
    found = list_prepared(pool, older_than)
    _say("pool %s (%s): %d in-doubt prepared transaction%s older than %g s "
         "with the prefix %r" % (
             _label(pool.name), short_dsn(pool), len(found),
             "" if len(found) == 1 else "s", older_than, prefix))
    if older_than > 0:
        # A younger one may be in doubt too, or still on its way to COMMIT
        # PREPARED: say it is there, and leave it alone unless asked.
        younger = len(list_prepared(pool, 0)) - len(found)
        if younger > 0:
            _say("  and %d younger than %g s, left alone: they may still be"
                 " committing; to include them, run again with"
                 " --older-than 0" % (younger, older_than))
    for gid, prepared, owner, database in found:
        _say("  %s  prepared %s (%s ago) by %s in %s" % (
            gid, prepared.isoformat(sep=" ", timespec="seconds"),
            _age(prepared), owner, database))
    if not found:
        return
    if zodb is not None:
        # ZODB records its part of a two-phase transaction around the time
        # PostgreSQL prepared it; an hour of margin covers slow commits.
        since = min(p for _, p, _, _ in found).timestamp() - 3600
        decide = zodb_decider(zodb, since)
        for gid, _, _, _ in found:
            committed = decide(gid)
            resolve(pool, [gid], committed, " (ZODB %s it)" % (
                "committed" if committed else "did not commit"))
    elif commit is not None:
        resolve(pool, [gid for gid, _, _, _ in found], commit)


def resolve(pool, gids, commit, why=""):
    """Commit (or roll back) the prepared transactions ``gids`` of
    ``pool``, one by one, saying what became of each."""
    from zpgpool.twophase import resolve_prepared

    for gid in gids:
        if resolve_prepared(pool, [gid], commit=commit):
            _say("  %s %s%s" % ("committed" if commit else "rolled back",
                                gid, why))
        else:
            _say("  %s was gone already (resolved by someone else)" % gid)


def _open_zodb(path):
    """Open the FileStorage ``path`` read-only, for ``recover --zodb``."""
    try:
        from ZODB.FileStorage import FileStorage
    except ImportError:
        raise CommandError("--zodb needs ZODB: pip install ZODB") from None
    if not os.path.isfile(path):
        raise CommandError("--zodb %s: no such file" % path)
    try:
        return FileStorage(path, read_only=True)
    except Exception as exc:
        raise CommandError("--zodb %s: cannot open it as a FileStorage: %s"
                           % (path, exc)) from None


def cmd_recover(args):
    if args.older_than < 0:
        raise CommandError("--older-than must be 0 or more seconds, got %g"
                           % args.older_than)
    if args.dsn is not None and args.pool is None:
        raise CommandError(
            "--dsn needs --pool-name NAME: the name of the pool whose "
            "transactions to recover (it is part of their ids)")
    commit = True if args.commit else False if args.rollback else None
    with contextlib.ExitStack() as stack:
        zodb = None
        if args.zodb:
            zodb = _open_zodb(args.zodb)
            stack.callback(zodb.close)
        with contextlib.ExitStack() as environment:
            _zope_environment(environment, args)
            if args.dsn is not None:
                dsn = resolve_dsn("--dsn", args.dsn, args)
            else:
                load_zcml(args.zcml, args)
        if args.dsn is not None:
            from zpgpool.pool import ConnectionPool
            try:
                pools = [(args.pool, ConnectionPool(
                    dsn, name=args.pool, minconn=0, maxconn=2))]
            except psycopg2.pool.PoolError as exc:
                raise CommandError(hide_passwords(str(exc))) from None
        else:
            every = registered_pools()
            pools = [(n, p) for n, p in every
                     if args.pool is None or n == args.pool]
            if not pools:
                raise CommandError("%s declares no pool%s" % (
                    args.zcml, "" if args.pool is None else
                    " named %r; it declares %s" % (args.pool, ", ".join(
                        repr(n) for n, _ in every) or "none")))
        stack.callback(_close_pools, pools)
        failed = 0
        with _quiet_pool_log():
            for name, pool in pools:
                try:
                    _recover_pool(pool, args.older_than, commit, zodb)
                except (psycopg2.Error, psycopg2.pool.PoolError) as exc:
                    failed += 1
                    _warn("%s recover: pool %s: %s" % (PROG, _label(name),
                          hide_passwords(" ".join(str(exc).split()))))
    if commit is None and zodb is None and not failed:
        _say("Nothing was changed; run again with --commit, --rollback or "
             "--zodb to resolve what is listed.")
    return 1 if failed else 0


# -- zpgpool demo -------------------------------------------------------------

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

    previous = {signum: signal.signal(signum, handler)
                for signum in STOP_SIGNALS}
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


# -- the command line ---------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A transaction-aware PostgreSQL connection pool for the "
                    "Zope Component Architecture: the demo and the "
                    "operator's tools.")
    parser.add_argument("--version", action="version",
                        version="%s %s" % (PROG, _version()))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="serve the demo application",
        description="Serve a small Pyramid application whose views use a "
                    "pool declared in ZCML, on a throwaway PostgreSQL server "
                    "unless --dsn names one.")
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
    demo.set_defaults(func=cmd_demo)

    check = commands.add_parser(
        "check", help="connect every pool a site declares",
        description="Load a site's ZCML, connect each registered pool once "
                    "and show what it connects to. Exits with 1 when a pool "
                    "cannot serve.")
    check.add_argument("zcml", help="the site's ZCML file")
    _add_zope_conf(check)
    check.set_defaults(func=cmd_check)

    recover = commands.add_parser(
        "recover", help="resolve a pool's in-doubt prepared transactions",
        description="List the prepared (two-phase) transactions a pool left "
                    "in doubt, found by the prefix of their ids, and commit "
                    "or roll them back.")
    source = recover.add_mutually_exclusive_group(required=True)
    source.add_argument("--zcml", help="a site's ZCML file declaring the "
                        "pool(s)")
    source.add_argument("--dsn", help="the database, when not using --zcml:"
                        " a libpq connection string, env:NAME (read from the "
                        "environment variable NAME) or file:PATH (read from "
                        "a file), so that no password is typed on the "
                        "command line")
    _add_zope_conf(recover)
    recover.add_argument("--pool", "--pool-name", dest="pool", metavar="NAME",
                         help="the pool's name (with --zcml, default: every "
                              "pool; required with --dsn)")
    recover.add_argument("--older-than", type=float, default=60.0,
                         metavar="SECONDS",
                         help="only transactions prepared at least this long "
                              "ago (default: %(default)g)")
    action = recover.add_mutually_exclusive_group()
    action.add_argument("--commit", action="store_true",
                        help="COMMIT PREPARED each one listed")
    action.add_argument("--rollback", action="store_true",
                        help="ROLLBACK PREPARED each one listed")
    action.add_argument("--zodb", metavar="FILESTORAGE",
                        help="commit each one listed that the ZODB "
                             "FileStorage FILESTORAGE (opened read-only) "
                             "committed in the same transaction, roll back "
                             "the others")
    recover.set_defaults(func=cmd_recover)
    return parser


def _add_zope_conf(command):
    command.add_argument(
        "--zope-conf", metavar="PATH",
        help="a Zope zope.conf whose <environment> section to apply first, "
             "as Zope does (for env:NAME DSNs set there)")


def _version():
    """zpgpool's version, from the installed distribution."""
    try:
        return importlib.metadata.version("zpgpool")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "(unknown: zpgpool is not installed)"


def main(argv=None):
    """Run the ``zpgpool`` command with ``argv`` (default: sys.argv[1:]);
    return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help, or a wrong command line (argparse printed the usage).
        return exc.code if isinstance(exc.code, int) else 0
    if argv is None:
        # From the command line, not a test calling main(argv).
        _configure_logging()
    if args.command is None:
        parser.print_usage(sys.stderr)
        _warn("%s: error: a command is required (demo, check or recover)"
              % PROG)
        return 2
    try:
        return args.func(args)
    except CommandError as exc:
        _warn("%s %s: error: %s" % (PROG, args.command, exc))
        return 1
    except KeyboardInterrupt:  # pragma: no cover (Ctrl-C in check, recover)
        _warn("%s %s: interrupted" % (PROG, args.command))
        return 130
