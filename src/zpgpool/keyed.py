"""The psycopg2.pool contract on top of the pool: ``getconn(key=None)``,
``putconn(conn, key=None, close=False)`` and ``closeall()``, so that code
written for psycopg2's pools keeps working.

``KeyedContract`` is mixed into ``CorePool`` (core.py); it uses the pool's
``acquire``, ``release``, ``_shut``, ``label`` and, under ``_lock``, the
``_closed`` flag and the ``_keys`` map (key -> connection). A connection
held under a key carries it as ``_zp_key``; the pool's return path clears
both.
"""
from zpgpool.errors import ConnectionMisuse
from zpgpool.errors import PoolClosed


class KeyedContract:
    """psycopg2's keyed checkout and return, and its ``closeall``."""

    def getconn(self, key=None):
        """Take a connection; with a ``key``, the one held under that key."""
        if key is None:
            return self.acquire()
        with self._lock:
            # As psycopg2: a closed pool refuses keys it still remembers.
            if self._closed:
                raise PoolClosed("%s is closed" % self.label)
            conn = self._keys.get(key)
        if conn is not None:
            return conn
        conn = self.acquire()
        with self._lock:
            other = self._keys.get(key)
            if other is None:
                self._keys[key] = conn
                conn._zp_key = key
        if other is not None:
            # Another thread took a connection for the same key meanwhile.
            self.release(conn)
            return other
        return conn

    def putconn(self, conn=None, key=None, close=False):
        """Return a connection taken with ``getconn``."""
        if conn is None:
            if key is None:
                raise ConnectionMisuse("%s: putconn() needs a connection or "
                                       "a key" % self.label)
            with self._lock:
                conn = self._keys.get(key)
            if conn is None:
                raise ConnectionMisuse("%s: no connection is held under key"
                                       " %r" % (self.label, key))
        elif key is not None and getattr(conn, "_zp_key", None) != key:
            raise ConnectionMisuse("%s: the connection is not held under key "
                                   "%r" % (self.label, key))
        self.release(conn, close=close)

    def closeall(self):
        """Close every connection, in use or not, and the pool itself.

        As psycopg2's ``closeall``: connections still checked out are closed
        too. Use ``close()`` to let them finish first.
        """
        self._shut(force=True, timeout=0)
