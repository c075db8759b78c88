"""The contenders: each way a Zope or plain Python application could get a
PostgreSQL connection, written the way its users write it.

Every contender runs the same three workloads, with the same SQL (the
functions ``select1`` and ``readwrite`` below) on a connection obtained its
own way:

``noop``
    check a connection out and give it back, no SQL: the pool's own cost;
``select1``
    check out, ``SELECT 1``, commit, give back;
``readwrite``
    check out, INSERT a row and SELECT it back, commit, give back.

A contender is built once per cell (contender x thread count x repetition)
with a pool sized for that many threads; each worker thread asks it for its
operations with ``thread_ops(worker)``, so per-thread state (the floor's
persistent connection, a scoped session) is made in the thread that uses it.

Besides the pools, there are floors: what the same work costs with nothing
but psycopg2 (``RawFloor``, the row every ratio is taken to), and with
nothing but psycopg2 and the ``transaction`` package (``ZopeFloor`` and
``ZopeFloorBundled``: a data manager of a dozen lines that commits in its
vote). zpgpool's Zope path does what ``ZopeFloorBundled`` does, plus all
that makes it a pool; the distance between the two rows is zpgpool's own
cost. Two references without the ``transaction`` package calibrate that
distance: ``RawBundled`` sends BEGIN with the first statement on a raw
connection, and ``RawBundledPython`` does the same with a fixed amount of
Python added to each transaction, so the gap between them is what a
microsecond of Python costs at each thread count.
"""
import itertools
import time

import psycopg2
import psycopg2.extensions
import psycopg2.pool
import transaction
import zope.component
from zope.component import getGlobalSiteManager
from zope.component import getUtility

import zpgpool
from zpgpool.interfaces import IConnectionPool


SELECT1 = "SELECT 1"
INSERT = ("INSERT INTO zpgpool_bench (worker, payload) VALUES (%s, %s) "
          "RETURNING id")
SELECT_ROW = "SELECT worker, payload FROM zpgpool_bench WHERE id = %s"
PAYLOAD = "x" * 64
TABLE = ("CREATE TABLE IF NOT EXISTS zpgpool_bench (id bigserial PRIMARY "
         "KEY, worker int NOT NULL, payload text NOT NULL)")

WORKLOADS = ("noop", "select1", "readwrite")

_clock = time.perf_counter
_sleep = time.sleep


def select1(conn):
    """``SELECT 1`` through a DB-API connection (psycopg2 or psycopg 3)."""
    cur = conn.cursor()
    cur.execute(SELECT1)
    cur.fetchone()
    cur.close()


def readwrite(conn, worker):
    """INSERT a row and read it back through a DB-API connection."""
    cur = conn.cursor()
    cur.execute(INSERT, (worker, PAYLOAD))
    row_id = cur.fetchone()[0]
    cur.execute(SELECT_ROW, (row_id,))
    cur.fetchone()
    cur.close()


def version(distribution):
    """The installed version of ``distribution``, or ``"-"``."""
    from importlib import metadata
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "-"


class Contender:
    """One way of getting a connection; subclasses fill in the operations."""

    #: Short name, used on the command line (``--contenders``).
    key = ""
    #: The row label in the tables.
    label = ""
    #: Distributions whose versions the table shows for this contender.
    packages = ()
    #: A footnote: anything that makes the comparison not like for like.
    note = ""
    #: Whether it needs max_prepared_transactions > 0.
    twophase = False
    #: Whether it limits the number of connections, so takes part in the
    #: exhaustion case.
    limited = True
    #: Whether it has a single-thread checkout/return (micro benchmark).
    micro = True
    #: The workloads it runs (the floor has no "noop": it has no checkout).
    workloads = WORKLOADS
    #: Whether a workload is one transaction of the ``transaction`` package
    #: (its "noop" is then a transaction that joins and sends nothing).
    zope = False

    def __init__(self, dsn):
        self.dsn = dsn

    def setup(self, size, timeout=30.0):
        """Build the pool for ``size`` connections at most (and at least,
        where the pool has a minimum); waiters give up after ``timeout``."""

    def teardown(self):
        """Close everything ``setup`` and the threads opened."""

    def thread_ops(self, worker):
        """Return {workload: callable} for the calling thread."""
        raise NotImplementedError

    def thread_done(self):
        """Called in each worker thread when it has finished."""

    def exhaust_op(self, worker, hold, arrivals, served):
        """Return the exhaustion case's operation for the calling thread.

        It takes a connection, runs ``SELECT 1``, holds the connection for
        ``hold`` seconds (sleeping, as a request doing other work would) and
        commits and gives it back. It returns (arrival ticket, service
        ticket, seconds waited for the connection, clock when it got the
        connection): the tickets come from the shared counters ``arrivals``
        (taken just before asking for the connection) and ``served`` (just
        after getting it).
        """
        raise NotImplementedError

    @classmethod
    def versions(cls):
        return ", ".join("%s %s" % (p, version(p)) for p in cls.packages)


# -- the floor and connect-per-request ---------------------------------------

class RawFloor(Contender):
    key = "raw"
    label = "raw psycopg2, one connection per thread (floor)"
    packages = ("psycopg2-binary",)
    note = ("No pool: each thread keeps its own connection and calls "
            "conn.commit(). Every ratio is to this row, measured in the "
            "same repetition.")
    limited = False
    micro = False
    workloads = ("select1", "readwrite")

    def setup(self, size, timeout=30.0):
        self._connect = psycopg2.connect
        self._conns = []

    def thread_ops(self, worker):
        conn = self._connect(self.dsn)
        self._conns.append(conn)

        def op_select1():
            select1(conn)
            conn.commit()

        def op_readwrite():
            readwrite(conn, worker)
            conn.commit()

        return {"select1": op_select1, "readwrite": op_readwrite}

    def teardown(self):
        for conn in self._conns:
            conn.close()


class RawTwoPhase(Contender):
    key = "raw-2pc"
    label = "raw psycopg2 two-phase, one connection per thread (reference)"
    packages = ("psycopg2-binary",)
    note = ("Not a pool: the floor with tpc_begin() / tpc_prepare() / "
            "tpc_commit() instead of commit(), i.e. BEGIN, the statements, "
            "PREPARE TRANSACTION and COMMIT PREPARED. What two-phase commit "
            "costs by itself, to read the two-phase rows against.")
    twophase = True
    limited = False
    micro = False
    workloads = ("select1", "readwrite")

    def setup(self, size, timeout=30.0):
        self._conns = []

    def thread_ops(self, worker):
        conn = psycopg2.connect(self.dsn)
        self._conns.append(conn)
        prefix = "bench-raw-2pc:%d:%d:" % (worker, id(conn))
        counter = itertools.count()

        def op_select1():
            conn.tpc_begin(prefix + str(next(counter)))
            select1(conn)
            conn.tpc_prepare()
            conn.tpc_commit()

        def op_readwrite():
            conn.tpc_begin(prefix + str(next(counter)))
            readwrite(conn, worker)
            conn.tpc_prepare()
            conn.tpc_commit()

        return {"select1": op_select1, "readwrite": op_readwrite}

    def teardown(self):
        for conn in self._conns:
            conn.close()


class Psycopg3Raw(RawFloor):
    key = "psycopg3-raw"
    label = "raw psycopg 3, one connection per thread (reference)"
    packages = ("psycopg",)
    note = ("Not a pool: psycopg 3's own floor, so that psycopg_pool's row "
            "can be read as driver cost plus pool cost.")
    limited = False
    micro = False
    workloads = ("select1", "readwrite")

    def setup(self, size, timeout=30.0):
        import psycopg
        self._connect = psycopg.connect
        self._conns = []


class ConnectPerRequest(Contender):
    key = "connect"
    label = "psycopg2.connect() per request"
    packages = ("psycopg2-binary",)
    note = ("Opens and closes a connection for every operation "
            "(password authentication, scram-sha-256, over TCP).")
    limited = False
    micro = False

    def thread_ops(self, worker):
        dsn = self.dsn
        connect = psycopg2.connect

        def op_noop():
            connect(dsn).close()

        def op_select1():
            conn = connect(dsn)
            try:
                select1(conn)
                conn.commit()
            finally:
                conn.close()

        def op_readwrite():
            conn = connect(dsn)
            try:
                readwrite(conn, worker)
                conn.commit()
            finally:
                conn.close()

        return {"noop": op_noop, "select1": op_select1,
                "readwrite": op_readwrite}


# -- pools used with getconn/putconn ----------------------------------------

class _GetconnPool(Contender):
    """A pool used as ``conn = getconn(); ...; conn.commit(); putconn()``."""

    def _take_give(self):
        return self.pool.getconn, self.pool.putconn

    def exhaust_op(self, worker, hold, arrivals, served):
        take, give = self._take_give()

        def op():
            arrival = next(arrivals)
            start = _clock()
            conn = take()
            served_at = _clock()
            waited = served_at - start
            service = next(served)
            try:
                select1(conn)
                _sleep(hold)
                conn.commit()
            finally:
                give(conn)
            return arrival, service, waited, served_at

        return op

    def thread_ops(self, worker):
        take, give = self._take_give()

        def op_noop():
            give(take())

        def op_select1():
            conn = take()
            try:
                select1(conn)
                conn.commit()
            finally:
                give(conn)

        def op_readwrite():
            conn = take()
            try:
                readwrite(conn, worker)
                conn.commit()
            finally:
                give(conn)

        return {"noop": op_noop, "select1": op_select1,
                "readwrite": op_readwrite}


class ZpgpoolGetconn(_GetconnPool):
    key = "zpgpool"
    label = "zpgpool getconn/putconn"
    packages = ("zpgpool",)
    note = ("Health check at its default: a connection idle for 10 s or more "
            "is pinged before it is handed out (never the case here).")

    def setup(self, size, timeout=30.0):
        self.pool = zpgpool.ConnectionPool(
            self.dsn, name="bench", minconn=size, maxconn=size,
            timeout=timeout)
        self.pool.open(wait=True, timeout=120)

    def teardown(self):
        self.pool.closeall()


class Psycopg2Threaded(_GetconnPool):
    key = "psycopg2"
    label = "psycopg2.pool.ThreadedConnectionPool"
    packages = ("psycopg2-binary",)
    note = ("No health check, no waiting: raises PoolError at once when "
            "exhausted. minconn = maxconn, since it closes connections "
            "returned above minconn.")

    def setup(self, size, timeout=30.0):
        self.pool = psycopg2.pool.ThreadedConnectionPool(size, size, self.dsn)

    def teardown(self):
        self.pool.closeall()


class Psycopg2PoolPackage(_GetconnPool):
    key = "psycopg2-pool"
    label = "psycopg2-pool ThreadSafeConnectionPool"
    packages = ("psycopg2-pool",)
    note = ("The psycopg2-pool package: no ping (checks the transaction "
            "status client-side), no waiting: raises PoolError when "
            "exhausted. It does not keep to maxconn: a connection taken "
            "from its idle stack is not counted as in use, so it opens "
            "more when they are all out (see the exhaustion case's "
            "connections).")

    def setup(self, size, timeout=30.0):
        import psycopg2_pool
        self.pool = psycopg2_pool.ThreadSafeConnectionPool(
            minconn=size, maxconn=size, dsn=self.dsn)

    def teardown(self):
        self.pool.clear()
        for conn in list(self.pool.connections_in_use):
            conn.close()


class PsycopgPool(_GetconnPool):
    key = "psycopg_pool"
    label = "psycopg_pool.ConnectionPool (psycopg 3)"
    packages = ("psycopg", "psycopg-pool")
    note = ("psycopg 3, a different driver (compare with the raw psycopg 3 "
            "row); check=None by default: no ping.")

    def setup(self, size, timeout=30.0):
        import psycopg_pool
        self.pool = psycopg_pool.ConnectionPool(
            self.dsn, min_size=size, max_size=size, timeout=timeout,
            open=False)
        self.pool.open(wait=True, timeout=120)

    def teardown(self):
        self.pool.close()


class SQLAlchemyQueuePool(_GetconnPool):
    key = "sqlalchemy"
    label = "SQLAlchemy QueuePool (engine.raw_connection())"
    packages = ("SQLAlchemy",)
    pre_ping = False
    note = ("pool_size = threads, max_overflow=0; returns roll back "
            "(reset_on_return, free on an idle connection).")

    def setup(self, size, timeout=30.0):
        import sqlalchemy
        dsn = self.dsn
        self.engine = sqlalchemy.create_engine(
            "postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn),
            pool_size=size, max_overflow=0, pool_timeout=timeout,
            pool_pre_ping=self.pre_ping)

    def _take_give(self):
        def give(fairy):
            fairy.close()
        return self.engine.raw_connection, give

    def teardown(self):
        self.engine.dispose()


class SQLAlchemyPrePing(SQLAlchemyQueuePool):
    key = "sqlalchemy-ping"
    label = "SQLAlchemy QueuePool, pool_pre_ping=True"
    pre_ping = True
    note = "Pings the server (a round trip) on every checkout."


# -- the Zope way: transaction.manager ----------------------------------------

_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


def _send_in_transaction(conn, statement):
    """Send ``statement`` (COMMIT, ROLLBACK, ...) on an autocommit
    connection unless no statement began a transaction."""
    if conn.get_transaction_status() != _IDLE:
        cur = psycopg2.extensions.cursor(conn)
        cur.execute(statement)
        cur.close()


def _spin(seconds):
    """Run Python for ``seconds``, holding the GIL as Python code does."""
    end = _clock() + seconds
    while _clock() < end:
        pass


class _FloorDataManager:
    """The least a data manager must do to put one psycopg2 connection
    under ``transaction``: join each transaction once, COMMIT in the vote,
    ROLLBACK on abort. No pool, no checks, no error translation: a floor,
    not something to use.

    One per thread, for the thread's own connection. ``bundled`` selects
    how BEGIN travels: False leaves it to psycopg2 (BEGIN as a message of
    its own before the first statement); True runs the connection in
    autocommit mode and lets ``_BeginBundlingCursor`` put BEGIN in front
    of the transaction's first statement, as zpgpool does.
    """

    def __init__(self, conn, tm, bundled, twophase=False):
        self.conn = conn
        self.transaction_manager = tm
        self._get = tm.get
        self.bundled = bundled
        self.txn = None
        # Two-phase (bundled only): PREPARE TRANSACTION in the vote,
        # COMMIT PREPARED in tpc_finish, with a gid of plain characters.
        self.twophase = twophase
        self._gids = ("bench-floor-2pc:%d:%d" % (id(self), n)
                      for n in itertools.count())
        self.gid = None
        if bundled:
            conn.autocommit = True
            conn.cursor_factory = _BeginBundlingCursor

    def connection(self):
        """The thread's connection, joined to the current transaction."""
        txn = self._get()
        if txn is not self.txn:
            txn.join(self)
            self.txn = txn
        return self.conn

    def _send(self, statement):
        _send_in_transaction(self.conn, statement)

    def abort(self, txn):
        self.txn = None
        if self.gid is not None:
            gid, self.gid = self.gid, None
            psycopg2.extensions.cursor(self.conn).execute(
                "ROLLBACK PREPARED '%s'" % gid)
        elif self.bundled:
            self._send("ROLLBACK")
        else:
            self.conn.rollback()    # sends nothing when no BEGIN was sent

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        if self.twophase:
            if self.conn.get_transaction_status() != _IDLE:
                self.gid = next(self._gids)
                self._send("PREPARE TRANSACTION '%s'" % self.gid)
        elif self.bundled:
            self._send("COMMIT")
        else:
            self.conn.commit()

    def tpc_finish(self, txn):
        self.txn = None
        if self.gid is not None:
            gid, self.gid = self.gid, None
            psycopg2.extensions.cursor(self.conn).execute(
                "COMMIT PREPARED '%s'" % gid)

    tpc_abort = abort

    def sortKey(self):
        return "~bench-floor"


class _BeginBundlingCursor(psycopg2.extensions.cursor):
    """Sends the transaction's BEGIN in the message of its first statement
    (for an autocommit connection: nothing else would send one)."""

    def execute(self, query, vars=None):
        if self.connection.get_transaction_status() == _IDLE:
            query = "BEGIN; " + query
        return super().execute(query, vars)


class RawBundled(RawFloor):
    key = "raw-bundled"
    label = "raw psycopg2, BEGIN bundled (reference)"
    packages = ("psycopg2-binary",)
    note = ("Not a pool, no `transaction` package: the floor's connection "
            "in autocommit mode, sending `BEGIN; <statement>` in one "
            "message and then COMMIT. What bundling BEGIN saves by itself, "
            "and the base of the row below.")
    #: Seconds of Python run between the statements and the COMMIT.
    python = 0.0

    def thread_ops(self, worker):
        conn = self._connect(self.dsn)
        self._conns.append(conn)
        conn.autocommit = True
        conn.cursor_factory = _BeginBundlingCursor
        python = self.python

        def commit():
            if python:
                _spin(python)
            _send_in_transaction(conn, "COMMIT")

        def op_select1():
            select1(conn)
            commit()

        def op_readwrite():
            readwrite(conn, worker)
            commit()

        return {"select1": op_select1, "readwrite": op_readwrite}


class RawBundledPython(RawBundled):
    key = "raw-bundled-python"
    python = 10e-6
    label = ("raw psycopg2, BEGIN bundled, + %.0f µs of Python (reference)"
             % (python * 1e6))
    note = ("The row above with %.0f µs of Python (a loop reading the "
            "clock) between the statements and the COMMIT: the same round "
            "trips, so the distance between the two rows is what that much "
            "Python costs per transaction at each thread count, where the "
            "threads share the GIL and the server shares the CPUs."
            % (python * 1e6))


class ZopeFloor(Contender):
    key = "zope-floor"
    label = "floor: minimal data manager, psycopg2's own BEGIN"
    packages = ("psycopg2-binary", "transaction")
    note = ("Not a pool: `with transaction.manager:` around each thread's "
            "own psycopg2 connection, joined by a data manager of a dozen "
            "lines that calls conn.commit() in tpc_vote (see "
            "contenders.py). psycopg2 sends BEGIN as a message of its own. "
            "What the `transaction` package costs by itself.")
    limited = False
    zope = True
    bundled = False
    twophase = False

    def setup(self, size, timeout=30.0):
        self._conns = []

    def thread_ops(self, worker):
        conn = psycopg2.connect(self.dsn)
        self._conns.append(conn)
        tm = transaction.manager
        dm = _FloorDataManager(conn, tm, self.bundled, self.twophase)
        connection = dm.connection

        def op_noop():
            with tm:
                connection()

        def op_select1():
            with tm:
                select1(connection())

        def op_readwrite():
            with tm:
                readwrite(connection(), worker)

        return {"noop": op_noop, "select1": op_select1,
                "readwrite": op_readwrite}

    def teardown(self):
        for conn in self._conns:
            conn.close()


class ZopeFloorBundled(ZopeFloor):
    key = "zope-floor-bundled"
    label = "floor: minimal data manager, BEGIN bundled"
    note = ("As above, but the connection is in autocommit mode: the "
            "transaction's first statement goes as `BEGIN; <statement>` in "
            "one message and the data manager sends COMMIT in tpc_vote. "
            "The design zpgpool's Zope path implements, without a pool: "
            "zpgpool's own floor.")
    bundled = True


class ZopeFloorBundledTwoPhase(ZopeFloorBundled):
    key = "zope-floor-bundled-2pc"
    label = "floor: minimal two-phase data manager, BEGIN bundled"
    twophase = True
    micro = False
    note = ("The bundled floor with PREPARE TRANSACTION in tpc_vote and "
            "COMMIT PREPARED in tpc_finish: three round trips, the design "
            "zpgpool's two-phase Zope path implements, without a pool: "
            "its own two-phase floor. It prepares every transaction, also "
            "one that only read, which zpgpool does not (see its note).")


class ZpgpoolZope(Contender):
    key = "zpgpool-zope"
    label = "zpgpool Zope path, one-phase"
    packages = ("zpgpool", "transaction", "zope.component")
    twophase = False
    zope = True
    note = ("`with transaction.manager:` + "
            "`getUtility(IConnectionPool, name).connection()`; the "
            "transaction manager commits.")

    @property
    def utility_name(self):
        return "bench-2pc" if self.twophase else "bench-1pc"

    def setup(self, size, timeout=30.0):
        self.pool = zpgpool.ConnectionPool(
            self.dsn, name=self.utility_name, minconn=size, maxconn=size,
            timeout=timeout, twophase=self.twophase)
        self.pool.open(wait=True, timeout=120)
        zope.component.provideUtility(self.pool, IConnectionPool,
                                      self.utility_name)

    def teardown(self):
        getGlobalSiteManager().unregisterUtility(
            self.pool, IConnectionPool, self.utility_name)
        self.pool.closeall()

    def thread_ops(self, worker):
        tm = transaction.manager
        name = self.utility_name

        def op_noop():
            with tm:
                getUtility(IConnectionPool, name).connection()

        def op_select1():
            with tm:
                select1(getUtility(IConnectionPool, name).connection())

        def op_readwrite():
            with tm:
                readwrite(getUtility(IConnectionPool, name).connection(),
                          worker)

        return {"noop": op_noop, "select1": op_select1,
                "readwrite": op_readwrite}

    def exhaust_op(self, worker, hold, arrivals, served):
        tm = transaction.manager
        name = self.utility_name

        def op():
            with tm:
                arrival = next(arrivals)
                start = _clock()
                conn = getUtility(IConnectionPool, name).connection()
                served_at = _clock()
                waited = served_at - start
                service = next(served)
                select1(conn)
                _sleep(hold)
            return arrival, service, waited, served_at

        return op

    def repeat_ops(self):
        """Loops for repeated ``connection()`` calls in one transaction:
        {label: loop(n) -> seconds}."""
        tm = transaction.manager
        name = self.utility_name
        pool = self.pool

        def bare(n):
            with tm:
                connection = pool.connection
                connection()
                start = _clock()
                for _ in range(n):
                    connection()
                return _clock() - start

        def lookup(n):
            with tm:
                getUtility(IConnectionPool, name).connection()
                start = _clock()
                for _ in range(n):
                    getUtility(IConnectionPool, name).connection()
                return _clock() - start

        return {
            "zpgpool: pool.connection()": bare,
            "zpgpool: getUtility(IConnectionPool, name).connection()": lookup,
        }


class ZpgpoolZopeTwoPhase(ZpgpoolZope):
    key = "zpgpool-zope-2pc"
    label = "zpgpool Zope path, two-phase"
    twophase = True
    note = ("As above with twophase=True: PREPARE TRANSACTION + COMMIT "
            "PREPARED for read-write. A transaction that only read (SELECT "
            "1) is not prepared: its vote commits in one message, after a "
            "check that it wrote nothing (the read-only optimization; "
            "README, Two-phase), so its SELECT 1 figures are not those of "
            "a prepared transaction; its read-write figures are.")
    micro = False


class ZopeSQLAlchemy(Contender):
    key = "zope.sqlalchemy"
    label = "zope.sqlalchemy + transaction, one-phase"
    packages = ("zope.sqlalchemy", "SQLAlchemy", "transaction")
    twophase = False
    zope = True
    note = ("scoped_session(sessionmaker(bind=engine)), register(Session), "
            "session.execute(text(...)), mark_changed(session); QueuePool as "
            "above, no pre-ping.")

    def setup(self, size, timeout=30.0):
        import sqlalchemy
        from sqlalchemy.orm import scoped_session
        from sqlalchemy.orm import sessionmaker
        from zope.sqlalchemy import register
        dsn = self.dsn
        self.engine = sqlalchemy.create_engine(
            "postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn),
            pool_size=size, max_overflow=0, pool_timeout=timeout)
        self.Session = scoped_session(
            sessionmaker(bind=self.engine, twophase=self.twophase))
        register(self.Session)

    def teardown(self):
        self.engine.dispose()

    def thread_done(self):
        self.Session.remove()

    def thread_ops(self, worker):
        from sqlalchemy import text
        from zope.sqlalchemy import mark_changed
        tm = transaction.manager
        Session = self.Session
        q_select1 = text(SELECT1)
        q_insert = text("INSERT INTO zpgpool_bench (worker, payload) "
                        "VALUES (:worker, :payload) RETURNING id")
        q_select_row = text("SELECT worker, payload FROM zpgpool_bench "
                            "WHERE id = :id")

        def op_noop():
            with tm:
                Session().connection()

        def op_select1():
            with tm:
                session = Session()
                session.execute(q_select1).fetchone()
                mark_changed(session)

        def op_readwrite():
            with tm:
                session = Session()
                row_id = session.execute(
                    q_insert, {"worker": worker, "payload": PAYLOAD}
                ).scalar_one()
                session.execute(q_select_row, {"id": row_id}).fetchone()
                mark_changed(session)

        return {"noop": op_noop, "select1": op_select1,
                "readwrite": op_readwrite}

    def exhaust_op(self, worker, hold, arrivals, served):
        from sqlalchemy import text
        from zope.sqlalchemy import mark_changed
        tm = transaction.manager
        Session = self.Session
        q_select1 = text(SELECT1)

        def op():
            with tm:
                session = Session()
                arrival = next(arrivals)
                start = _clock()
                session.connection()
                served_at = _clock()
                waited = served_at - start
                service = next(served)
                session.execute(q_select1).fetchone()
                mark_changed(session)
                _sleep(hold)
            return arrival, service, waited, served_at

        return op

    def repeat_ops(self):
        tm = transaction.manager
        Session = self.Session

        def loop(n):
            with tm:
                Session().connection()
                start = _clock()
                for _ in range(n):
                    Session().connection()
                return _clock() - start

        return {"zope.sqlalchemy: Session().connection()": loop}


class ZopeSQLAlchemyTwoPhase(ZopeSQLAlchemy):
    key = "zope.sqlalchemy-2pc"
    label = "zope.sqlalchemy + transaction, two-phase"
    twophase = True
    note = "As above with sessionmaker(twophase=True)."
    micro = False


ALL = (
    RawFloor,
    ZopeFloor,
    ZopeFloorBundled,
    ZopeFloorBundledTwoPhase,
    ZpgpoolZope,
    ZpgpoolZopeTwoPhase,
    RawBundled,
    RawBundledPython,
    RawTwoPhase,
    ZpgpoolGetconn,
    Psycopg2Threaded,
    Psycopg2PoolPackage,
    PsycopgPool,
    Psycopg3Raw,
    SQLAlchemyQueuePool,
    SQLAlchemyPrePing,
    ZopeSQLAlchemy,
    ZopeSQLAlchemyTwoPhase,
    ConnectPerRequest,
)

BY_KEY = {cls.key: cls for cls in ALL}
