"""The ``<zpgpool:pool>`` ZCML directive.

A site declares its pools in ZCML::

    <configure xmlns="http://namespaces.zope.org/zope"
               xmlns:zpgpool="http://namespaces.zope.org/zpgpool">
      <include package="zpgpool" />
      <zpgpool:pool name="main" dsn="env:APP_DSN" maxconn="20" />
    </configure>

and code finds them with ``getUtility(IConnectionPool, name="main")``.

Reading the ZCML does no I/O beyond resolving ``env:`` and ``file:`` DSNs:
the handler builds a pool, which connects to nothing until it is first
used, and registers it through ``zope.component.zcml.utility``, so two pools
with one name are reported as a configuration conflict.  Every value is
checked while the file is read, and a bad one stops the configuration with
an error that names the file, the line, the attribute and what it accepts.
"""
import atexit
import logging
import math
import os

import psycopg2
import psycopg2.extensions
from zope.component import getGlobalSiteManager
from zope.component.zcml import utility
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.fields import Bool
from zope.configuration.fields import GlobalObject
from zope.interface import Interface
from zope.schema import Float
from zope.schema import Int
from zope.schema import Text
from zope.schema import TextLine
from zope.schema import ValidationError
from transaction.interfaces import ITransactionManager

from zpgpool.errors import InvalidOption
from zpgpool.pool import hide_passwords
from zpgpool.pool import scrub_password
from zpgpool.interfaces import IConnectionPool


logger = logging.getLogger("zpgpool")

#: The isolation levels ``isolation_level`` accepts, as PostgreSQL spells
#: them.  (READ UNCOMMITTED is left out: PostgreSQL runs it as READ
#: COMMITTED, and accepting it would only mislead.)
ISOLATION_LEVELS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")

# What the Seconds fields accept for "no limit".
_OFF = ("off", "none")


class InvalidAttribute(ValidationError):
    """A directive attribute has a value that is not allowed.

    Its text names the attribute, says what the attribute accepts and shows
    the value given (never a DSN's contents).
    """

    def __str__(self):
        return self.args[0]


# ---------------------------------------------------------------------------
# Fields.  Each one turns the attribute's text into the value the pool
# takes and, when it cannot, says in the error what it would have accepted:
# zope.schema's own errors ("TooSmall: (0, 1)") leave the reader guessing.

class Size(Int):
    """A whole number of connections, at least ``least``."""

    def __init__(self, least=0, **kw):
        self.least = least
        super().__init__(**kw)

    def _explain(self, got):
        return InvalidAttribute(
            "%s must be a whole number, %d or more; got %r"
            % (self.__name__, self.least, got))

    def fromUnicode(self, value):
        try:
            number = int(value.strip())
        except ValueError:
            raise self._explain(value) from None
        if number < self.least:
            raise self._explain(value)
        self.validate(number)
        return number

    def _validate(self, value):
        if isinstance(value, int) and value < self.least:
            raise self._explain(value)
        super()._validate(value)


class Seconds(Float):
    """A duration in seconds: a finite number greater than 0 (or 0 and more
    with ``zero_ok``), or ``off`` for no limit when ``off_ok``."""

    def __init__(self, zero_ok=False, off_ok=False, **kw):
        self.zero_ok = zero_ok
        self.off_ok = off_ok
        super().__init__(**kw)

    def _explain(self, got):
        allowed = "0 or more" if self.zero_ok else "greater than 0"
        off = ", or 'off' for no limit" if self.off_ok else ""
        return InvalidAttribute(
            "%s must be a number of seconds %s%s; got %r"
            % (self.__name__, allowed, off, got))

    def fromUnicode(self, value):
        text = value.strip()
        if self.off_ok and text.lower() in _OFF:
            return None
        try:
            number = float(text)
        except ValueError:
            raise self._explain(value) from None
        if not self._allowed(number):
            raise self._explain(value)
        self.validate(number)
        return number

    def _allowed(self, number):
        if not math.isfinite(number):
            return False
        return number >= 0 if self.zero_ok else number > 0

    def _validate(self, value):
        if isinstance(value, (int, float)) and not self._allowed(value):
            raise self._explain(value)
        super()._validate(value)


class Flag(Bool):
    """A yes/no attribute that says what it accepts when it gets neither."""

    def fromUnicode(self, value):
        try:
            return super().fromUnicode(value)
        except ValidationError:
            raise InvalidAttribute(
                "%s must be true or false (or yes/no, y/n, 1/0); got %r"
                % (self.__name__, value)) from None


class IsolationLevel(TextLine):
    """One of ISOLATION_LEVELS, in any case, with spaces or underscores."""

    def fromUnicode(self, value):
        level = " ".join(value.replace("_", " ").split()).upper()
        if level not in ISOLATION_LEVELS:
            raise InvalidAttribute(
                "isolation_level must be one of %s (in any case); got %r"
                % (", ".join(repr(x) for x in ISOLATION_LEVELS), value))
        return level


class TransactionManagerName(GlobalObject):
    """The dotted name of an ``ITransactionManager``."""

    def _explain(self, value, why):
        return InvalidAttribute(
            "transaction_manager must be the dotted name of a transaction"
            " manager, such as 'transaction.manager'; %r %s" % (value, why))

    def fromUnicode(self, value):
        try:
            manager = super().fromUnicode(value)
        except ValidationError:
            raise self._explain(value, "cannot be imported") from None
        if not ITransactionManager.providedBy(manager):
            raise self._explain(
                value, "is not an ITransactionManager but %r"
                % (type(manager).__name__,))
        return manager


class DSN(Text):
    """A libpq connection string, or where to find one.

    ``env:NAME`` reads the environment variable NAME and ``file:PATH`` the
    file PATH (a relative PATH is taken relative to the package of the ZCML
    file, as other ZCML paths are; surrounding white space is stripped).
    Both are read when the ZCML is read.  Anything else is the connection
    string itself.  Either way libpq must be able to parse what it gets.
    """

    def fromUnicode(self, value):
        dsn = self._resolve(value)
        try:
            psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.Error as e:
            # libpq says what it stumbled on, and that can be the password
            # itself (an undecodable %-escape in a URI's password, say).
            reason = str(e).strip()
            if reason.startswith("invalid dsn: "):
                reason = reason[len("invalid dsn: "):]
            raise InvalidAttribute(
                "dsn must be a connection string libpq can parse: %s"
                % scrub_password(reason, dsn)) from None
        return dsn

    def _resolve(self, value):
        # Nothing below may put the resolved text into an error: it is the
        # secret.  Errors name the variable or the file instead.
        text = value.strip()
        if text.startswith("env:"):
            variable = text[4:].strip()
            if not variable:
                raise InvalidAttribute(
                    "dsn='env:' must name an environment variable,"
                    " as in dsn='env:APP_DSN'")
            dsn = os.environ.get(variable)
            if dsn is None:
                raise InvalidAttribute(
                    "dsn: the environment variable %r is not set"
                    " (dsn=%r)" % (variable, value))
            where = "the environment variable %r" % variable
        elif text.startswith("file:"):
            filename = text[5:].strip()
            if not filename:
                raise InvalidAttribute(
                    "dsn='file:' must name a file,"
                    " as in dsn='file:/run/secrets/app_dsn'")
            path = self.context.path(filename) if self.context else filename
            try:
                with open(path, encoding="utf-8") as f:
                    dsn = f.read()
            except (OSError, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or type(e).__name__
                raise InvalidAttribute(
                    "dsn: cannot read the file %r: %s (dsn=%r)"
                    % (path, reason, value)) from None
            where = "the file %r" % path
        else:
            return value
        dsn = dsn.strip()
        if not dsn:
            raise InvalidAttribute(
                "dsn: %s is empty (dsn=%r); to use libpq's defaults write"
                ' dsn=""' % (where, value))
        return dsn

    def _validate(self, value):
        # Text's checks would quote the value; a str is all we need.
        if not isinstance(value, str):
            raise InvalidAttribute(
                "dsn must be a text, not %s" % type(value).__name__)


# ---------------------------------------------------------------------------
# The directive.  Each field's default is the pool's own default (a test
# keeps the two in step); a field left out of the ZCML is not passed to the
# pool at all.

class IPoolDirective(Interface):
    """Declare a PostgreSQL connection pool, registered as a named
    ``zpgpool.interfaces.IConnectionPool`` utility."""

    name = TextLine(
        title="Name",
        description=(
            "The name the pool is registered under and shown as in logs,"
            " errors and stats. Code finds it with"
            " getUtility(IConnectionPool, name=...). Two pools with one name"
            " are a configuration conflict."),
        required=False,
        default="",
    )

    dsn = DSN(
        title="Connection string",
        description=(
            "A libpq connection string, either key=value pairs"
            " ('host=db dbname=app user=app') or a URI"
            " ('postgresql://app@db/app'). To keep secrets out of ZCML write"
            " 'env:NAME' to read it from the environment variable NAME, or"
            " 'file:PATH' to read it from a file (stripped); both are read"
            " when the ZCML is read. An empty value uses libpq's defaults"
            " (the PG* environment variables, the service file)."),
        required=True,
    )

    minconn = Size(
        title="Minimum connections",
        description=(
            "How many idle connections the pool keeps open once it is in"
            " use. A whole number, 0 or more, not above maxconn."),
        least=0,
        required=False,
        default=1,
    )

    maxconn = Size(
        title="Maximum connections",
        description=(
            "The most connections the pool opens at once; callers beyond"
            " it wait up to 'timeout' seconds. A whole number, 1 or more."),
        least=1,
        required=False,
        default=10,
    )

    timeout = Seconds(
        title="Wait time-out",
        description=(
            "Seconds a caller waits for a free connection before"
            " PoolTimeout is raised; 0 raises at once."),
        zero_ok=True,
        required=False,
        default=30.0,
    )

    max_lifetime = Seconds(
        title="Maximum connection lifetime",
        description=(
            "Seconds after which a connection is closed and replaced by a"
            " fresh one (one in use, when it comes back), or 'off'."),
        off_ok=True,
        required=False,
        default=1800.0,
    )

    max_idle = Seconds(
        title="Maximum idle time",
        description=(
            "Seconds a connection above minconn may sit unused before the"
            " pool closes it, or 'off'."),
        off_ok=True,
        required=False,
        default=600.0,
    )

    health_check_after = Seconds(
        title="Health check after idle",
        description=(
            "A connection that was idle longer than this many seconds is"
            " checked with a round trip before it is handed out; 0 checks"
            " every time, 'off' never."),
        zero_ok=True,
        off_ok=True,
        required=False,
        default=10.0,
    )

    leak_threshold = Seconds(
        title="Leak warning threshold",
        description=(
            "Log a warning, with where it was taken, for a connection"
            " checked out longer than this many seconds; 'off' (the"
            " default) never warns."),
        off_ok=True,
        required=False,
        default=None,
    )

    connect_timeout = Size(
        title="Connect time-out",
        description=(
            "Whole seconds libpq waits for a new connection to be made"
            " (libpq's connect_timeout); 0 waits for ever."),
        least=0,
        required=False,
        default=10,
    )

    reconnect_max_delay = Seconds(
        title="Longest reconnect delay",
        description=(
            "While the server cannot be reached the pool retries with"
            " growing delays; this is the longest one, in seconds."),
        required=False,
        default=10.0,
    )

    twophase = Flag(
        title="Two-phase commit",
        description=(
            "Commit connection() work with PREPARE TRANSACTION in the vote"
            " and COMMIT PREPARED in the finish, so that PostgreSQL takes"
            " part in two-phase commit with other resource managers. The"
            " server needs max_prepared_transactions above 0."),
        required=False,
        default=False,
    )

    isolation_level = IsolationLevel(
        title="Isolation level",
        description=(
            "The isolation level of every transaction: 'READ COMMITTED',"
            " 'REPEATABLE READ' or 'SERIALIZABLE' (in any case). Left out,"
            " the server's default applies."),
        required=False,
        default=None,
    )

    readonly = Flag(
        title="Read-only",
        description=(
            "Start every transaction READ ONLY, so PostgreSQL refuses"
            " writes."),
        required=False,
        default=False,
    )

    deferrable = Flag(
        title="Deferrable",
        description=(
            "Start every transaction DEFERRABLE (meaningful with"
            " isolation_level SERIALIZABLE and readonly)."),
        required=False,
        default=False,
    )

    transaction_manager = TransactionManagerName(
        title="Transaction manager",
        description=(
            "The dotted name of the transaction manager whose transactions"
            " connection() joins. Left out, transaction.manager."),
        required=False,
        default=None,
    )

    application_name = TextLine(
        title="Application name",
        description=(
            "Reported to the server as application_name, shown in"
            " pg_stat_activity and the server log, unless the DSN sets one."
            " Left out, 'zpgpool:NAME'."),
        required=False,
        default=None,
    )


class _MaskedInfo:
    """A directive's location whose quoted source hides passwords.

    zope.configuration quotes the directive's source when it reports a
    conflict (two pools with one name) or an action that failed; a
    password written in a ``dsn`` attribute would be shown there.  The
    location itself (``repr``) is untouched.
    """

    def __init__(self, info):
        self._info = info

    def __str__(self):
        return hide_passwords(str(self._info))

    def __repr__(self):
        return repr(self._info)

    def __getattr__(self, name):
        return getattr(self._info, name)


def pool(_context, dsn, name="", **options):
    """Handle ``<zpgpool:pool>``: build the pool and register it.

    Builds a ``zpgpool.ConnectionPool`` (which connects to nothing) so that
    every option is checked now, while the file is read, and records the
    utility registration as an action.  Raises ``ConfigurationError`` for a
    combination of values the pool refuses.
    """
    # Imported here: zpgpool.pool is the heavy half of the package, and the
    # schema above is useful (for documentation tools) without it.
    from zpgpool.pool import ConnectionPool

    # Check minconn against maxconn here, with the schema's defaults for the
    # one left out, so that the message speaks in attributes.
    minconn = options.get("minconn", IPoolDirective["minconn"].default)
    maxconn = options.get("maxconn", IPoolDirective["maxconn"].default)
    if minconn > maxconn:
        raise ConfigurationError(
            "<zpgpool:pool name=%r>: minconn (%d) must not be greater than"
            " maxconn (%d)" % (name, minconn, maxconn))

    try:
        component = ConnectionPool(dsn, name=name, **options)
    except InvalidOption as e:  # pragma: no cover
        # Unreachable today: the fields above check every value the pool
        # checks.  Kept so that a pool growing stricter still fails as a
        # configuration error, scrubbed and not chained like the rest.
        raise ConfigurationError(
            "<zpgpool:pool name=%r>: %s"
            % (name, scrub_password(str(e), dsn))) from None

    # The actions recorded below carry this directive's location; make its
    # quoted source safe to show before they take it.
    if not isinstance(_context.info, _MaskedInfo):
        _context.info = _MaskedInfo(_context.info)
    utility(_context, provides=IConnectionPool, component=component,
            name=name)


# ---------------------------------------------------------------------------
# Closing pools when the process exits.

class ICloseAtExitDirective(Interface):
    """Close every registered pool when the process exits.

    ``configure.zcml`` uses it; including the package's ZCML is enough.
    """


def close_registered_pools():
    """Close every ``IConnectionPool`` utility of the global registry.

    Called at process exit once ``configure.zcml`` was loaded; an
    application may call it itself when it shuts down.  A pool that fails
    to close is logged and the others are still closed: this never raises.
    """
    registry = getGlobalSiteManager()
    for name, each in list(registry.getUtilitiesFor(IConnectionPool)):
        try:
            each.close()
        except Exception:
            logger.exception("Closing the pool %r failed", name)


_exit_hook_installed = False


def install_exit_hook():
    """Make ``close_registered_pools`` run at process exit, once.

    Calling it again does nothing, so loading the ZCML twice (tests do)
    registers one hook.
    """
    global _exit_hook_installed
    if not _exit_hook_installed:
        atexit.register(close_registered_pools)
        _exit_hook_installed = True


def closePoolsAtExit(_context):
    """Handle ``<zpgpool:closePoolsAtExit/>``: install the exit hook when
    the configuration is carried out (not while it is read)."""
    _context.action(discriminator=None, callable=install_exit_hook)
