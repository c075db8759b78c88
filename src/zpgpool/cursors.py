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
    per COMMIT would cost more than the rest of the vote); return that
    cursor."""
    cur = conn._zp_cursor
    if cur is None or cur.closed:
        cur = conn._zp_cursor = _ext.cursor(conn)
    cur.execute(statement, params)
    return cur



# What a statement method takes first: a query, the name of a function
# (callproc), or neither (copy_*).
QUERY = "query"
FUNCTION = "function"


def _guarded(base, takes, bundles):
    """Wrap cursor method ``base`` so that it joins the current transaction
    first, sends that transaction's BEGIN when the server has none open
    (inside the statement's own message when ``bundles``), and makes
    conflicts and lost sessions retryable."""
    def method(self, *args, **kw):
        conn = self.connection
        managed = conn._zp_managed
        if managed is None:
            raise ConnectionMisuse(
                "zpgpool: this cursor belongs to a connection that went back "
                "to its pool; call pool.connection() and open a new cursor")
        query = args[0] if takes is QUERY and args else None
        if query is not None and type(query) is not str:
            if isinstance(query, sql.Composable):
                query = query.as_string(conn)
                args = (query,) + args[1:]
            elif not isinstance(query, bytes):
                query = None
        if query is None:
            effect = call_effect(args[0]) if takes is FUNCTION and args \
                else KEEPS_SESSION
        else:
            effect = known_effect(query)
            if effect is None:
                effect = statement_effect(query)
        try:
            begin = managed.before_statement(conn, effect,
                                             self.name is not None)
            if begin is not None:
                if not bundles or query is None or self.name is not None \
                        or effect & CONTROLS_TRANSACTION:
                    _execute(conn, begin)
                elif type(query) is str:
                    # One message: psycopg2 sends a query string as one
                    # simple query, whose result is its last statement's.
                    args = (begin + "; " + query,) + args[1:]
                else:
                    args = (begin.encode("ascii") + b"; " + query,) + args[1:]
            return base(self, *args, **kw)
        except psycopg2.Error as exc:
            raise translate_error(exc, conn)
    method.__name__ = base.__name__
    return method


# The cursor methods that send statements: what they take first, and
# whether it goes as the one message the BEGIN can join (executemany sends
# one per parameter set).
_STATEMENT_METHODS = (("execute", QUERY, True), ("executemany", QUERY, False),
                      ("callproc", FUNCTION, False),
                      ("copy_expert", None, False),
                      ("copy_from", None, False), ("copy_to", None, False))
_cursor_classes = {}


def _managed_cursor_class(factory):
    """Return a subclass of cursor class ``factory`` whose statements join
    the current transaction (cached per factory)."""
    cls = _cursor_classes.get(factory)
    if cls is None:
        methods = {name: _guarded(getattr(factory, name), takes, bundles)
                   for name, takes, bundles in _STATEMENT_METHODS}
        methods["__doc__"] = ("%s whose statements join the current "
                              "transaction." % factory.__name__)
        cls = type("Managed" + factory.__name__, (factory,), methods)
        _cursor_classes[factory] = cls
    return cls
