"""The pool's session settings on its connections: a new connection's
cursor factory and transaction characteristics, and bringing a returned
connection back to them (rollback, autocommit off, cursor factory and
characteristics restored, its borrower's notices and notifications
dropped) before anyone else gets it.

``SessionReset`` is mixed into ``CorePool`` (core.py), whose return path
calls ``_reset_for_reuse`` outside the lock; only the ``returned_bad``
counter is touched under ``_lock``.
"""
import psycopg2
import psycopg2.extensions as _ext

from zpgpool.connection import _get_cursor_factory
from zpgpool.connection import _set_cursor_factory


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
        if status != _OK_STATUS:
            with self._lock:
                self._counters["returned_bad"] += 1
            if status not in _ROLLBACK_STATUS:
                return "status", False
            try:
                if _get_autocommit(conn):
                    # Nothing that psycopg2 began: its rollback() would
                    # send nothing (the transaction integration's BEGIN).
                    cur = _ext.cursor(conn)
                    cur.execute("ROLLBACK")
                    cur.close()
                else:
                    _ext.connection.rollback(conn)
            except psycopg2.Error:
                return _LOST
        try:
            if _get_autocommit(conn):
                _set_autocommit(conn, False)
            if conn._zp_session_changed:
                if _get_cursor_factory(conn) is not conn._zp_cursor_factory:
                    _set_cursor_factory(conn, conn._zp_cursor_factory)
                self._restore_characteristics(conn)
                conn._zp_session_changed = False
        except psycopg2.Error:
            return _LOST
        _forget_messages(conn)
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


def _forget_messages(conn):
    """Drop the notices and notifications a connection's borrower received:
    they may tell the next one what it did."""
    for received in (conn.notices, conn.notifies):
        if received:
            received.clear()
