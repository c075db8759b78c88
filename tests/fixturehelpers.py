"""Helpers of the tests of zpgpool.testing's fixtures (PostgresServer,
PgBouncer, StandbyServer): a query's rows, and a TCP port that is taken."""
import contextlib
import socket

import psycopg2

from zpgpool.testing import program


def fetch(dsn, sql, params=None):
    """The rows of one statement, run in autocommit mode on a connection
    of its own."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


@contextlib.contextmanager
def taken_port(port=0):
    """Listen on ``port`` of 127.0.0.1 (any free one by default) while the
    block runs, and yield its number."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(('127.0.0.1', port))
        s.listen()
        yield s.getsockname()[1]


@contextlib.contextmanager
def offered_first(port):
    """Make the fixtures' port picker offer ``port`` first, once, as if it
    had been free when picked and was taken before the server bound it."""
    offered = []
    real_free_port = program._free_port

    def free_port(host):
        if offered:
            return real_free_port(host)
        offered.append(port)
        return port

    program._free_port = free_port
    try:
        yield
    finally:
        program._free_port = real_free_port
    # Else the test would pass without having tried the taken port.
    assert offered, "the fixture never asked for a port"
