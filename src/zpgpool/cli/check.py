"""``zpgpool check site.zcml``: load a site's ZCML, connect each pool it
registers once and print a table; exit 1 when a pool cannot serve."""
import contextlib
import time

import psycopg2
import psycopg2.pool

from zpgpool.conninfo import hide_passwords
from zpgpool.stats import registered_pools
from zpgpool.cli.common import PROG
from zpgpool.cli.common import CommandError
from zpgpool.cli.common import _say
from zpgpool.cli.common import _warn
from zpgpool.cli.zopeconf import _zope_environment
from zpgpool.cli.zopeconf import add_zope_conf
from zpgpool.cli.site import _close_pools
from zpgpool.cli.site import _label
from zpgpool.cli.site import _quiet_pool_log
from zpgpool.cli.site import load_zcml
from zpgpool.cli.site import short_dsn


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


NAME = "check"
HELP = "connect every pool a site declares"
DESCRIPTION = ("Load a site's ZCML, connect each registered pool once and "
               "show what it connects to. Exits with 1 when a pool cannot "
               "serve.")


def add_arguments(check):
    check.add_argument("zcml", help="the site's ZCML file")
    add_zope_conf(check)


run = cmd_check
