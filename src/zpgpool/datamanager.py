"""The transaction integration: each thread's connection joined to the
transaction manager, committed one-phase or two-phase.

The flow for a thread, as seen from ``ConnectionPool.connection()``:

- the first call in a transaction takes the thread's connection (the one
  it had last time, unless another thread needed it meanwhile) and joins a
  ``ConnectionDataManager`` to the transaction;
- statements run through managed cursors, which first make sure the
  connection is part of the thread's *current* transaction, and turn
  serialization failures and deadlocks into retryable errors;
- the transaction ends in ``tpc_vote`` (COMMIT or PREPARE TRANSACTION),
  ``tpc_finish`` (COMMIT PREPARED) or ``abort``/``tpc_abort`` (ROLLBACK),
  after which the connection is parked: still the thread's, but lent to
  another thread that would otherwise wait.
"""
import hashlib
import itertools
import logging
import os
import re
import socket
import threading
import time

import psycopg2
import psycopg2.extensions as _ext
from psycopg2 import sql
import transaction.interfaces
from zope.interface import implementer

from zpgpool import binding
from zpgpool.errors import ConflictError
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import PoolError
from zpgpool.errors import SessionLost
from zpgpool.connection import is_disconnect


logger = logging.getLogger("zpgpool")

# Serialization failure and deadlock: the transaction may succeed if run
# again, so the transaction manager and Zope's publisher should retry it.
RETRYABLE_SQLSTATES = frozenset(("40001", "40P01"))

_IDLE = _ext.TRANSACTION_STATUS_IDLE
_get_ident = threading.get_ident
_retryable_classes = {}


def _retryable_class(cls, marker):
    """Return a subclass of psycopg2 error ``cls`` that is also ``marker``
    (a TransientError), so the transaction manager retries it."""
    sub = _retryable_classes.get((cls, marker))
    if sub is None:
        sub = type(cls.__name__, (cls, marker), {
            "__module__": cls.__module__,
            "__doc__": "%s, retryable by the transaction manager."
                       % cls.__name__})
        _retryable_classes[cls, marker] = sub
    return sub


def translate_error(exc, fresh_conn=None):
    """Make an error the transaction may survive by running again
    retryable, in place.

    That is a serialization failure or a deadlock, and -- when
    ``fresh_conn`` is given, the connection of a transaction that had sent
    nothing yet -- a lost session. The exception keeps its psycopg2 class
    (as a base), its message, its pgcode and its diagnostics, so existing
    ``except`` clauses still match.
    """
    if isinstance(exc, transaction.interfaces.TransientError):
        return exc
    if getattr(exc, "pgcode", None) in RETRYABLE_SQLSTATES:
        exc.__class__ = _retryable_class(type(exc), ConflictError)
    elif fresh_conn is not None and is_disconnect(exc, fresh_conn):
        exc.__class__ = _retryable_class(type(exc), SessionLost)
    return exc


def _guarded(base, query=False):
    """Wrap cursor method ``base`` so that it joins the current transaction
    first and makes conflicts retryable."""
    def method(self, *args, **kw):
        conn = self.connection
        managed = conn._zp_managed
        if managed is None:
            raise ConnectionMisuse(
                "zpgpool: this cursor belongs to a connection that went back "
                "to its pool; call pool.connection() and open a new cursor")
        # Whether the server has seen nothing of this transaction yet.
        fresh = not conn.closed and conn.get_transaction_status() == _IDLE
        try:
            managed.before_statement(conn,
                                     args[0] if args and query else None)
            return base(self, *args, **kw)
        except psycopg2.Error as exc:
            raise translate_error(exc, conn if fresh else None)
    method.__name__ = base.__name__
    return method


# The cursor methods that send statements; the first two take the query.
_STATEMENT_METHODS = (("execute", True), ("executemany", True),
                      ("callproc", False), ("copy_expert", False),
                      ("copy_from", False), ("copy_to", False))
_cursor_classes = {}


def _managed_cursor_class(factory):
    """Return a subclass of cursor class ``factory`` whose statements join
    the current transaction (cached per factory)."""
    cls = _cursor_classes.get(factory)
    if cls is None:
        methods = {name: _guarded(getattr(factory, name), query)
                   for name, query in _STATEMENT_METHODS}
        methods["__doc__"] = ("%s whose statements join the current "
                              "transaction." % factory.__name__)
        cls = type("Managed" + factory.__name__, (factory,), methods)
        _cursor_classes[factory] = cls
    return cls


# Statements that change the session beyond the transaction: settings,
# temporary tables, prepared statements, LISTEN, held cursors. After a
# transaction that ran one, the session is reset so that the next request
# on the connection starts clean.
_SESSION_STATEMENT = re.compile(
    r"\s*(SET\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)|RESET\b|DISCARD\b"
    r"|CREATE\s+(GLOBAL\s+|LOCAL\s+)?TEMP|PREPARE\s|LISTEN\b|DECLARE\b"
    r"|LOAD\b)", re.IGNORECASE)
_SESSION_CALLS = ("set_config", "advisory_lock", "advisory_unlock")


_session_answers = {}


def changes_session(query, conn):
    """Tell whether ``query`` may leave state in the session."""
    if isinstance(query, str):
        # Applications run the same few statements again and again.
        answer = _session_answers.get(query)
        if answer is None:
            answer = _changes_session(query)
            if len(_session_answers) > 2000:
                _session_answers.clear()
            _session_answers[query] = answer
        return answer
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    elif isinstance(query, sql.Composable):
        query = query.as_string(conn)
    elif not isinstance(query, str):
        return True
    return _changes_session(query)


def _changes_session(query):
    if _SESSION_STATEMENT.match(query):
        return True
    lowered = query.lower()
    return any(call in lowered and "xact" not in lowered
               for call in _SESSION_CALLS)


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


class ThreadState:
    """One thread's use of one pool through ``connection()``.

    Lives in the pool's thread-local storage, so it dies with the thread.
    """

    def __init__(self, pool, holder):
        self.pool = pool
        self.holder = holder
        self.tm = tm = pool.transaction_manager
        self.ident = _get_ident()
        # This object lives in one thread only, so with the usual
        # thread-local manager it may ask that thread's own manager directly.
        if isinstance(tm, transaction.ThreadTransactionManager):
            tm = tm.manager
        self._get_transaction = tm.get
        self.txn = None     # the transaction joined, or None between them
        self.conn = None
        self.dm = None
        holder.manager = self

    def connection(self):
        try:
            txn = self._get_transaction()
        except transaction.interfaces.NoTransaction:
            txn = self._current_transaction()
        if txn is self.txn:
            return self.conn
        return self._join(txn)

    def _current_transaction(self):
        try:
            return self._get_transaction()
        except transaction.interfaces.NoTransaction:
            raise ConnectionMisuse(
                "%s: no transaction is active: the transaction manager is in "
                "explicit mode, so call its begin() before using the "
                "connection" % self.pool.label) from None

    def _join(self, txn):
        dm = self.dm
        if dm is not None and not dm.finished:
            # The previous transaction ended without telling us (for
            # example it was dropped); never carry its work over.
            dm.abort(dm.txn)
        pool = self.pool
        conn = binding.take(pool, self.holder)
        conn._zp_managed = self
        if conn.autocommit:
            _ext.connection.autocommit.__set__(conn, False)
        if pool.twophase and not pool.twophase_checked:
            self._check_twophase(conn)
        dm = ConnectionDataManager(self, conn, txn)
        txn.join(dm)
        if dm.xid is not None:
            # Recorded with the other resources' commit (ZODB keeps it in
            # its transaction record), so that recovery can later tell
            # whether they committed; see zodb_decider().
            txn.setExtendedInfo(gid_prefix(pool) + "gid", dm.xid)
        self.conn = conn
        self.dm = dm
        self.txn = txn
        return conn

    def _check_twophase(self, conn):
        """Fail on first use when the server cannot prepare transactions."""
        pool = self.pool
        cur = _ext.cursor(conn)
        try:
            cur.execute("SELECT current_setting('max_prepared_transactions')"
                        "::int")
            allowed = cur.fetchone()[0]
        finally:
            cur.close()
            _ext.connection.rollback(conn)
        if allowed <= 0:
            conn._zp_managed = None
            binding.put(pool, self.holder)
            raise PoolError(
                "%s: twophase=True needs the server setting "
                "max_prepared_transactions > 0, but it is %d; set it in "
                "postgresql.conf and restart the server, or use "
                "twophase=False" % (pool.label, allowed))
        pool.twophase_checked = True

    def ended(self, dm):
        """The transaction of ``dm`` is over: park the connection."""
        if self.dm is not dm:
            return
        self.txn = None
        conn = dm.conn
        if conn is None:
            return
        if dm.dirty and not (conn.closed or dm.broken):
            dm.broken = not self._reset_session(conn)
        if conn.closed or dm.broken:
            conn._zp_managed = None
            binding.put(self.pool, self.holder)
        else:
            self.pool.park(conn, self.holder)

    def _reset_session(self, conn):
        """DISCARD ALL, so no session state reaches the next transaction."""
        try:
            _ext.connection.autocommit.__set__(conn, True)
            cur = _ext.cursor(conn)
            cur.execute("DISCARD ALL")
            cur.close()
            _ext.connection.autocommit.__set__(conn, False)
        except psycopg2.Error as exc:
            logger.warning("%s: could not reset the session (%s); the "
                           "connection is discarded", self.pool.label, exc)
            return False
        return True

    def thread_ended(self):
        """Called when the owning thread is gone; detach from its work."""
        dm = self.dm
        self.dm = None
        self.txn = None
        if dm is not None:
            dm.finished = True
            dm.conn = None

    # -- the guards PooledConnection calls ----------------------------------------

    def refuse(self, what):
        raise ConnectionMisuse(
            "%s: %s is not allowed on a connection from connection(): the "
            "transaction manager commits or aborts it (use "
            "transaction.commit() / transaction.abort(), or getconn() for a "
            "connection you manage yourself)" % (self.pool.label, what))

    def before_statement(self, conn, query=None):
        """Make sure ``conn`` belongs to this thread's current transaction."""
        if self.conn is not conn or _get_ident() != self.ident:
            raise ConnectionMisuse(
                "%s: this connection is no longer yours: it was kept from an "
                "earlier transaction or another thread and has since gone "
                "back to the pool; call pool.connection() again"
                % self.pool.label)
        txn = self._current_transaction()
        if txn is not self.txn:
            self._join(txn)
            if self.conn is not conn:
                self.refuse_lost()
        dm = self.dm
        if query is not None and not dm.dirty and changes_session(query, conn):
            dm.dirty = True
        if dm.xid is not None and not dm.tpc_begun \
                and conn.get_transaction_status() == _IDLE:
            # psycopg2 must know of the two-phase transaction from its
            # BEGIN on; it sends that BEGIN instead of the implicit one.
            _ext.connection.tpc_begin(conn, dm.xid)
            dm.tpc_begun = True

    def refuse_lost(self):
        raise ConnectionMisuse(
            "%s: the connection kept from an earlier transaction was lent to "
            "another thread while this one was idle; call pool.connection() "
            "again" % self.pool.label)

    def cursor(self, conn, args, kw):
        """A cursor whose statements join the current transaction."""
        factory = kw.pop("cursor_factory", None) or conn.cursor_factory \
            or _ext.cursor
        return _ext.connection.cursor(
            conn, *args, cursor_factory=_managed_cursor_class(factory), **kw)


@implementer(transaction.interfaces.IDataManager,
             transaction.interfaces.ISavepointDataManager,
             transaction.interfaces.IRetryDataManager)
class ConnectionDataManager:
    """Takes one thread's connection through one transaction.

    ``abort``, ``tpc_abort`` and ``tpc_finish`` never raise because the
    connection died, and may be called more than once.
    """

    def __init__(self, state, conn, txn):
        self.state = state
        self.pool = state.pool
        self.transaction_manager = state.tm
        self.conn = conn
        self.txn = txn
        self.finished = False
        self.broken = False
        self.dirty = False      # a statement changed session state
        self.prepared = False
        self.tpc_begun = False
        self.xid = None
        if self.pool.twophase:
            # A plain string gid, so that recovery can find it by prefix.
            self.xid = "%s%s:%d:%d:%x" % (
                gid_prefix(self.pool), _hostname, os.getpid(),
                next(_gid_counter), int(time.time()))

    def sortKey(self):
        # After ZODB's (storage paths and names): "~" sorts after them, so
        # PostgreSQL votes last and can still veto the whole transaction.
        return "~zpgpool:%s" % self.pool.name

    def _pending(self):
        """Whether the server holds an open transaction for us."""
        conn = self.conn
        return conn is not None and not conn.closed \
            and conn.get_transaction_status() != _IDLE

    # -- abort ------------------------------------------------------------------

    def abort(self, txn):
        """Roll back; never fails because the connection died."""
        if self.finished:
            return
        self._rollback()
        self._finish()

    def _rollback(self):
        conn = self.conn
        if conn is None or conn.closed:
            self.broken = self.broken or conn is not None
            return
        try:
            if self.prepared:
                _ext.connection.tpc_rollback(conn)
            elif self.tpc_begun:
                _ext.connection.tpc_rollback(conn)
            elif conn.get_transaction_status() != _IDLE:
                _ext.connection.rollback(conn)
        except psycopg2.Error as exc:
            self.broken = True
            logger.warning("%s: rollback failed (%s); the connection is "
                           "discarded", self.pool.label, exc)
            if self.prepared:
                self._resolve_elsewhere(commit=False)

    def _finish(self):
        self.finished = True
        self.state.ended(self)

    # -- two-phase commit -----------------------------------------------------------

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        """COMMIT (one-phase) or PREPARE TRANSACTION (two-phase).

        Done in the vote so that a failing COMMIT, such as a serialization
        failure or a deferred constraint, still aborts the whole
        transaction before other resources finish.
        """
        conn = self.conn
        if conn is None:
            raise ConnectionMisuse("%s: the connection of this transaction "
                                   "was lost" % self.pool.label)
        if not self._pending() and not self.tpc_begun:
            return  # no statement ran: nothing to send
        if conn.get_transaction_status() == _ext.TRANSACTION_STATUS_INERROR:
            # PostgreSQL would answer COMMIT with a silent ROLLBACK.
            raise PoolError(
                "%s: cannot commit: a statement failed earlier in this "
                "transaction, so PostgreSQL has aborted it; the whole "
                "transaction is rolled back" % self.pool.label)
        try:
            if self.tpc_begun:
                _ext.connection.tpc_prepare(conn)
                self.prepared = True
            else:
                _ext.connection.commit(conn)
        except psycopg2.Error as exc:
            if is_disconnect(exc, conn):
                self.broken = True
            raise translate_error(exc)

    def tpc_finish(self, txn):
        """COMMIT PREPARED; never fails because the connection died."""
        if self.finished:
            return
        if self.prepared:
            try:
                _ext.connection.tpc_commit(self.conn)
            except psycopg2.Error as exc:
                self.broken = True
                logger.warning("%s: COMMIT PREPARED failed on its connection"
                               " (%s); retrying on a new one",
                               self.pool.label, exc)
                self._resolve_elsewhere(commit=True)
        self._finish()

    def _resolve_elsewhere(self, commit):
        """Finish a prepared transaction from another connection."""
        gid = self.xid
        try:
            resolve_prepared(self.pool, [gid], commit=commit)
        except psycopg2.Error as exc:
            logger.error("%s: could not %s prepared transaction %r (%s); "
                         "run 'zpgpool recover' to resolve it",
                         self.pool.label,
                         "commit" if commit else "roll back", gid, exc)

    def tpc_abort(self, txn):
        """Roll back, prepared or not; never fails."""
        if self.finished:
            return
        self._rollback()
        self._finish()

    # -- savepoints and retry -----------------------------------------------------

    def savepoint(self):
        return Savepoint(self)

    def should_retry(self, error):
        return isinstance(error, (ConflictError, SessionLost)) or \
            getattr(error, "pgcode", None) in RETRYABLE_SQLSTATES

    def __repr__(self):
        return "<ConnectionDataManager pool=%r%s>" % (
            self.pool.name, " finished" if self.finished else "")


_savepoint_counter = itertools.count(1)


@implementer(transaction.interfaces.IDataManagerSavepoint)
class Savepoint:
    """A SAVEPOINT in the thread's PostgreSQL transaction."""

    def __init__(self, dm):
        self.dm = dm
        self.name = sql.Identifier("zpgpool_sp_%d" % next(_savepoint_counter))
        cur = dm.conn.cursor()
        try:
            cur.execute(sql.SQL("SAVEPOINT {}").format(self.name))
        finally:
            cur.close()

    def rollback(self):
        dm = self.dm
        if dm.finished or dm.conn is None:
            raise ConnectionMisuse("%s: cannot roll back to a savepoint of a "
                                   "finished transaction" % dm.pool.label)
        cur = dm.conn.cursor()
        try:
            cur.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(self.name))
        finally:
            cur.close()


# -- in-doubt recovery -------------------------------------------------------------

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
