"""The contract of zpgpool: the pool and the events it publishes.

Nothing in this module runs; it only describes.  Application code asks the
component registry for a named ``IConnectionPool`` utility and calls
``connection()`` on it; operators who want to watch a pool subscribe to the
events at the end of this module.

The pool speaks two languages.  The psycopg2 one (``getconn``, ``putconn``,
``closeall``, ``minconn``, ``maxconn``, ``closed``) is kept so that code
written for ``psycopg2.pool`` keeps working; the caller then owns the
connection's transaction.  The Zope one is ``connection()``: the transaction
manager owns the transaction, and the caller only runs statements.
"""
from zope.interface import Attribute
from zope.interface import Interface


class IConnectionPool(Interface):
    """A bounded set of PostgreSQL connections shared by the threads of a
    process.

    A pool is created lazy, not closed (``closed`` is False): building one
    connects to nothing and starts no thread, so it can be built while
    configuration is read.  The first request for a connection (or an
    explicit ``open()``) starts its background work and its connections.

    Every error the pool raises itself is a ``zpgpool.errors.PoolError``,
    which is a ``psycopg2.pool.PoolError``.  Errors from the server or from
    libpq reach the caller as the psycopg2 errors they are.

    No attribute, repr or error message of a pool shows the password of its
    DSN.
    """

    name = Attribute(
        """The pool's name, a text; ``""`` when it has none.

        When the pool is registered as a utility this is the utility's
        name.  It appears in log lines, errors, events and ``stats()`` so
        that an operator can tell pools apart.
        """)

    dsn = Attribute(
        """The connection string, with any password replaced by ``***``.

        It is meant to be shown.  The real password is kept where no
        repr, log line or error can reach it.
        """)

    minconn = Attribute(
        """How many idle connections the pool keeps open once it is open,
        an int, 0 or more.

        Read-only after the pool was created.
        """)

    maxconn = Attribute(
        """The most connections the pool has open at one time, an int, 1 or
        more and never less than ``minconn``.

        A caller that finds all of them busy waits up to ``timeout``
        seconds for one.  Read-only after the pool was created.
        """)

    timeout = Attribute(
        """The default number of seconds a caller waits for a connection
        before ``PoolTimeout`` is raised, a float, 0 or more; with 0 a
        caller that finds every connection busy fails at once.""")

    closed = Attribute(
        """True when the pool was closed and hands out no more connections.

        A pool that was never opened is not closed: it opens on first use.
        """)

    twophase = Attribute(
        """True when ``connection()`` commits with two-phase commit.

        Then the transaction's vote runs PREPARE TRANSACTION and its finish
        runs COMMIT PREPARED, so a PostgreSQL database can take part in a
        transaction with other resource managers without losing atomicity.
        (A transaction that wrote nothing commits in its vote instead: it
        has nothing to keep atomic.) The server needs
        ``max_prepared_transactions`` above 0.
        """)

    transaction_manager = Attribute(
        """The ``transaction.interfaces.ITransactionManager`` whose current
        transaction ``connection()`` joins.

        ``transaction.manager`` (the thread-local default manager) unless
        another one was given when the pool was created.
        """)

    def getconn(key=None, timeout=None):
        """Take a connection out of the pool and return it.

        This is psycopg2's ``AbstractConnectionPool.getconn``, for code that
        manages its own transactions.  The caller owns the connection until
        it hands it back with ``putconn``; nothing commits or rolls back for
        it, and the connection is not part of any Zope transaction.

        With a *key*, the same connection is returned for the same key until
        it is put back, as psycopg2's pools do.

        Opens the pool first if it was not open.  Waits up to *timeout*
        seconds (the pool's ``timeout`` when None) when every connection
        is busy, and then raises
        ``zpgpool.errors.PoolTimeout``.  Raises ``zpgpool.errors.PoolClosed``
        when the pool is closed.  A connection that cannot be made raises
        ``zpgpool.ConnectError``, which is also the
        ``psycopg2.OperationalError`` psycopg2's pools raised; its message
        says what libpq said, without the password.

        The connection returned is open and outside any transaction.
        """

    def putconn(conn=None, key=None, close=False):
        """Give back a connection taken with ``getconn``.

        Called by the code that called ``getconn``, once per connection.
        Pass the connection, the *key* it was taken under, or both (then
        they must match).

        The pool looks at the connection's transaction status: an idle
        connection is kept for the next caller; one left inside a
        transaction or in an error state is rolled back first; one whose
        state cannot be known, or that is broken, is closed and replaced.
        So work left uncommitted is never seen by another caller.  What
        the caller changed in the session (``SET``, temporary tables,
        ``LISTEN``, typecasters, the client encoding, ...) is undone too, so
        the next caller gets the connection as the pool hands it out.  With
        *close* true, the connection is closed instead of kept.

        Raises ``zpgpool.errors.ConnectionMisuse`` for a connection that is
        not checked out from this pool (one given back twice, or one from
        another pool), for a *key* that holds no connection, and when
        neither is given.  Putting a connection back into a closed pool
        closes the connection and does not raise.
        """

    def closeall():
        """Close every connection of the pool, and the pool with it.

        This is psycopg2's ``AbstractConnectionPool.closeall``.  Unlike
        ``close()`` it does not wait: connections still checked out are
        closed under their users.  Afterwards ``closed`` is true.
        """

    def close(timeout=5.0):
        """Close the pool.

        From now on no connection is handed out: callers waiting for one,
        and later callers, get ``zpgpool.errors.PoolClosed``.  Idle
        connections are closed at once.  Connections still checked out are
        closed when they come back; ``close`` waits up to *timeout* seconds
        for them, then returns anyway.

        Called by the application when it shuts down; the ``configure.zcml``
        of zpgpool also closes every registered pool when the process
        exits.  Calling it again, or on a pool never opened, does nothing.
        Publishes ``IPoolClosed`` the first time.  This must not raise
        because of a connection that is already broken.
        """

    def open(wait=False, timeout=30.0):
        """Open the pool: start making its ``minconn`` connections.

        Nothing needs to call it: the first request for a connection opens
        the pool.  Call it at start-up to fill the pool before traffic
        arrives.  With *wait* true, return only once ``minconn`` connections
        are ready, and raise ``zpgpool.errors.PoolTimeout`` if that takes
        more than *timeout* seconds.

        Raises ``zpgpool.errors.PoolClosed`` when the pool was closed: a
        closed pool stays closed.  Opening an open pool does nothing.
        """

    def checkout(timeout=None):
        """Return a context manager that lends a connection for a block.

        ``with pool.checkout() as conn:`` takes a connection like
        ``getconn()`` and hands it back like ``putconn()`` when the block
        ends.  A block that ends normally has its open transaction
        committed; a block that raises has it rolled back.  This is for
        work outside a Zope transaction; inside one, use ``connection()``.

        *timeout* is the number of seconds to wait for a free connection,
        the pool's ``timeout`` when None.  Raises what ``getconn()`` raises,
        and ``PoolError`` when the block ends normally after a statement
        failed (PostgreSQL has aborted the transaction; the pool rolls it
        back rather than report it committed).
        """

    def connection(transaction_manager=None):
        """Return the calling thread's connection, joined to the current
        transaction of ``transaction_manager``, or of the pool's
        ``transaction_manager`` when none is given.

        This is the way in for application code running under a transaction
        manager: a Zope or Pyramid view, or any code inside
        ``with transaction.manager:``.  The statements run through it are
        committed when the transaction commits and rolled back when it
        aborts; the caller never calls ``commit()`` or ``rollback()`` on it
        (doing so raises ``zpgpool.errors.ConnectionMisuse``).

        A framework that runs each request in a transaction manager of its
        own (pyramid_tm with ``tm.manager_hook`` set to
        ``pyramid_tm.explicit_manager``) must pass it:
        ``pool.connection(request.tm)``.  Not passing it there raises
        ``ConnectionMisuse`` rather than join a transaction nobody would
        commit.  The connection is in one transaction at a time: asking for
        it in a transaction of another manager while the first is still
        open raises ``ConnectionMisuse`` too.

        Calling it again in the same transaction returns the same
        connection, so a request sees its own writes.  After the transaction
        ends the connection is reset and stays bound to the thread for its
        next transaction; it goes back to the shared pool when the thread
        ends, or earlier when another thread is waiting for one.  So call
        ``connection()`` in each transaction rather than keeping the object:
        a connection kept from an earlier transaction raises
        ``ConnectionMisuse`` once it has been lent to another thread.

        Waits and raises like ``getconn()``.  Serialization failures and
        deadlocks raised by statements on this connection are
        ``zpgpool.errors.ConflictError`` (a ``transaction`` TransientError)
        so that the transaction manager retries them.
        """

    def stats():
        """Return a snapshot of the pool's counters and sizes as a dict.

        Meant for monitoring pages and for debugging time-outs: the keys are
        short names; the values are numbers (sizes, counters, seconds
        waited), except ``name``, ``closed`` and ``last_connect_error`` (a
        text without the password, or None).  The dict belongs to the
        caller.  Taking it is cheap and does no I/O.
        """


class IPoolEvent(Interface):
    """Something happened to a pool.

    Events are published with ``zope.event.notify``, so a ``<subscriber>``
    registered in ZCML for one of the interfaces below receives them.  They
    are published only when somebody subscribes, so a pool nobody watches
    pays nothing for them.

    Subscribers are called in the thread that caused the event, sometimes
    while a caller waits for its connection: they should be quick, should
    not use the pool they are told about, and must not raise (what they
    raise reaches the pool's caller).
    """

    pool = Attribute("The pool (an ``IConnectionPool``) the event is about.")


class IConnectionEvent(IPoolEvent):
    """Something happened to one of the pool's connections.

    A subscriber for this interface receives the four events below.
    """

    connection = Attribute(
        "The psycopg2 connection the event is about; each event below says"
        " which one.")


class IConnectionCreated(IConnectionEvent):
    """The pool opened a new connection to the server, ``connection``."""

    connect_time = Attribute(
        "How many seconds connecting took, a float. Watching it tells how"
        " slow the server, the network or the authentication are.")


class IConnectionCheckedOut(IConnectionEvent):
    """The pool handed ``connection`` to a caller."""

    wait_time = Attribute(
        "How many seconds the caller waited for it, a float: 0.0 when a"
        " connection was free at once.")


class IConnectionReturned(IConnectionEvent):
    """``connection`` came back to the pool and the pool kept it."""


class IConnectionDiscarded(IConnectionEvent):
    """The pool closed ``connection`` and will not use it again."""

    reason = Attribute(
        "Why, as a short text meant for an operator (for example that the"
        " connection was broken, too old or idle too long).")


class IPoolExhausted(IPoolEvent):
    """A caller found every connection busy and has to wait for one."""

    waiting = Attribute(
        "How many callers are waiting for a connection, this one included.")


class IPoolClosed(IPoolEvent):
    """The pool was closed and hands out no more connections."""
