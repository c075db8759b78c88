"""zpgpool: a transaction-aware PostgreSQL connection pool for Zope.

Everything a user needs is importable from here; ``zpgpool.interfaces``
holds the contract and ``zpgpool.testing`` the throwaway server for tests.
"""
from zpgpool.compat import AbstractConnectionPool
from zpgpool.compat import PersistentConnectionPool
from zpgpool.compat import SimpleConnectionPool
from zpgpool.compat import ThreadedConnectionPool
from zpgpool.errors import CommitUnknown
from zpgpool.errors import ConflictError
from zpgpool.errors import ConnectError
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import InvalidOption
from zpgpool.errors import PoolClosed
from zpgpool.errors import PoolError
from zpgpool.errors import PoolTimeout
from zpgpool.errors import SessionLost
from zpgpool.pool import ConnectionPool


__all__ = [
    "AbstractConnectionPool", "CommitUnknown", "ConflictError", "ConnectError",
    "ConnectionMisuse", "ConnectionPool", "InvalidOption",
    "PersistentConnectionPool", "PoolClosed", "PoolError", "PoolTimeout",
    "SessionLost", "SimpleConnectionPool", "ThreadedConnectionPool",
]
