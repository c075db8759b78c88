"""The transaction integration: each thread's connection joined to the
transaction manager, committed one-phase or two-phase.

The flow for a thread, as seen from ``ConnectionPool.connection()``:

- the first call in a transaction takes the thread's connection (the one
  it had last time, unless another thread needed it meanwhile) and joins a
  data manager to the transaction: ``OnePhaseDataManager`` or
  ``TwoPhaseDataManager``, chosen once by the pool's ``twophase`` option;
- the connection runs in psycopg2's autocommit mode, so psycopg2 never
  sends a BEGIN of its own: the managed cursors (cursors.py) send the
  transaction's BEGIN (with the pool's isolation level, READ ONLY and
  DEFERRABLE) in the same message as its first statement, make sure the
  connection is part of the thread's *current* transaction, and turn
  serialization failures, deadlocks and lost sessions into retryable
  errors; what a statement does to the session is statements.py's call;
- the transaction ends in ``tpc_vote`` (COMMIT, or PREPARE TRANSACTION
  unless it wrote nothing), ``tpc_finish`` (COMMIT PREPARED) or
  ``abort``/``tpc_abort`` (ROLLBACK), sent by the data manager, after
  which the connection is parked: still the thread's, but lent to another
  thread that would otherwise wait.
"""
import itertools
import logging
import sys
import threading

import psycopg2
import psycopg2.extensions as _ext
from psycopg2 import sql
import transaction.interfaces
from zope.interface import implementer

from zpgpool import binding
from zpgpool.cursors import RETRYABLE_SQLSTATES
from zpgpool.cursors import _execute
from zpgpool.cursors import _managed_cursor_class
from zpgpool.cursors import translate_error
from zpgpool.errors import CommitUnknown
from zpgpool.errors import ConflictError
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import PoolError
from zpgpool.errors import SessionLost
from zpgpool.options import check_transaction_manager
from zpgpool.connection import is_disconnect
from zpgpool.connection import run_statement
from zpgpool.statements import CHANGES_SESSION
from zpgpool.statements import LISTENS
from zpgpool.statements import ONE_PHASE_SESSION_RESET
from zpgpool.statements import ROLLBACK_SESSION_RESET
from zpgpool.statements import SESSION_RESET
from zpgpool.statements import WRITES
from zpgpool.statements import begin_statement
from zpgpool.twophase import gid_prefix
from zpgpool.twophase import new_gid_after
from zpgpool.twophase import resolve_prepared
# Statement analysis lived here before zpgpool.statements; so did the
# recovery API before zpgpool.twophase: their names still work.
from zpgpool.statements import changes_session  # noqa: F401
from zpgpool.statements import statement_effect  # noqa: F401
from zpgpool.twophase import list_prepared  # noqa: F401
from zpgpool.twophase import recover  # noqa: F401
from zpgpool.twophase import zodb_decider  # noqa: F401


logger = logging.getLogger("zpgpool")

_IDLE = _ext.TRANSACTION_STATUS_IDLE
_INTRANS = _ext.TRANSACTION_STATUS_INTRANS
_INERROR = _ext.TRANSACTION_STATUS_INERROR
_get_ident = threading.get_ident
_get_autocommit = _ext.connection.autocommit.__get__
_set_autocommit = _ext.connection.autocommit.__set__
_modules = sys.modules
_PYRAMID_THREADLOCAL = "pyramid.threadlocal"
# -- several resources in one transaction ----------------------------------------
#
# A one-phase pool's COMMIT cannot be undone. It is safe only as the last
# vote of a transaction ("last resource commit"): every participant that can
# still say no has prepared before it. Hence the one-phase data manager
# sorts after every other participant, and a transaction may hold only one
# such irrevocable vote: of two, the second could fail after the first
# committed.

# A sort key after any other: the transaction package sorts its resources
# by these strings, and no other package uses the highest code point.
ONE_PHASE_SORT_KEY = "\U0010ffffzpgpool:%s"
TWO_PHASE_SORT_KEY = "~zpgpool:%s"


def _resources_of(txn):
    """The resources joined to ``txn`` so far.

    The transaction package offers no public list of them, hence the
    defensive look at its attribute: a transaction without one shows none.
    """
    return getattr(txn, "_resources", ())


def _refuse_second_one_phase_writer(pool, txn):
    """Refuse ``pool`` if ``txn`` already writes through another writable
    one-phase pool; before ``pool`` sends anything. (Mostly no resource
    has joined yet when a pool does.)"""
    for resource in _resources_of(txn):
        # (A pool joins each transaction once: any such one is another.)
        if isinstance(resource, OnePhaseDataManager) \
                and resource.state.writer:
            raise ConnectionMisuse(
                "%s cannot join a transaction that already writes through "
                "zpgpool pool %r: both are one-phase (twophase=False) and "
                "writable, and two one-phase COMMITs cannot be atomic (if "
                "the second failed, the first could not be undone); set "
                "twophase=True on all but one of the pools used in one "
                "transaction, or readonly=True on those that only read"
                % (pool.label, resource.pool.name))


def _foreign_one_phase_votes(resources):
    """The other packages' resources among a transaction's ``resources``
    that will COMMIT irrevocably in their vote, as far as zpgpool can
    recognise them.

    zope.sqlalchemy's one-phase session commits in its vote, and keeps a
    transaction (``tx``) until then only when it has work to commit.
    """
    found = []
    for resource in resources:
        cls = type(resource)
        if cls.__name__ == "SessionDataManager" \
                and cls.__module__ == "zope.sqlalchemy.datamanager" \
                and getattr(resource, "tx", None) is not None:
            found.append(resource)
    return found


def _pyramid_request_manager():
    """The transaction manager pyramid_tm runs this thread's Pyramid
    request in, or None (no Pyramid, no request, or no pyramid_tm)."""
    threadlocal = _modules.get(_PYRAMID_THREADLOCAL)
    if threadlocal is None:
        return None
    environ = getattr(threadlocal.get_current_request(), "environ", None)
    # pyramid_tm's tween records the manager of the request it runs.
    return environ.get("tm.manager") if environ is not None else None


def _manager_still_holding(txn):
    """The transaction manager whose current transaction ``txn`` still is;
    None when it was dropped (``free()``) without a commit or abort.

    The transaction package has no public way to ask; its managers keep
    the current transaction in ``_txn``, and each transaction its manager
    in ``_manager``.
    """
    manager = getattr(txn, "_manager", None)
    if manager is not None and getattr(manager, "_txn", None) is txn:
        return manager
    return None


class ThreadState:
    """One thread's use of one pool through ``connection()``.

    Lives in the pool's thread-local storage, so it dies with the thread.
    """

    def __init__(self, pool, holder):
        self.pool = pool
        self.holder = holder
        self.pool_tm = self.tm = tm = pool.transaction_manager
        self.ident = _get_ident()
        # This object lives in one thread only, so with the usual
        # thread-local manager it may ask that thread's own manager directly.
        if isinstance(tm, transaction.ThreadTransactionManager):
            tm = tm.manager
        # The pool's manager, and the one the connection last joined a
        # transaction of (another when connection() was given one).
        self._pool_get = self._get_transaction = tm.get
        self.txn = None     # the transaction joined, or None between them
        self.conn = None
        self.dm = None
        self.twophase = pool.twophase
        self.data_manager = TwoPhaseDataManager if pool.twophase \
            else OnePhaseDataManager
        self.begin = begin_statement(pool)
        # A writable one-phase pool: at most one per transaction.
        self.writer = not (pool.twophase or pool.readonly)
        self.gid_prefix = gid_prefix(pool)
        self.gid_key = self.gid_prefix + "gid"
        self.sort_key = (TWO_PHASE_SORT_KEY if pool.twophase
                         else ONE_PHASE_SORT_KEY) % pool.name
        # The connection's cursor_factory, and its managed cursor class:
        # PooledConnection.cursor() makes a plain conn.cursor() of that.
        self.plain_factory = None
        self.cursor_class = _managed_cursor_class(_ext.cursor)
        holder.manager = self

    def connection(self, tm=None):
        if tm is None:
            get = self._pool_get
        else:
            get = check_transaction_manager(self.pool.label, tm).get
        try:
            txn = get()
        except transaction.interfaces.NoTransaction:
            raise self._no_transaction() from None
        if txn is self.txn:
            return self.conn
        if tm is None:
            tm = self.pool_tm
            if _PYRAMID_THREADLOCAL in _modules:    # (no call for Zope)
                self._refuse_other_request_manager(tm)
        return self._join(txn, get, tm)

    def _refuse_other_request_manager(self, tm):
        """Refuse to join a transaction of the pool's manager ``tm`` while
        pyramid_tm runs the thread's request in another one, as with its
        ``explicit_manager``: nobody would commit that transaction."""
        request_tm = _pyramid_request_manager()
        if request_tm is not None and request_tm is not tm:
            raise ConnectionMisuse(
                "%s: this request's transaction belongs to pyramid_tm's "
                "request.tm (%r), not to the pool's transaction manager "
                "(%r), whose transaction nobody would commit: pass the "
                "request's to connection(), pool.connection(request.tm); or,"
                " to use the pool's own on purpose, "
                "pool.connection(pool.transaction_manager)"
                % (self.pool.label, request_tm, tm))

    def _no_transaction(self):
        """The error for a use outside a transaction of an explicit
        transaction manager."""
        return ConnectionMisuse(
            "%s: no transaction is active: the transaction manager is in "
            "explicit mode, so call its begin() before using the "
            "connection (a framework that begins each request's transaction "
            "in a manager of its own, as pyramid_tm's explicit_manager does, "
            "must be given that manager: pool.connection(request.tm))"
            % self.pool.label)

    def _join(self, txn, get=None, tm=None):
        dm = self.dm
        if dm is not None and not dm.finished:
            holder = _manager_still_holding(dm.txn)
            if holder is not None:
                # A transaction of another manager, still open: aborting
                # it would lose its work, and it cannot share the thread's
                # connection with this one.
                raise ConnectionMisuse(
                    "%s: this thread's connection is in an open transaction "
                    "of another transaction manager (%r); it joins one "
                    "transaction at a time: pass the manager of that "
                    "transaction to connection() (pool.connection(request.tm)"
                    " under pyramid_tm's explicit_manager), or end that "
                    "transaction first" % (self.pool.label, holder))
            # The previous transaction ended without telling us (it was
            # dropped); never carry its work over.
            dm.abort(dm.txn)
        if get is not None:
            self._get_transaction = get
            self.tm = tm
        pool = self.pool
        if self.writer:
            _refuse_second_one_phase_writer(pool, txn)
        conn = binding.take(pool, self.holder)
        conn._zp_managed = self
        if not _get_autocommit(conn):
            # The data manager sends BEGIN, COMMIT and ROLLBACK itself;
            # psycopg2 must not send a BEGIN of its own. (Undone if the
            # connection goes back to the pool.)
            _set_autocommit(conn, True)
            conn._zp_session_changed = True
        if self.twophase and not pool.twophase_checked:
            self._check_twophase(conn)
        dm = self.data_manager(self, conn, txn)
        txn.join(dm)
        if self.twophase:
            # A plain string gid, so that recovery can find it by prefix.
            # Its characters need no quoting (twophase.py), so the data
            # manager's statements carry it as a literal.
            dm.xid = gid = new_gid_after(self.gid_prefix)
            # Recorded with the other resources' commit (ZODB keeps it in
            # its transaction record), so that recovery can later tell
            # whether they committed; see zodb_decider().
            txn.setExtendedInfo(self.gid_key, gid)
        self.conn = conn
        self.dm = dm
        self.txn = txn
        return conn

    def _check_twophase(self, conn):
        """Fail on first use when the server cannot prepare transactions."""
        pool = self.pool
        allowed = run_statement(
            conn, "SELECT current_setting('max_prepared_transactions')::int")
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
        if dm.reset_after and not (conn.closed or dm.broken):
            dm.broken = not self._reset_session(conn)
        if dm.dirty and self.pool.configure is not None \
                and not (conn.closed or dm.broken):
            # The reset undid what configure set on the session. It runs
            # between transactions, on the plain connection.
            conn._zp_managed = None
            dm.broken = not self.pool.reconfigure(conn)
            conn._zp_managed = self
        if conn.closed or dm.broken:
            conn._zp_managed = None
            # Closed, not rolled back and kept: its session may still hold
            # what a failed reset could not clear.
            binding.put(self.pool, self.holder, close=True)
        else:
            self.pool.park(conn, self.holder)

    def _reset_session(self, conn):
        """DISCARD ALL after a failed transaction that changed the session,
        so no session state reaches the next transaction."""
        try:
            _execute(conn, "DISCARD ALL")
        except psycopg2.Error as exc:
            logger.warning("%s: could not reset the session (%s); the "
                           "connection is discarded", self.pool.label, exc)
            return False
        return True

    def thread_ended(self):
        """Called when the owning thread is gone; detach from its work
        (the pool rolls back what it left open)."""
        dm = self.dm
        self.dm = None
        self.txn = None
        if dm is not None:
            if not dm.finished:
                self._warn_uncommitted(dm, "a thread ended")
            dm.finished = True
            dm.conn = None

    def abandon(self, why):
        """Roll back the transaction still open in this thread, saying so;
        called when the process exits."""
        dm = self.dm
        if dm is not None and not dm.finished:
            self._warn_uncommitted(dm, why)
            dm.abort(dm.txn)

    def _warn_uncommitted(self, dm, why):
        if dm._pending():
            logger.warning(
                "%s: %s with statements that were never committed; they are"
                " rolled back (a transaction ends with transaction.commit(),"
                " or use 'with transaction.manager:')", self.pool.label, why)

    # -- the guards PooledConnection calls ----------------------------------------

    def refuse(self, what):
        raise ConnectionMisuse(
            "%s: %s is not allowed on a connection from connection(): the "
            "transaction manager commits or aborts it (use "
            "transaction.commit() / transaction.abort(), or getconn() for a "
            "connection you manage yourself)" % (self.pool.label, what))

    def before_statement(self, conn, effect, named=False):
        """Make sure ``conn`` belongs to this thread's current transaction,
        and note what the statement does to the session (``effect``, from
        statement_effect(); ``named`` for a server-side cursor).

        Returns the BEGIN to send first when the server holds no
        transaction for us yet, else None.
        """
        if self.conn is not conn or _get_ident() != self.ident:
            raise ConnectionMisuse(
                "%s: this connection is no longer yours: it was kept from an "
                "earlier transaction or another thread and has since gone "
                "back to the pool; call pool.connection() again"
                % self.pool.label)
        try:
            txn = self._get_transaction()
        except transaction.interfaces.NoTransaction:
            raise self._no_transaction() from None
        if txn is not self.txn:
            self._join(txn)
            if self.conn is not conn:
                self.refuse_lost()
        if effect or named:
            if effect & LISTENS and self.twophase:
                raise ConnectionMisuse(
                    "%s: LISTEN cannot run in a two-phase transaction: "
                    "PostgreSQL refuses to PREPARE a transaction that ran "
                    "LISTEN; listen on a connection from a pool with "
                    "twophase=False, or from getconn()" % self.pool.label)
            if effect & CHANGES_SESSION or named:
                # A named cursor is declared WITH HOLD (see cursor()).
                self.dm.dirty = True
            if effect & WRITES:
                self.dm.writes = True
        if conn.get_transaction_status() == _IDLE:
            self.dm.begun = True
            return self.begin
        return None

    def refuse_lost(self):
        raise ConnectionMisuse(
            "%s: the connection kept from an earlier transaction was lent to "
            "another thread while this one was idle; call pool.connection() "
            "again" % self.pool.label)

    def cursor(self, conn, args, kw):
        """A cursor whose statements join the current transaction."""
        if not args and not kw:
            # A plain conn.cursor() on a connection whose cursor_factory
            # changed: remember the managed class of the new one.
            factory = conn.cursor_factory
            self.cursor_class = _managed_cursor_class(factory or _ext.cursor)
            self.plain_factory = factory
            return _ext.connection.cursor(conn,
                                          cursor_factory=self.cursor_class)
        factory = kw.pop("cursor_factory", None) or conn.cursor_factory \
            or _ext.cursor
        if (args[0] if args else kw.get("name")) is not None:
            # psycopg2 refuses a named cursor without hold in autocommit
            # mode; held, it lives in the managed transaction and the
            # session reset before COMMIT closes it, as COMMIT would.
            if len(args) > 3:
                args = args[:3] + (True,) + args[4:]
            else:
                kw["withhold"] = True
        return _ext.connection.cursor(
            conn, *args, cursor_factory=_managed_cursor_class(factory), **kw)


@implementer(transaction.interfaces.IDataManager,
             transaction.interfaces.ISavepointDataManager,
             transaction.interfaces.IRetryDataManager)
class _DataManager:
    """Takes one thread's connection through one transaction: what the
    one-phase and two-phase data managers share.

    ``abort``, ``tpc_abort`` and ``tpc_finish`` never raise because the
    connection died, and may be called more than once.
    """

    # Each transaction has a data manager of its own: these start as the
    # class's, which is cheaper than setting them in __init__.
    xid = None          # the two-phase transaction id
    finished = False
    broken = False
    begun = False       # its BEGIN went to the server
    dirty = False       # a statement changed session state
    writes = False      # a statement may have written (statements.WRITES)
    # A failed transaction's session changes still to undo after its
    # ROLLBACK (a transaction in error cannot run the reset itself).
    reset_after = False

    def __init__(self, state, conn, txn):
        self.state = state
        self.pool = state.pool
        self.transaction_manager = state.tm
        self.conn = conn
        self.txn = txn

    def _pending(self):
        """Whether the server holds an open transaction for us."""
        conn = self.conn
        return conn is not None and not conn.closed \
            and conn.get_transaction_status() != _IDLE

    def _committable(self):
        """Whether there is anything to commit; raise if it cannot be."""
        conn = self.conn
        if conn is None:
            raise ConnectionMisuse("%s: the connection of this transaction "
                                   "was lost" % self.pool.label)
        if conn.closed:
            if not self.begun:
                return False    # lost, but it held no work
            # Its work went with the session (the server rolls back the
            # transaction of a session that ends): never a silent
            # success, even when the statement that found it dead had
            # its error caught.
            self.broken = True
            raise translate_error(psycopg2.OperationalError(
                "%s: the connection was lost before COMMIT was sent; the "
                "server rolled the transaction back, so nothing of it was "
                "committed" % self.pool.label), conn)
        status = conn.get_transaction_status()
        if status == _IDLE:
            return False    # no statement ran: nothing to send
        if status == _INERROR:
            # PostgreSQL would answer COMMIT with a silent ROLLBACK.
            raise PoolError(
                "%s: cannot commit: a statement failed earlier in this "
                "transaction, so PostgreSQL has aborted it; the whole "
                "transaction is rolled back" % self.pool.label)
        return True

    # -- abort ------------------------------------------------------------------

    def abort(self, txn):
        """Roll back; never fails because the connection died."""
        if self.finished:
            return
        self._rollback()
        self._finish()

    tpc_abort = abort

    def _rollback(self):
        conn = self.conn
        if conn is None or conn.closed:
            self.broken = self.broken or conn is not None
            return
        try:
            self._send_rollback(conn)
        except psycopg2.Error as exc:
            self.broken = True
            logger.warning("%s: rollback failed (%s); the connection is "
                           "discarded", self.pool.label, exc)

    def _send_rollback(self, conn):
        status = conn.get_transaction_status()
        if status == _IDLE:
            return
        if self.dirty:
            if status == _INTRANS:
                # On the transaction's own server connection, before
                # ROLLBACK (behind PgBouncer it may be another's after).
                _execute(conn, ROLLBACK_SESSION_RESET)
            else:
                # A failed transaction refuses every statement but
                # ROLLBACK. Sent in the ROLLBACK's own message, the reset
                # runs right after it on the same server connection,
                # before a transaction-mode PgBouncer can hand that to
                # another client (which the DISCARD ALL that follows, a
                # message of its own, would be too late for).
                _execute(conn, "ROLLBACK; " + ROLLBACK_SESSION_RESET)
                self.reset_after = True
                return
        _execute(conn, "ROLLBACK")

    def _finish(self):
        self.finished = True
        self.state.ended(self)

    # -- two-phase commit -----------------------------------------------------------

    #: What undoes a transaction's session changes before its vote's COMMIT
    #: or PREPARE, in the same message: on the transaction's own server
    #: connection, whatever PgBouncer does after.
    _session_reset = SESSION_RESET

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        """COMMIT or PREPARE, after undoing the transaction's session
        changes in the same message.

        Each kind sends its own final statement and says what a failure
        means for it (``_send_vote``). Both happen in the vote, so that
        PostgreSQL can still make the whole transaction fail.
        """
        conn = self.conn
        # The usual case, an open transaction, needs no closer look.
        if (conn is None or conn.get_transaction_status() != _INTRANS) \
                and not self._committable():
            return
        self._send_vote(txn, conn,
                        self._session_reset + "; " if self.dirty else "")

    # -- savepoints and retry -----------------------------------------------------

    def savepoint(self):
        return Savepoint(self)

    def should_retry(self, error):
        return isinstance(error, (ConflictError, SessionLost)) or \
            getattr(error, "pgcode", None) in RETRYABLE_SQLSTATES

    def __repr__(self):
        return "<%s pool=%r%s>" % (type(self).__name__, self.pool.name,
                                   " finished" if self.finished else "")


class OnePhaseDataManager(_DataManager):
    """COMMIT in the vote, which cannot be undone: so it votes last."""

    def sortKey(self):
        # After every other participant: those that can still say no
        # have prepared before this irrevocable COMMIT.
        return self.state.sort_key

    def commit(self, txn):
        if self.pool.readonly or not self.begun:
            return    # nothing it could commit
        # (Alone in its transaction, as it mostly is, there is no other.)
        resources = _resources_of(txn)
        others = _foreign_one_phase_votes(resources) \
            if len(resources) > 1 else ()
        if others:
            raise ConnectionMisuse(
                "%s: cannot commit one-phase beside %s, which also commits "
                "irrevocably in its vote: the two cannot be atomic; make one "
                "of them two-phase (twophase=True here, or zope.sqlalchemy's "
                "twophase=True)" % (self.pool.label, ", ".join(sorted({
                    type(o).__module__ + "." + type(o).__name__
                    for o in others}))))

    _session_reset = ONE_PHASE_SESSION_RESET

    def _send_vote(self, txn, conn, reset):
        """COMMIT, after the session ``reset`` (or "").

        Done in the vote so that a failing COMMIT, such as a serialization
        failure or a deferred constraint, still aborts the whole
        transaction before other resources finish.
        """
        try:
            _execute(conn, reset + "COMMIT")
        except psycopg2.Error as exc:
            if not is_disconnect(exc, conn):
                raise translate_error(exc)
            self.broken = True
            raise CommitUnknown(
                "%s: the connection was lost while COMMIT was on its way, so "
                "whether the transaction committed is unknown (%s); check "
                "whether its work is in the database before doing it again"
                " (transaction %r)" % (self.pool.label,
                                        " ".join(str(exc).split()),
                                        txn.description or "")) from exc

    def tpc_finish(self, txn):
        if not self.finished:
            self._finish()


# The vote of a two-phase transaction whose statements only read, in one
# message: COMMIT if the server gave the transaction no id, which it does
# at the first write (txid_current_if_assigned: PostgreSQL 10 and later).
# If it wrote -- through a function, say -- the division by zero stops the
# message before its COMMIT, and rolling back to the savepoint leaves the
# transaction as it was, to be prepared.
_COMMIT_IF_WROTE_NOTHING = (
    "SAVEPOINT zpgpool_vote; "
    "SELECT 1 / (txid_current_if_assigned() IS NULL)::int; COMMIT")
_PREPARE_AFTER_ALL = "ROLLBACK TO SAVEPOINT zpgpool_vote; "
_IT_WROTE = "22012"     # division_by_zero: the answer of the check above


class TwoPhaseDataManager(_DataManager):
    """PREPARE TRANSACTION in the vote, COMMIT PREPARED in tpc_finish."""

    prepared = False

    def sortKey(self):
        # After ZODB's (storage paths and names): "~" sorts after them, so
        # PostgreSQL can still veto the whole transaction in its vote.
        return self.state.sort_key

    def _vote_error(self, exc, conn):
        if is_disconnect(exc, conn):
            self.broken = True
            # Whether the PREPARE happened is unknown: abort rolls it
            # back from another connection if it did.
            self.prepared = True
        return translate_error(exc)

    def _send_vote(self, txn, conn, reset):
        """PREPARE TRANSACTION, after the session ``reset`` (or ""); COMMIT
        if the transaction wrote nothing.

        A transaction that wrote nothing has nothing to make durable or to
        keep atomic with the other participants, so it needs neither
        PREPARE TRANSACTION nor COMMIT PREPARED, each of which flushes the
        server's WAL to disk (XA calls this the read-only optimization).
        When all its statements only read (statements.WRITES), the server
        is asked whether one wrote after all, in the COMMIT's own message.
        """
        prepare = "PREPARE TRANSACTION '%s'" % self.xid
        if self.writes:
            prepare = reset + prepare
        else:
            try:
                _execute(conn, reset + _COMMIT_IF_WROTE_NOTHING)
                return
            except psycopg2.Error as exc:
                if exc.pgcode != _IT_WROTE:
                    # Nothing it wrote was committed (COMMIT runs only
                    # after the check): a failure before COMMIT,
                    # retryable when the session was lost.
                    self.broken = is_disconnect(exc, conn)
                    raise translate_error(exc, conn)
            # (The reset ran before the savepoint: it stays done.)
            prepare = _PREPARE_AFTER_ALL + prepare
        try:
            _execute(conn, prepare)
        except psycopg2.Error as exc:
            raise self._vote_error(exc, conn)
        self.prepared = True

    def tpc_finish(self, txn):
        """COMMIT PREPARED; never fails because the connection died."""
        if self.finished:
            return
        if self.prepared:
            try:
                _execute(self.conn, "COMMIT PREPARED '%s'" % self.xid)
            except psycopg2.Error as exc:
                self.broken = True
                logger.warning("%s: COMMIT PREPARED failed on its connection"
                               " (%s); retrying on a new one",
                               self.pool.label, exc)
                self._resolve_elsewhere(commit=True)
        self._finish()

    def _rollback(self):
        if not self.prepared:
            super()._rollback()
            return
        conn = self.conn
        try:
            if conn is None or conn.closed:
                raise psycopg2.InterfaceError("connection already closed")
            _execute(conn, "ROLLBACK PREPARED '%s'" % self.xid)
        except psycopg2.Error as exc:
            self.broken = True
            logger.warning("%s: ROLLBACK PREPARED failed (%s); retrying on a "
                           "new connection", self.pool.label, exc)
            self._resolve_elsewhere(commit=False)

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
