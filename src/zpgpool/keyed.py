"""The keyed half of the psycopg2.pool contract (``getconn(key)``,
``putconn(conn, key=...)``) and ``closeall()``, so that code written for
psycopg2's pools keeps working. The unkeyed ``getconn()``/``putconn()``
are the pool's hot path, in core.py; they come here when given a key.

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

    def _getconn_keyed(self, key, timeout=None):
        """``getconn(key)``: the connection held under ``key``, else a new
        checkout, held under it from now on."""
        with self._lock:
            # As psycopg2: a closed pool refuses keys it still remembers.
            if self._closed:
                raise PoolClosed("%s is closed" % self.label)
            conn = self._keys.get(key)
        if conn is not None:
            return conn
        conn = self.acquire(timeout)
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

    def _putconn_keyed(self, conn, key, close):
        """``putconn`` given a key, or no connection: find or check the
        connection held under the key, then return it the usual way."""
        if conn is None:
            if key is None:
                raise ConnectionMisuse("%s: putconn() needs a connection or "
                                       "a key" % self.label)
            with self._lock:
                conn = self._keys.get(key)
            if conn is None:
                raise ConnectionMisuse("%s: no connection is held under key"
                                       " %r" % (self.label, key))
        elif getattr(conn, "_zp_key", None) != key:
            raise ConnectionMisuse("%s: the connection is not held under key "
                                   "%r" % (self.label, key))
        self.release(conn, close)

    def closeall(self):
        """Close every connection, in use or not, and the pool itself.

        As psycopg2's ``closeall``: connections still checked out are closed
        too. Use ``close()`` to let them finish first.
        """
        self._shut(force=True, timeout=0)
