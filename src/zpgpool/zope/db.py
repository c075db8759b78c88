"""Running ZSQL Methods' SQL on a pool: what ``Shared.DC.ZRDB`` calls.

A ZSQL Method renders its template into one text, statements separated by
``\\0``, and hands it to ``DB.query``, which answers ``(items, rows)``:
a dict per column (``name``, ``type`` as a one-letter Zope type,
``width``, ``null``) and the rows of the last statement that returned
any.

There is no transaction code here.  Every statement runs on the pool's
``connection()``: the calling thread's connection, joined to the current
Zope transaction by zpgpool's data manager, which sends COMMIT (or PREPARE
TRANSACTION) in the vote and ROLLBACK on abort.  A ZSQL Method and a view
that asks the same pool for ``connection()`` in one request therefore
share one connection and one transaction.  Errors go up unchanged: a
serialization failure is already a ``TransientError`` the publisher
retries, and any other failure aborts the whole request's transaction.
"""
import time

import psycopg2
import psycopg2.extensions
from DateTime import DateTime


#: Zope's one-letter column types (see Shared.DC.ZRDB.RDB), by type oid.
#: Integers are 'i', other numbers and booleans 'n' (as ZPsycopgDA has
#: them), dates and times 'd', text 't', anything else 's'.
_TYPE_LETTERS = {}
for _letter, _types in (
        ("n", (psycopg2.NUMBER, psycopg2.extensions.BOOLEAN)),
        ("i", (psycopg2.extensions.INTEGER, psycopg2.extensions.LONGINTEGER,
               psycopg2.ROWID)),
        ("d", (psycopg2.DATETIME, psycopg2.extensions.DATE,
               psycopg2.extensions.TIME))):
    for _type in _types:
        _TYPE_LETTERS.update(dict.fromkeys(_type.values, _letter))
_TYPE_LETTERS[25] = "t"   # text
del _letter, _types, _type

_INFINITE = ("infinity", "-infinity")


def _to_datetime(text, cursor):
    # Infinite timestamps have no DateTime; they stay the server's text.
    if text is None or text in _INFINITE:
        return text
    return DateTime(text)


def _time_to_datetime(text, cursor):
    # A time of day becomes that time today, in the local time zone, as
    # ZPsycopgDA made it (so that DST is today's).
    if text is None:
        return None
    return DateTime("%s %s" % (time.strftime("%Y-%m-%d"), text[:8]))


#: The typecasters for ``zdatetime``: timestamp and timestamptz, date, and
#: time columns come back as Zope ``DateTime`` objects.
ZOPE_DATETIME_CASTERS = (
    psycopg2.extensions.new_type((1114, 1184), "ZPGPOOL_ZDATETIME",
                                 _to_datetime),
    psycopg2.extensions.new_type((1082,), "ZPGPOOL_ZDATE", _to_datetime),
    psycopg2.extensions.new_type((1083,), "ZPGPOOL_ZTIME",
                                 _time_to_datetime),
)

TABLES_SQL = """\
SELECT table_schema, table_name, table_type
  FROM information_schema.tables
 WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
 ORDER BY table_schema, table_name"""

COLUMNS_SQL = """\
SELECT column_name, data_type, udt_name, is_nullable,
       character_maximum_length
  FROM information_schema.columns
 WHERE table_schema = %s AND table_name = %s
 ORDER BY ordinal_position"""


class DB:
    """The object a database adapter's ``__call__`` returns, and ZSQL
    Methods run their queries through.

    It holds no connection: *pool* is asked for ``connection()`` at each
    call, so it is cheap to make and safe to share between threads.  With
    *zdatetime*, date and time columns come back as Zope ``DateTime``
    objects; the casters are registered on the cursor only, so other
    users of a shared pool still get Python's ``datetime`` objects.
    """

    def __init__(self, pool, zdatetime=False):
        self.pool = pool
        self.zdatetime = zdatetime

    def cursor(self):
        """Return a cursor of the thread's connection, in the current
        transaction."""
        cursor = self.pool.connection().cursor()
        if self.zdatetime:
            for caster in ZOPE_DATETIME_CASTERS:
                psycopg2.extensions.register_type(caster, cursor)
        return cursor

    def query(self, query_string, max_rows=None, query_data=None):
        """Run the ``\\0``-separated statements of *query_string*; return
        ``(items, rows)`` for the one result set they produce.

        *query_data*, when given, is passed to every statement as its
        parameters (psycopg2's ``%s`` / ``%(name)s`` style).  At most
        *max_rows* rows are returned when it is given and not 0.  Several
        statements may return rows only if their columns are the same, and
        then the last one's rows are returned; otherwise
        ``psycopg2.ProgrammingError`` is raised.  Statements that return
        nothing give ``([], [])``.
        """
        description = None
        rows = []
        with self.cursor() as cursor:
            for statement in query_string.split("\0"):
                if not statement.strip():
                    continue
                cursor.execute(statement, query_data or None)
                if cursor.description is None:
                    continue
                if description is not None and \
                        _names(cursor.description) != _names(description):
                    raise psycopg2.ProgrammingError(
                        "zpgpool.zope: one query may return one result set;"
                        " the statement %r returns other columns (%s) than"
                        " an earlier one (%s)" % (
                            _shorten(statement),
                            ", ".join(_names(cursor.description)),
                            ", ".join(_names(description))))
                description = cursor.description
                if max_rows:
                    rows = cursor.fetchmany(max_rows)
                else:
                    rows = cursor.fetchall()
        if description is None:
            return [], []
        return describe(description), [list(row) for row in rows]

    def tables(self):
        """Return a dict per table and view outside the system schemas:
        ``table_name``, ``table_schema`` and ``table_type`` ('TABLE' or
        'VIEW', as ZPsycopgDA names them)."""
        with self.cursor() as cursor:
            cursor.execute(TABLES_SQL)
            return [{"table_schema": schema, "table_name": name,
                     "table_type": "VIEW" if kind == "VIEW" else "TABLE"}
                    for schema, name, kind in cursor.fetchall()]

    def columns(self, table_name, table_schema="public"):
        """Return a dict per column of the table: ``name``, ``type`` (the
        SQL type), ``short_type`` (the type's name in pg_type),
        ``nullable`` and ``width`` (a character type's length, or None).
        An unknown table has no columns."""
        with self.cursor() as cursor:
            cursor.execute(COLUMNS_SQL, (table_schema, table_name))
            return [{"name": name, "type": sqltype, "short_type": udt,
                     "nullable": nullable == "YES", "width": width}
                    for name, sqltype, udt, nullable, width
                    in cursor.fetchall()]


def describe(description):
    """Turn a DB-API cursor description into ZRDB's column dicts."""
    return [{
        "name": column.name,
        "type": _TYPE_LETTERS.get(column.type_code, "s"),
        "width": column.internal_size if (column.internal_size or 0) > 0
        else None,
        "null": column.null_ok,
    } for column in description]


def _names(description):
    return [column.name for column in description]


def _shorten(statement, limit=60):
    text = " ".join(statement.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
