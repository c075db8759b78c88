"""A pooled connection: the psycopg2 connection with the pool's record of
it, the states it goes through, how to tell that its session is lost, and
the cursors of a connection lent by ``getconn()``, which note the
statements that leave state in its session (see session.py for the reset
that follows).
"""
import contextlib
import enum
import os
import socket

import psycopg2
import psycopg2.extensions as _ext

from zpgpool.statements import CHANGES_SESSION
from zpgpool.statements import call_effect
from zpgpool.statements import changes_session
from zpgpool.statements import known_effect


class State(enum.Enum):
    """Where a connection is in its life; kept as ``_zp_state``.

    A connection is NEW from its connect until the pool hands it to the
    caller who opened it (USED) or, opened by the maintainer, to a waiter
    or the idle stack (USED or IDLE). USED goes to IDLE or to another caller when
    it is returned sound, through RETURNING when it must be rolled back
    first, or to PARKED when a thread keeps it between transactions (USED
    again when that thread or a thread it is lent to takes it). Any state
    ends in GONE when the pool closes the connection.
    """
    NEW = "new"              # just opened, not handed out yet
    IDLE = "idle"            # in the shared idle stack
    USED = "used"            # handed out to a caller
    PARKED = "parked"        # bound to a thread between transactions
    RETURNING = "returning"  # being handed back (rollback in progress)
    GONE = "gone"            # closed and forgotten by the pool


NEW = State.NEW
IDLE = State.IDLE
USED = State.USED
PARKED = State.PARKED
RETURNING = State.RETURNING
GONE = State.GONE


# SQLSTATEs that mean the session is gone: the 08 class (connection
# exception) and the server going away (admin, crash, cannot connect now).
_DISCONNECT_SQLSTATES = frozenset(("57P01", "57P02", "57P03"))


def is_disconnect(exc, conn=None):
    """Tell whether ``exc`` (raised by ``conn``) means the session is lost.

    Decided by the connection's state and the SQLSTATE, not by the message,
    which varies with libpq, SSL and the platform.
    """
    # A closed or broken connection's status is UNKNOWN too (libpq says
    # so for any connection that is not CONNECTION_OK).
    if conn is not None and \
            conn.get_transaction_status() == _ext.TRANSACTION_STATUS_UNKNOWN:
        return True
    code = getattr(exc, "pgcode", None)
    if code:
        return code.startswith("08") or code in _DISCONNECT_SQLSTATES
    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) \
        and conn is None


def _characteristic(name):
    """A transaction characteristic of psycopg2's connection whose change
    the pool notices (and undoes when the connection comes back)."""
    base = getattr(_ext.connection, name)

    def set_value(self, value):
        if self._zp_managed is not None:
            self._zp_managed.refuse(name)
        self._zp_session_changed = True
        base.__set__(self, value)
    return property(base.__get__, set_value, doc=base.__doc__)


_connection_cursor = _ext.connection.cursor
# psycopg2's own cursor_factory attribute, past PooledConnection's property.
_get_cursor_factory = _ext.connection.cursor_factory.__get__
_set_cursor_factory = _ext.connection.cursor_factory.__set__


class PooledConnection(_ext.connection):
    """A psycopg2 connection that knows its pool.

    The pool keeps its record of the connection in the ``_zp_*``
    attributes declared below, all set when the pool opens it. When the
    transaction integration manages the connection, ``_zp_managed`` holds
    the object that guards it (see datamanager.py); then committing or
    rolling back by hand is refused, because the transaction manager owns
    the transaction, and a cursor is one of its managed cursor classes.
    """

    # Slots, not instance attributes: the pool reads and writes these on
    # every checkout and return, and a slot costs a quarter of what a
    # __dict__ entry of a psycopg2 connection subclass costs. __dict__
    # stays, for the attributes of connection factories and users.
    __slots__ = (
        "_zp_pool",       # the pool that opened it
        "_zp_state",      # a State; changed only under the pool's lock
        "_zp_created",    # time.monotonic() when opened
        "_zp_expires",    # when its lifetime ends (inf: never)
        "_zp_last_used",  # when it was last returned or checked
        "_zp_checked",    # when a health check last succeeded
        "_zp_taken",      # when it was last checked out
        "_zp_stack",      # where it was checked out, with leak_threshold
        "_zp_warned",     # reported as a possible leak since that checkout
        "_zp_key",        # the getconn() key it is held under
        "_zp_owner",      # the thread binding (binding.Holder) it belongs to
        "_zp_managed",    # the transaction integration's guard, when managed
        # set_session(), autocommit or a transaction characteristic changed
        # by a borrower (or by the transaction integration, which runs it
        # in autocommit): the pool's own are restored when it comes back.
        "_zp_session_changed",
        # a borrower ran a statement that leaves state in the server
        # session (SET, a temporary table, LISTEN, ...): DISCARD ALL when
        # it comes back; _zp_session_changed is set too
        "_zp_session_dirty",
        # what it had when the pool opened it (the pool's options, or what
        # configure chose): put back when it comes back
        "_zp_cursor_factory",
        "_zp_types",      # a copy of its string_types (typecasters)
        "_zp_encoding",   # its client encoding
        "_zp_notices",    # its notices and notifies lists
        "_zp_notifies",
        "_zp_cursor",     # a plain cursor the data manager sends COMMIT on
        "__dict__",
    )

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # Also usable on its own: psycopg2.connect(dsn,
        # connection_factory=PooledConnection) is a plain connection.
        self._zp_init()

    def _zp_init(self):
        """Give every slot its value for a connection the pool does not
        hold yet; called right after the connect (by the pool's connector
        for a connection_factory whose __init__ skips this class's)."""
        self._zp_pool = self._zp_stack = self._zp_key = None
        self._zp_owner = self._zp_managed = self._zp_cursor = None
        self._zp_cursor_factory = self._zp_types = self._zp_encoding = None
        self._zp_notices = self._zp_notifies = None
        self._zp_state = GONE
        self._zp_created = self._zp_expires = self._zp_last_used = 0.0
        self._zp_checked = self._zp_taken = 0.0
        self._zp_warned = self._zp_session_changed = False
        self._zp_session_dirty = False

    def _zp_open(self, pool, now, expires):
        """Start the pool's record of a connection it has just opened."""
        self._zp_pool = pool
        self._zp_state = NEW
        self._zp_created = self._zp_last_used = self._zp_taken = now
        self._zp_checked = now
        self._zp_expires = expires
        # What configure did is the pool's own: the record of it follows.
        self._zp_session_changed = self._zp_session_dirty = False
        self._zp_cursor_factory = _get_cursor_factory(self)
        self._zp_types = dict(self.string_types)
        self._zp_encoding = self.encoding
        self._zp_notices = self.notices
        self._zp_notifies = self.notifies

    def commit(self):
        if self._zp_managed is not None:
            self._zp_managed.refuse("commit()")
        return super().commit()

    def rollback(self):
        if self._zp_managed is not None:
            self._zp_managed.refuse("rollback()")
        return super().rollback()

    def __enter__(self):
        if self._zp_managed is not None:
            self._zp_managed.refuse("'with connection:'")
        return super().__enter__()

    @property
    def autocommit(self):
        # A managed connection runs in psycopg2's autocommit mode only so
        # that the data manager can send BEGIN with the first statement;
        # for its user every statement is part of a transaction.
        if self._zp_managed is not None:
            return False
        return _ext.connection.autocommit.__get__(self)

    @autocommit.setter
    def autocommit(self, value):
        if value:
            if self._zp_managed is not None:
                self._zp_managed.refuse("autocommit")
            # Undone when it comes back, as the other characteristics.
            self._zp_session_changed = True
        _ext.connection.autocommit.__set__(self, value)

    def _change_cursor_factory(self, value):
        # Allowed on a managed connection too (its cursors follow it), and
        # undone when the connection changes hands, as the others.
        self._zp_session_changed = True
        _set_cursor_factory(self, value)

    cursor_factory = property(_get_cursor_factory, _change_cursor_factory,
                              doc=_ext.connection.cursor_factory.__doc__)

    def set_session(self, *args, **kw):
        if self._zp_managed is not None:
            self._zp_managed.refuse("set_session()")
        self._zp_session_changed = True
        return super().set_session(*args, **kw)

    def set_isolation_level(self, level):
        if self._zp_managed is not None:
            self._zp_managed.refuse("set_isolation_level()")
        self._zp_session_changed = True
        return super().set_isolation_level(level)

    isolation_level = _characteristic("isolation_level")
    readonly = _characteristic("readonly")
    deferrable = _characteristic("deferrable")

    def tpc_begin(self, xid):
        if self._zp_managed is not None:
            self._zp_managed.refuse("tpc_begin()")
        result = super().tpc_begin(xid)
        # Its return must end what the borrower left: a two-phase
        # transaction psycopg2 holds even once prepared (server: idle).
        self._zp_session_changed = True
        return result

    def set_client_encoding(self, encoding):
        if self._zp_managed is not None:
            # psycopg2 sends it as a session SET, outside the transaction.
            self._zp_managed.refuse("set_client_encoding()")
        self._zp_session_changed = True
        return super().set_client_encoding(encoding)

    def cursor(self, *args, **kw):
        managed = self._zp_managed
        if managed is None:
            return _noting_cursor(self, args, kw)
        if not args and not kw \
                and _get_cursor_factory(self) is managed.plain_factory:
            # The usual conn.cursor() in a transaction, in one call.
            return _connection_cursor(self,
                                      cursor_factory=managed.cursor_class)
        return managed.cursor(self, args, kw)


def _noting_cursor(conn, args, kw):
    """A cursor of a connection lent by getconn(), of a class that notes
    the statements that leave state in the session (see _noting)."""
    if not args and not kw:
        factory = _get_cursor_factory(conn)
        return _connection_cursor(conn, cursor_factory=_noting_classes.get(
            factory) or _noting_class(factory))
    if len(args) > 1:
        args = (args[0], _noting_class(args[1] or _get_cursor_factory(conn))) \
            + args[2:]
    else:
        kw["cursor_factory"] = _noting_class(
            kw.get("cursor_factory") or _get_cursor_factory(conn))
    # (psycopg2's own class always comes next in the order.)
    return _connection_cursor(conn, *args, **kw)


def _noting(base):
    """Wrap ``execute``/``executemany`` so that a statement that leaves
    state in the session (statements.py) marks its connection for a
    session reset when it goes back to its pool."""
    def method(self, query, *args, **kw):
        conn = self.connection
        if not conn._zp_session_dirty:
            effect = known_effect(query) if type(query) is str else None
            if (changes_session(query, conn) if effect is None
                    else effect & CHANGES_SESSION) \
                    or (self.name is not None and self.withhold):
                conn._zp_session_dirty = conn._zp_session_changed = True
        return base(self, query, *args, **kw)
    method.__name__ = base.__name__
    method.__doc__ = base.__doc__
    return method


def _noting_call(base):
    """Wrap ``callproc`` as _noting wraps ``execute``: a call of a function
    that leaves state in the session (set_config, a session advisory lock)
    marks its connection for a reset."""
    def callproc(self, *args):
        if args and call_effect(args[0]) & CHANGES_SESSION:
            conn = self.connection
            conn._zp_session_dirty = conn._zp_session_changed = True
        return base(self, *args)
    callproc.__doc__ = base.__doc__
    return callproc


_noting_classes = {}


def _noting_class(factory):
    """Return a subclass of cursor class ``factory`` (psycopg2's cursor
    when None) that notes session changes (cached per factory)."""
    cls = _noting_classes.get(factory)
    if cls is None:
        base = factory or _ext.cursor
        if not (isinstance(base, type) and issubclass(base, _ext.cursor)):
            return factory     # psycopg2 will say what is wrong with it
        cls = type(base.__name__, (base,), {
            "execute": _noting(base.execute),
            "executemany": _noting(base.executemany),
            "callproc": _noting_call(base.callproc),
            "__module__": base.__module__,
            "__doc__": base.__doc__})
        _noting_classes[factory] = cls
    return cls


_connection_classes = {}


def _connection_class(factory):
    """Return a PooledConnection class that also derives from ``factory``.

    Users may pass psycopg2's ``connection_factory`` (for example
    LoggingConnection); the pool still needs its own behaviour. The
    factory's methods come first and reach the pool's through super(), as
    psycopg2's factories all do: so RealDictConnection's cursor() picks
    its cursor class, and the pool then makes a managed cursor of that.
    """
    if factory is None or issubclass(factory, PooledConnection):
        return factory or PooledConnection
    if not (isinstance(factory, type) and issubclass(factory, _ext.connection)):
        raise TypeError("connection_factory must be a subclass of "
                        "psycopg2.extensions.connection, got %r" % (factory,))
    cls = _connection_classes.get(factory)
    if cls is None:
        try:
            cls = type("Pooled" + factory.__name__,
                       (factory, PooledConnection), {})
        except TypeError:
            # Both classes add slots to psycopg2's connection: Python
            # cannot lay out one object with both.
            raise TypeError(
                "connection_factory %s.%s declares __slots__, which the "
                "pool's own connection class has too; give it no "
                "__slots__, or derive it from zpgpool.connection."
                "PooledConnection" % (factory.__module__,
                                      factory.__qualname__)) from None
        _connection_classes[factory] = cls
    return cls


def neutralize(conn):
    """Detach a connection inherited across fork from its socket.

    The socket is shared with the parent. Pointing the child's descriptor
    at /dev/null means that closing or collecting the connection here
    writes its goodbye into /dev/null instead of ending the parent's session.
    """
    try:
        fd = conn.fileno()
    except psycopg2.Error:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def close_quietly(conn):
    """Close ``conn``, whatever state its socket is in.

    A connection inherited across fork is never closed in the child: fork.py
    has detached it (``neutralize``) right after the fork, so its close
    cannot end the parent's session.
    """
    try:
        conn.close()
    except Exception:  # pragma: no cover - close() on a dead socket
        pass


@contextlib.contextmanager
def unacknowledged_limit(conn, seconds):
    """Within the block, make the kernel give up on ``conn``'s TCP socket
    when data sent on it stays unacknowledged for ``seconds`` (the socket's
    TCP_USER_TIMEOUT), so that a query on a silently dropped network fails
    then instead of when the kernel's own, much longer, limits run out.
    Nothing changes for a Unix socket or where the option is missing."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    try:
        # A second descriptor of the same socket: closing it leaves libpq's.
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, psycopg2.Error):
        sock = None
    if sock is None or option is None \
            or sock.family not in (socket.AF_INET, socket.AF_INET6):
        if sock is not None:
            sock.close()
        yield
        return
    try:
        before = sock.getsockopt(socket.IPPROTO_TCP, option)
        sock.setsockopt(socket.IPPROTO_TCP, option,
                        max(1, int(seconds * 1000)))
        try:
            yield
        finally:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, before)
            except OSError:
                pass   # the connection died meanwhile
    finally:
        sock.close()


# A health check's query, by the kind of server the pool asks for: it
# answers whether the server still is that kind (a standby promoted, a
# primary turned standby); any other pool just needs an answer.
KIND_QUERIES = {
    "read-write": "SELECT current_setting('transaction_read_only') = 'off'",
    "primary": "SELECT NOT pg_is_in_recovery()",
    "read-only": "SELECT current_setting('transaction_read_only') = 'on'",
    "standby": "SELECT pg_is_in_recovery()",
    "prefer-standby": "SELECT pg_is_in_recovery()",
}
_get_autocommit = _ext.connection.autocommit.__get__
_set_autocommit = _ext.connection.autocommit.__set__


def server_fits(conn, target, bound):
    """Ask the server behind ``conn`` whether it still is the kind that
    ``target`` (a ``target_session_attrs``) asks for; any answer will do
    for other targets. A silent network fails it after ``bound`` seconds.

    Raises ``psycopg2.Error`` when the session is gone. Runs in autocommit
    mode, so no transaction is left open; the mode is put back after.
    """
    autocommit = _get_autocommit(conn)
    _set_autocommit(conn, True)
    with unacknowledged_limit(conn, bound):
        fits = run_statement(conn, KIND_QUERIES.get(target, "SELECT 1"))
    _set_autocommit(conn, autocommit)
    return fits


def run_statement(conn, statement, params=None):
    """Run one statement of the pool's own on a plain psycopg2 cursor of
    ``conn``, which no borrower's cursor class sees or notes, and return
    the first value of its first row (None when it returns none)."""
    cur = _ext.cursor(conn)
    try:
        cur.execute(statement, params)
        row = cur.fetchone() if cur.description is not None else None
        return row[0] if row else None
    finally:
        cur.close()
