"""The pool's session settings on its connections: a new connection's
cursor factory and transaction characteristics, and bringing a returned
connection back to how the pool handed it out before anyone else gets it:
rollback, the server session reset if its borrower changed it, and the
client side put back (autocommit off, cursor factory, characteristics,
typecasters, client encoding; notices and notifications dropped).

``SessionReset`` is mixed into ``CorePool`` (core.py), whose return path
calls ``_reset_for_reuse`` outside the lock; only the ``returned_bad``
counter is touched under ``_lock``.
"""
import logging
import re

import psycopg2
import psycopg2.extensions as _ext

from zpgpool.connection import _get_cursor_factory
from zpgpool.connection import _set_cursor_factory
from zpgpool.connection import run_statement


logger = logging.getLogger("zpgpool")

_get_autocommit = _ext.connection.autocommit.__get__
_set_autocommit = _ext.connection.autocommit.__set__
_OK_STATUS = _ext.TRANSACTION_STATUS_IDLE
_ROLLBACK_STATUS = (_ext.TRANSACTION_STATUS_INTRANS,
                    _ext.TRANSACTION_STATUS_INERROR)
# A connection whose session is gone: the reason shown in events and logs,
# and the flag that makes the pool's _discard retire every older connection.
_LOST = ("broken", True)


class SessionReset:
    """A connection's session, set up and reset to the pool's settings."""

    def _prepare_connection(self, conn):
        """The pool's own setup of a new connection, before ``configure``."""
        if self._cursor_factory is not None:
            _set_cursor_factory(conn, self._cursor_factory)
        if self.isolation_level is not None or self.readonly \
                or self.deferrable:
            # Kept by psycopg2 and sent with each BEGIN, never as SET.
            self._restore_characteristics(conn)

    def _reset_for_reuse(self, conn, close=False):
        """Bring a connection back to idle.

        Returns ``(None, False)`` when done, else why not and whether the
        session was found lost.
        """
        # closed == 2, or a status libpq cannot tell: the session is gone,
        # whatever the caller meant; closed == 1: its caller closed it, as
        # psycopg2's pools allow, which says nothing about the server.
        if conn.closed == 2:
            return _LOST
        status = _ext.TRANSACTION_STATUS_UNKNOWN if conn.closed \
            else conn.get_transaction_status()
        if status == _ext.TRANSACTION_STATUS_UNKNOWN and not conn.closed:
            return _LOST
        if close or conn.closed:
            return "closed by caller", False
        if conn.status == _ext.STATUS_PREPARED:
            # psycopg2 refuses everything on it until that transaction is
            # committed or rolled back: its borrower's decision, not the
            # pool's. The server keeps it meanwhile.
            logger.warning(
                "%s: a connection came back holding a prepared two-phase "
                "transaction (tpc_prepare() without tpc_commit() or "
                "tpc_rollback()); the connection is closed and the "
                "transaction stays prepared on the server until someone "
                "commits or rolls it back (see pg_prepared_xacts)",
                self.label)
            return "prepared transaction left", False
        if status != _OK_STATUS:
            with self._lock:
                self._counters["returned_bad"] += 1
            if status not in _ROLLBACK_STATUS:
                return "status", False
            try:
                if _get_autocommit(conn):
                    # Nothing that psycopg2 began: its rollback() would
                    # send nothing (the transaction integration's BEGIN).
                    run_statement(conn, "ROLLBACK")
                else:
                    try:
                        _ext.connection.rollback(conn)
                    except psycopg2.ProgrammingError:
                        # Refused before anything is sent: a two-phase
                        # transaction (tpc_begin), which only this ends.
                        _ext.connection.tpc_rollback(conn)
            except psycopg2.Error:
                return _LOST
        try:
            if conn._zp_session_dirty:
                _set_autocommit(conn, True)
                run_statement(conn, "DISCARD ALL")
                # DISCARD ALL undid what configure set on the session.
                if not self.reconfigure(conn):
                    return "configure failed after a session reset", False
                _restore_encoding(conn, server_reset=True)
            if _get_autocommit(conn):
                _set_autocommit(conn, False)
            if conn._zp_session_changed:
                if _get_cursor_factory(conn) is not conn._zp_cursor_factory:
                    _set_cursor_factory(conn, conn._zp_cursor_factory)
                self._restore_characteristics(conn)
                _restore_encoding(conn)
                conn._zp_session_changed = False
        except psycopg2.Error as exc:
            if conn.closed or conn.get_transaction_status() \
                    == _ext.TRANSACTION_STATUS_UNKNOWN:
                return _LOST
            logger.warning("%s: could not reset a returned connection's "
                           "session (%s); it is discarded", self.label,
                           " ".join(str(exc).split()))
            return "session reset failed", False
        _restore_client_side(conn)
        return None, False

    def _restore_characteristics(self, conn):
        """Give a connection the pool's transaction characteristics (those
        sent with psycopg2's BEGIN)."""
        _ext.connection.set_session(
            conn,
            isolation_level="DEFAULT" if self.isolation_level is None
            else self.isolation_level,
            readonly=self.readonly or "DEFAULT",
            deferrable=self.deferrable or "DEFAULT")


def _encoding_key(name):
    # psycopg2 spells SQL_ASCII "SQLASCII", the server does not.
    return re.sub("[^0-9A-Z]", "", (name or "").upper())


def _restore_encoding(conn, server_reset=False):
    """Give the connection its client encoding of when the pool opened it,
    on both sides: psycopg2's record (``conn.encoding``) and, after a
    ``DISCARD ALL`` reset it under that record, the server's."""
    wanted = conn._zp_encoding
    if conn.encoding != wanted:
        _ext.connection.set_client_encoding(conn, wanted)
    elif server_reset and _encoding_key(
            conn.get_parameter_status("client_encoding")) \
            != _encoding_key(wanted):
        run_statement(conn, "SET client_encoding TO %s", (wanted,))


def _restore_client_side(conn):
    """Put back the typecasters registered on the connection and its
    notices and notifies lists, which psycopg2 lets a borrower change
    without a call the pool would see, and drop the notices and
    notifications its borrower received: they may tell the next one what
    it did."""
    types = conn.string_types
    if types != conn._zp_types:
        types.clear()
        types.update(conn._zp_types)
    if conn.notices is not conn._zp_notices:
        conn.notices = conn._zp_notices
    if conn.notifies is not conn._zp_notifies:
        conn.notifies = conn._zp_notifies
    for received in (conn.notices, conn.notifies):
        if received:
            received.clear()
