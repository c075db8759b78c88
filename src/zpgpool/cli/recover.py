"""``zpgpool recover``: list a pool's in-doubt prepared transactions and
commit or roll them back (by hand, or as a ZODB FileStorage decided)."""
import contextlib
import datetime
import os

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
from zpgpool.cli.site import resolve_dsn
from zpgpool.cli.site import short_dsn


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


NAME = "recover"
HELP = "resolve a pool's in-doubt prepared transactions"
DESCRIPTION = ("List the prepared (two-phase) transactions a pool left in "
               "doubt, found by the prefix of their ids, and commit or roll "
               "them back.")


def add_arguments(recover):
    source = recover.add_mutually_exclusive_group(required=True)
    source.add_argument("--zcml", help="a site's ZCML file declaring the "
                        "pool(s)")
    source.add_argument("--dsn", help="the database, when not using --zcml:"
                        " a libpq connection string, env:NAME (read from the "
                        "environment variable NAME) or file:PATH (read from "
                        "a file), so that no password is typed on the "
                        "command line")
    add_zope_conf(recover)
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


run = cmd_recover
