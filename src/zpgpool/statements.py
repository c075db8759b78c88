"""What a statement does beyond its transaction, as the transaction
integration needs to know it: whether it changes the session (and must be
undone before COMMIT), runs LISTEN, or begins or ends a transaction
itself; the statements that undo session changes; and the BEGIN that
opens a pool's managed transactions.

Plain functions of the statement's text, with no connection of their own.
"""
import re

import psycopg2.extensions as _ext
from psycopg2 import sql


# Statements that change the session beyond the transaction: settings,
# temporary tables, prepared statements, LISTEN, held cursors. A
# transaction that ran one undoes it before its COMMIT (see SESSION_RESET).
_SESSION_STATEMENT = re.compile(
    r"\s*(SET\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)|RESET\b|DISCARD\b"
    r"|CREATE\s+(GLOBAL\s+|LOCAL\s+)?TEMP|PREPARE\s|LISTEN\b|DECLARE\b"
    r"|LOAD\b)", re.IGNORECASE)
_LISTEN_STATEMENT = re.compile(r"\s*LISTEN\b", re.IGNORECASE)
# Functions whose effect outlives the transaction: session advisory locks
# (not the pg_*advisory_xact_* ones) and set_config, which changes the
# session unless its third argument is true (not worth parsing: a reset
# too many costs one round trip, one too few leaks a setting).
_SESSION_CALLS = re.compile(
    r"\b(pg_(try_)?advisory_(un)?lock(_shared|_all)?|set_config)\s*\(",
    re.IGNORECASE)
# Statements that begin or end a transaction themselves: never bundled
# behind the managed BEGIN.
_TRANSACTION_STATEMENT = re.compile(
    r"\s*(BEGIN|START|COMMIT|END|ROLLBACK|ABORT)\b", re.IGNORECASE)
# Statements that only read, unless a function they call writes: a
# two-phase transaction of only these commits in its vote if the server
# says it wrote nothing, else prepares (see datamanager.py). pg_notify()
# counts as a write: PREPARE TRANSACTION refuses a transaction that
# notified.
_READ_STATEMENT = re.compile(
    r"\s*(SELECT|SHOW|VALUES|TABLE|FETCH|MOVE|CLOSE|SAVEPOINT|RELEASE)\b",
    re.IGNORECASE)
_NOTIFY_CALL = re.compile(r"\bpg_notify\s*\(", re.IGNORECASE)

# What a statement does, as statement_effect() answers: a set of flags.
KEEPS_SESSION = 0
CHANGES_SESSION = 1     # settings, temporary tables, locks, ...
LISTENS = 2             # LISTEN, which PREPARE TRANSACTION refuses
CONTROLS_TRANSACTION = 4
WRITES = 8              # anything but a statement that only reads

# Everything DISCARD ALL undoes, in statements PostgreSQL accepts inside a
# transaction block (DISCARD ALL itself is refused there). Sent just before
# COMMIT or PREPARE, on the server connection the transaction ran on: behind
# a transaction-mode PgBouncer, a reset sent after COMMIT would run on
# whatever server connection is free by then, and the next client would
# already have seen the state it meant to clear.
SESSION_RESET = ("CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; "
                 "DEALLOCATE ALL; SELECT pg_advisory_unlock_all(); "
                 "DISCARD PLANS; DISCARD SEQUENCES; DISCARD TEMP")
# PREPARE TRANSACTION refuses a transaction that ran UNLISTEN, and a
# two-phase transaction never ran LISTEN (it is refused), so only one-phase
# transactions send it.
ONE_PHASE_SESSION_RESET = SESSION_RESET + "; UNLISTEN *"
# What ROLLBACK leaves behind: session advisory locks and prepared
# statements are not transactional.
ROLLBACK_SESSION_RESET = "SELECT pg_advisory_unlock_all(); DEALLOCATE ALL"

_effects = {}
_LONGEST_KEPT = 4096
# The effect of a query seen before, else None: statement_effect() without
# a Python call, for the managed cursors' hot path.
known_effect = _effects.get


def statement_effect(query):
    """Tell what the text ``query`` does beyond its transaction, as flags:
    CHANGES_SESSION, LISTENS, CONTROLS_TRANSACTION; and WRITES, unless it
    only reads (the functions it calls aside)."""
    # Applications run the same few statements again and again; long ones
    # (psycopg2.extras.execute_values pages, with the values in the text)
    # are seldom sent twice and are not kept.
    effect = _effects.get(query)
    if effect is None:
        effect = _statement_effect(query)
        if len(query) <= _LONGEST_KEPT:
            if len(_effects) > 2000:
                _effects.clear()
            _effects[query] = effect
    return effect


def _statement_effect(query):
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    if _TRANSACTION_STATEMENT.match(query):
        return CONTROLS_TRANSACTION | WRITES
    writes = 0 if _READ_STATEMENT.match(query) \
        and not _NOTIFY_CALL.search(query) else WRITES
    if _SESSION_STATEMENT.match(query):
        if _LISTEN_STATEMENT.match(query):
            return CHANGES_SESSION | LISTENS | writes
        return CHANGES_SESSION | writes
    if _SESSION_CALLS.search(query):
        return CHANGES_SESSION | writes
    return writes


def call_effect(procname):
    """Tell what ``cursor.callproc(procname, ...)`` does beyond its
    transaction, as statement_effect() does for a query: psycopg2 sends
    ``SELECT * FROM procname(...)``, with the name as given."""
    if not isinstance(procname, str):
        return KEEPS_SESSION     # psycopg2 refuses it
    return statement_effect("SELECT * FROM %s(" % procname)


def changes_session(query, conn):
    """Tell whether ``query`` may leave state in the session."""
    if isinstance(query, sql.Composable):
        query = query.as_string(conn)
    elif not isinstance(query, (str, bytes)):
        return True
    return bool(statement_effect(query) & CHANGES_SESSION)


_ISOLATION_NAMES = {
    _ext.ISOLATION_LEVEL_READ_COMMITTED: "READ COMMITTED",
    _ext.ISOLATION_LEVEL_REPEATABLE_READ: "REPEATABLE READ",
    _ext.ISOLATION_LEVEL_SERIALIZABLE: "SERIALIZABLE",
    _ext.ISOLATION_LEVEL_READ_UNCOMMITTED: "READ UNCOMMITTED",
}


def begin_statement(pool):
    """The BEGIN that opens each of ``pool``'s managed transactions."""
    words = ["BEGIN"]
    if pool.isolation_level is not None:
        words.append("ISOLATION LEVEL "
                     + _ISOLATION_NAMES[pool.isolation_level])
    if pool.readonly:
        words.append("READ ONLY")
    if pool.deferrable:
        words.append("DEFERRABLE")
    return " ".join(words)
