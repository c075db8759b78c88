"""The errors of zpgpool.testing.

Each one says what is missing or what failed, and what to do about it.
"""


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL server binaries were found.

    The message says what was looked at and what to install.
    """


class PostgresServerError(RuntimeError):
    """A PostgreSQL server command failed.

    The message holds the command's output and the end of the server log.
    """


class PgBouncerUnavailable(RuntimeError):
    """No usable ``pgbouncer`` program was found.

    The message names the path looked at and how to install PgBouncer.
    """


class PgBouncerError(RuntimeError):
    """PgBouncer did not start, or stopped by itself.

    The message holds the end of PgBouncer's log.
    """
