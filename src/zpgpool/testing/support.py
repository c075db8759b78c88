"""DSNs, configuration values, ports and SQL: small helpers of the fixtures.

``_execute`` imports psycopg2 when it runs, not when this module is
imported.
"""
import re
import socket


def _dsn_value(value):
    value = str(value)
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'%s'" % value.replace('\\', '\\\\').replace("'", "\\'")


def make_dsn(**params):
    """Return a libpq keyword/value DSN of *params*, quoting where needed.

    Parameters whose value is None are left out.
    """
    return ' '.join('%s=%s' % (key, _dsn_value(value))
                    for key, value in params.items() if value is not None)


def _quote_ident(name):
    return '"%s"' % name.replace('"', '""')


def _conf_value(value):
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (int, float)):
        return str(value)
    return "'%s'" % str(value).replace('\\', '\\\\').replace("'", "''")


def _free_port(host='127.0.0.1'):
    """Return a TCP port of *host* that nobody listens on right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != 5432:  # pragma: no branch (never in the ephemeral range)
            return port


def _port_in_use(port, host='127.0.0.1'):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _execute(dsn, sql, params=None, named=False):
    """Run ``sql`` in autocommit mode; return its rows (as dicts of the
    columns when ``named``), or None for a statement that returns none."""
    import psycopg2
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            if cur.description is None:
                return None
            rows = cur.fetchall()
            if named:
                names = [column[0] for column in cur.description]
                rows = [dict(zip(names, row)) for row in rows]
            return rows
    finally:
        conn.close()

