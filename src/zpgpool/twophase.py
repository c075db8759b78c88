"""Two-phase transaction ids, and the resolution of transactions left
prepared ("in doubt") by a process that died between PREPARE TRANSACTION
and COMMIT PREPARED.

Every gid zpgpool prepares starts with ``zpgpool:NAME:``, so the in-doubt
transactions of one pool can be found, and only those resolved, from any
process. This is an operator's tool (``zpgpool recover``) as much as the
data manager's fallback when COMMIT PREPARED fails on its own connection.
"""
import functools
import hashlib
import itertools
import os
import re
import socket
import time

from zpgpool.errors import PoolError


@functools.lru_cache(maxsize=256)   # asked for at every transaction
def _safe_name(name):
    """The part of a pool name that may go into a transaction id.

    A name that had to be changed (characters replaced, or cut to 40) gets
    a digest of the real name, so that two pools ("a b" and "a_b") never
    share a prefix and recovery for one never resolves the other's.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if safe == name and 0 < len(name) <= 40:
        return name
    if not name:
        return "default"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass"))
    return "%s~%s" % (safe[:31], digest.hexdigest()[:8])


def gid_prefix(pool):
    """The prefix of every global transaction id ``pool`` prepares."""
    return "zpgpool:%s:" % _safe_name(pool.name)


_gid_counter = itertools.count(1)
_hostname = _safe_name(socket.gethostname())


def _name_process():
    """Host and process id, for the gids of this process (a forked child
    shares the parent's counter, so it must differ here)."""
    global _process
    _process = "%s:%d" % (_hostname, os.getpid())


_name_process()
if hasattr(os, "register_at_fork"):   # POSIX only, as in fork.py
    os.register_at_fork(after_in_child=_name_process)


def new_gid(pool):
    """A transaction id for ``pool`` that no other transaction has: host,
    process, a counter and the time, after the pool's prefix.

    Made of letters, digits and ``_.-~:`` only (``_safe_name``), so that
    it goes into a statement between single quotes as it is.
    """
    return new_gid_after(gid_prefix(pool))


def new_gid_after(prefix):
    """new_gid() for the pool whose gid_prefix() is ``prefix`` (for the
    data manager, which keeps it)."""
    return "%s%s:%d:%x" % (prefix, _process, next(_gid_counter),
                           int(time.time()))


def list_prepared(pool, older_than=0.0):
    """Return the prepared transactions of ``pool`` older than ``older_than``
    seconds, as (gid, prepared_at, owner, database) tuples, oldest first."""
    with pool.checkout() as conn:
        cur = conn.cursor()
        cur.execute(
            "SELECT gid, prepared, owner, database FROM pg_prepared_xacts"
            " WHERE starts_with(gid, %s) AND prepared < now() - %s * interval"
            " '1 second' AND database = current_database() ORDER BY prepared",
            (gid_prefix(pool), float(older_than)))
        return cur.fetchall()


def resolve_prepared(pool, gids, commit):
    """COMMIT PREPARED (or ROLLBACK PREPARED) each of ``gids``.

    Returns the gids resolved; a gid that is already gone is skipped.
    """
    done = []
    prefix = gid_prefix(pool)
    conn = pool.getconn()
    try:
        conn.autocommit = True
        cur = conn.cursor()
        for gid in gids:
            if not gid.startswith(prefix):
                raise PoolError("%s: refusing to resolve %r: not one of this "
                                "pool's transactions" % (pool.label, gid))
            cur.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s",
                        (gid,))
            if cur.fetchone() is None:
                continue
            # The gid is passed as a quoted literal, never pasted as text.
            cur.execute(("COMMIT PREPARED %s" if commit
                         else "ROLLBACK PREPARED %s"), (gid,))
            done.append(gid)
        conn.autocommit = False
    finally:
        pool.putconn(conn)
    return done


def recover(pool, older_than=60.0, commit=None, decide=None):
    """Resolve this pool's in-doubt prepared transactions.

    Lists those older than ``older_than`` seconds; commits them when
    ``commit`` is True, rolls them back when False, or asks ``decide(gid)``
    (True to commit) when given. With neither, only lists them. Returns a
    list of (gid, action) pairs, action being "commit", "rollback" or
    "listed".
    """
    result = []
    for gid, _prepared, _owner, _db in list_prepared(pool, older_than):
        if decide is not None:
            do_commit = bool(decide(gid))
        elif commit is None:
            result.append((gid, "listed"))
            continue
        else:
            do_commit = commit
        if resolve_prepared(pool, [gid], do_commit):
            result.append((gid, "commit" if do_commit else "rollback"))
    return result


def zodb_decider(storage, since=None):
    """Return ``decide(gid)`` for ``recover()``, answering from ZODB.

    A two-phase transaction that also wrote to ZODB carries its gid in
    ZODB's transaction record. If ZODB committed it, the prepared
    PostgreSQL transaction must commit too; if not, it must roll back.
    ``since`` (a POSIX time) limits the scan to recent records.
    """
    from ZODB.TimeStamp import TimeStamp
    start = None
    if since is not None:
        parts = time.gmtime(since)
        start = TimeStamp(*parts[:5] + (parts[5] + since % 1,)).raw()
    committed = set()
    for record in storage.iterator(start):
        for key, value in record.extension.items():
            if isinstance(key, str) and key.startswith("zpgpool:") \
                    and key.endswith(":gid"):
                committed.add(value)
    return committed.__contains__
