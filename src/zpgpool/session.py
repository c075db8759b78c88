"""The pool's session settings on its connections: a new connection's
cursor factory and transaction characteristics, and bringing a returned
connection back to them (rollback, autocommit off, characteristics
restored) before anyone else gets it.

``SessionReset`` is mixed into ``CorePool`` (core.py), whose return path
calls ``_reset_for_reuse`` outside the lock; only the ``returned_bad``
counter is touched under ``_lock``.
"""
import psycopg2
import psycopg2.extensions as _ext


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
            conn.cursor_factory = self._cursor_factory
        if self.isolation_level is not None or self.readonly \
                or self.deferrable:
            # Kept by psycopg2 and sent with each BEGIN, never as SET.
            self._restore_session(conn)

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
                self._restore_session(conn)
        except psycopg2.Error:
            return _LOST
        return None, False

    def _restore_session(self, conn):
        """Give a borrower's connection back the pool's transaction
        characteristics (those sent with psycopg2's BEGIN)."""
        _ext.connection.set_session(
            conn,
            isolation_level="DEFAULT" if self.isolation_level is None
            else self.isolation_level,
            readonly=self.readonly or "DEFAULT",
            deferrable=self.deferrable or "DEFAULT")
        conn._zp_session_changed = False
