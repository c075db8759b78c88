"""The errors zpgpool raises.

Every pool error is a ``psycopg2.pool.PoolError``, so code written for
psycopg2's pools keeps catching what it caught before.
"""
import psycopg2
import psycopg2.pool
from transaction.interfaces import TransientError


class PoolError(psycopg2.pool.PoolError):
    """Something went wrong with the pool rather than with a query."""


class PoolTimeout(PoolError):
    """No connection became available within the caller's time-out."""


class PoolClosed(PoolError):
    """The pool was closed; it hands out no more connections."""


class ConnectError(PoolError, psycopg2.OperationalError):
    """The pool could not open a connection to the server.

    It is also a ``psycopg2.OperationalError``, which is what code written
    for psycopg2's pools expects from a failed connect. ``permanent`` says
    whether waiting could not help (a wrong password, a database that does
    not exist); a transient failure was retried up to the caller's
    time-out, and the message says for how long.
    """

    permanent = False


class InvalidOption(PoolError, TypeError, ValueError):
    """A pool option has the wrong type or value, or is unknown.

    It is a ``TypeError`` and a ``ValueError`` too, so that code checking
    arguments the usual way catches it.
    """


class ConnectionMisuse(PoolError):
    """A connection was used in a way the pool cannot allow.

    For example: a connection handed back twice, a connection from another
    pool, or ``commit()`` called on a connection that the transaction
    manager owns.
    """


class SessionLost(TransientError):
    """The connection died before the transaction's COMMIT was sent.

    The server rolls back a transaction whose session ends, so running it
    again on a new connection is safe; a disconnect raised by a statement
    on a managed connection is an instance of this class and of the
    psycopg2 error it was, so Zope's publisher retries the request (for
    example after a server restart or a failover).
    """


class ConflictError(TransientError):
    """A database conflict that the transaction manager should retry.

    Serialization failures and deadlocks raised through a managed
    connection are instances of this class *and* of the psycopg2 error
    class they were, so both ``except ConflictError`` and
    ``except psycopg2.errors.SerializationFailure`` catch them.
    """


class CommitUnknown(PoolError, psycopg2.OperationalError):
    """The session died while a one-phase COMMIT was on its way.

    The server may or may not have committed the transaction, so running
    it again could do its work twice: unlike ``SessionLost`` this is not
    retryable. The message names the pool and the transaction; check
    whether its work is in the database before doing it again. Two-phase
    pools never raise it: their COMMIT PREPARED is resolved by recovery.
    It is also a ``psycopg2.OperationalError``, which code written for
    psycopg2 catches for a broken connection.
    """
