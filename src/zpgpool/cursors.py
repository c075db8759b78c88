"""Managed cursors: the cursor classes of the transaction integration,
whose statements join the thread's current transaction first, carry its
BEGIN in their own message, and turn serialization failures, deadlocks
and lost sessions into errors the transaction manager retries
(``translate_error``).

A connection's ``_zp_managed`` is the thread state (datamanager.py) its
statements report to through ``before_statement``; None once the
connection went back to its pool.
"""
import psycopg2
import psycopg2.extensions as _ext
from psycopg2 import sql
import transaction.interfaces

from zpgpool.connection import is_disconnect
from zpgpool.errors import ConflictError
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import SessionLost
from zpgpool.statements import CONTROLS_TRANSACTION
from zpgpool.statements import KEEPS_SESSION
from zpgpool.statements import call_effect
from zpgpool.statements import known_effect
from zpgpool.statements import statement_effect


# Serialization failure and deadlock: the transaction may succeed if run
# again, so the transaction manager and Zope's publisher should retry it.
RETRYABLE_SQLSTATES = frozenset(("40001", "40P01"))

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


def translate_error(exc, conn=None):
    """Make an error the transaction may survive by running again
    retryable, in place.

    That is a serialization failure or a deadlock, and -- when ``conn`` is
    given, the connection of a transaction whose COMMIT was not sent yet --
    a lost session: the server rolled that transaction back. The exception
    keeps its psycopg2 class (as a base), its message, its pgcode and its
    diagnostics, so existing ``except`` clauses still match.
    """
    if isinstance(exc, transaction.interfaces.TransientError):
        return exc
    if getattr(exc, "pgcode", None) in RETRYABLE_SQLSTATES:
        exc.__class__ = _retryable_class(type(exc), ConflictError)
    elif conn is not None and is_disconnect(exc, conn):
        exc.__class__ = _retryable_class(type(exc), SessionLost)
    return exc


def _execute(conn, statement, params=None):
    """Run ``statement`` on ``conn`` past the managed cursor's guards, on
    a plain cursor kept with the connection for the purpose (making one
    per COMMIT would cost more than the rest of the vote)."""
    cur = conn._zp_cursor
    if cur is None or cur.closed:
        cur = conn._zp_cursor = _ext.cursor(conn)
    cur.execute(statement, params)



# What a statement method takes first: a query, the name of a function
# (callproc), or neither (copy_*).
QUERY = "query"
FUNCTION = "function"


def _returned_connection():
    return ConnectionMisuse(
        "zpgpool: this cursor belongs to a connection that went back to its "
        "pool; call pool.connection() and open a new cursor")


def _query_effect(conn, query):
    """A statement method's query as psycopg2 will send it (a Composable
    made text), what it does (statements.py), and whether it is text that
    a BEGIN can go in front of (psycopg2 refuses anything else)."""
    if isinstance(query, sql.Composable):
        query = query.as_string(conn)
    elif not isinstance(query, (str, bytes)):
        return query, KEEPS_SESSION, False
    effect = known_effect(query)
    if effect is None:
        effect = statement_effect(query)
    return query, effect, True


def _managed_execute(base):
    """Wrap cursor method ``execute`` so that it joins the current
    transaction first, sends that transaction's BEGIN in the statement's
    own message when the server has none open, and makes conflicts and
    lost sessions retryable.

    The hot path of every request, hence a wrapper of its own, that
    names psycopg2's arguments (a factory's own extra ones pass through),
    rather than the general one below.
    """
    def execute(self, query, vars=None, *args, **kw):
        conn = self.connection
        managed = conn._zp_managed
        if managed is None:
            raise _returned_connection()
        effect = known_effect(query) if type(query) is str else None
        text = True
        if effect is None:
            query, effect, text = _query_effect(conn, query)
        try:
            begin = managed.before_statement(conn, effect,
                                             self.name is not None)
            if begin is not None:
                if not text or self.name is not None \
                        or effect & CONTROLS_TRANSACTION:
                    _execute(conn, begin)
                elif isinstance(query, str):
                    # One message: psycopg2 sends a query string as one
                    # simple query, whose result is its last statement's.
                    query = begin + "; " + query
                else:
                    query = begin.encode("ascii") + b"; " + query
            if args or kw:
                return base(self, query, vars, *args, **kw)
            return base(self, query, vars)   # (cheaper without the *)
        except psycopg2.Error as exc:
            raise translate_error(exc, conn)
    return execute


def _guarded(base, takes):
    """Wrap cursor method ``base`` (one that sends a statement the BEGIN
    cannot join, see below) so that it joins the current transaction
    first, sends that transaction's BEGIN when the server has none open,
    and makes conflicts and lost sessions retryable."""
    def method(self, *args, **kw):
        conn = self.connection
        managed = conn._zp_managed
        if managed is None:
            raise _returned_connection()
        if takes is QUERY and args:
            query, effect, _ = _query_effect(conn, args[0])
            args = (query,) + args[1:]
        elif takes is FUNCTION and args:
            effect = call_effect(args[0])
        else:
            effect = KEEPS_SESSION
        try:
            begin = managed.before_statement(conn, effect,
                                             self.name is not None)
            if begin is not None:
                _execute(conn, begin)
            return base(self, *args, **kw)
        except psycopg2.Error as exc:
            raise translate_error(exc, conn)
    method.__name__ = base.__name__
    return method


# The cursor methods that send statements besides execute, and what they
# take first: BEGIN cannot join their statements (executemany sends one
# message per parameter set, callproc's and copy's are not a query given).
_STATEMENT_METHODS = (("executemany", QUERY), ("callproc", FUNCTION),
                      ("copy_expert", None), ("copy_from", None),
                      ("copy_to", None))
_cursor_classes = {}


def _managed_cursor_class(factory):
    """Return a subclass of cursor class ``factory`` whose statements join
    the current transaction (cached per factory)."""
    cls = _cursor_classes.get(factory)
    if cls is None:
        methods = {name: _guarded(getattr(factory, name), takes)
                   for name, takes in _STATEMENT_METHODS}
        methods["execute"] = _managed_execute(factory.execute)
        methods["__doc__"] = ("%s whose statements join the current "
                              "transaction." % factory.__name__)
        cls = type("Managed" + factory.__name__, (factory,), methods)
        _cursor_classes[factory] = cls
    return cls
