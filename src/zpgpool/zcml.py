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
from zope.interface.interface import InterfaceClass
from zope.schema import Float
from zope.schema import Int
from zope.schema import Text
from zope.schema import TextLine
from zope.schema import ValidationError
from transaction.interfaces import ITransactionManager

from zpgpool.conninfo import hide_passwords
from zpgpool.conninfo import scrub_password
from zpgpool.errors import InvalidOption
from zpgpool.interfaces import IConnectionPool
from zpgpool.options import ISOLATION_LEVELS
from zpgpool.options import OPTIONS
from zpgpool.options import isolation_level_name
from zpgpool.options import size_problem
from zpgpool.pool import ConnectionPool


logger = logging.getLogger("zpgpool")

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
    """A whole number, at least the pool option's least value.

    ``option`` names the pool option (options.py); its default and lower
    bound are the field's.
    """

    def __init__(self, option, **kw):
        spec = OPTIONS[option]
        self.least = spec.least
        super().__init__(required=False, default=spec.default, **kw)

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
    """A duration in seconds, in the range of the pool option ``option``
    (options.py), whose default is the field's; ``off`` stands for no limit
    where the option takes None.  Infinity is refused: 'off' says that."""

    def __init__(self, option, **kw):
        self.spec = spec = OPTIONS[option]
        self.zero_ok = not spec.positive
        self.off_ok = spec.none_ok
        super().__init__(required=False, default=spec.default, **kw)

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
        return self.spec.allows(number)

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
    """One of the pool's ISOLATION_LEVELS (options.py), in any case, with
    spaces or underscores."""

    def fromUnicode(self, value):
        level = isolation_level_name(value)
        if level is None:
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


class ConfigureName(GlobalObject):
    """The dotted name of a callable run on every new connection."""

    def fromUnicode(self, value):
        try:
            found = super().fromUnicode(value)
        except ValidationError:
            raise InvalidAttribute(
                "configure must be the dotted name of a callable that takes"
                " the new connection, such as 'myapp.db.setup'; %r cannot be"
                " imported" % (value,)) from None
        if not callable(found):
            raise InvalidAttribute(
                "configure must be the dotted name of a callable; %r is a %s"
                % (value, type(found).__name__))
        return found


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

    # Where else a DSN can be: the prefix, what must follow it, an example.
    _SOURCES = {
        "env": ("an environment variable", "APP_DSN"),
        "file": ("a file", "/run/secrets/app_dsn"),
    }

    def _resolve(self, value):
        # Nothing below may put the resolved text into an error: it is the
        # secret.  Errors name the variable or the file instead.
        source, colon, name = value.strip().partition(":")
        if not colon or source not in self._SOURCES:
            return value
        name = name.strip()
        if not name:
            what, example = self._SOURCES[source]
            raise InvalidAttribute("dsn='%s:' must name %s, as in dsn='%s:%s'"
                                   % (source, what, source, example))
        if source == "env":
            dsn = os.environ.get(name)
            if dsn is None:
                raise InvalidAttribute(
                    "dsn: the environment variable %r is not set"
                    " (dsn=%r)" % (name, value))
            where = "the environment variable %r" % name
        else:
            path = self.context.path(name) if self.context else name
            try:
                with open(path, encoding="utf-8") as f:
                    dsn = f.read()
            except (OSError, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or type(e).__name__
                raise InvalidAttribute(
                    "dsn: cannot read the file %r: %s (dsn=%r)"
                    % (path, reason, value)) from None
            where = "the file %r" % path
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
# The directive.  Its attributes, in the order they are documented: the
# name, the field that reads the value, and the field's title and
# description.  Every attribute but ``dsn`` is a pool option, whose default
# and range come from the option table (options.py); one left out of the
# ZCML is not passed to the pool at all.

_ATTRIBUTES = (
    ("name", TextLine, "Name",
     "The name the pool is registered under and shown as in logs, errors"
     " and stats. Code finds it with getUtility(IConnectionPool, name=...)."
     " Two pools with one name are a configuration conflict."),
    ("dsn", DSN, "Connection string",
     "A libpq connection string, either key=value pairs ('host=db"
     " dbname=app user=app') or a URI ('postgresql://app@db/app'). To keep"
     " secrets out of ZCML write 'env:NAME' to read it from the environment"
     " variable NAME, or 'file:PATH' to read it from a file (stripped);"
     " both are read when the ZCML is read. An empty value uses libpq's"
     " defaults (the PG* environment variables, the service file)."),
    ("minconn", Size, "Minimum connections",
     "How many idle connections the pool keeps open once it is in use. A"
     " whole number, 0 or more, not above maxconn."),
    ("maxconn", Size, "Maximum connections",
     "The most connections the pool opens at once; callers beyond it wait"
     " up to 'timeout' seconds. A whole number, 1 or more."),
    ("timeout", Seconds, "Wait time-out",
     "Seconds a caller waits for a free connection before PoolTimeout is"
     " raised; 0 raises at once."),
    ("max_lifetime", Seconds, "Maximum connection lifetime",
     "Seconds after which a connection is closed and replaced by a fresh"
     " one (one in use, when it comes back), or 'off'."),
    ("max_idle", Seconds, "Maximum idle time",
     "Seconds a connection above minconn may sit unused before the pool"
     " closes it, or 'off'."),
    ("health_check_after", Seconds, "Health check after idle",
     "A connection that was idle longer than this many seconds is checked"
     " with a round trip before it is handed out; 0 checks every time,"
     " 'off' never."),
    ("validation_timeout", Seconds, "Health check time limit",
     "The longest a health check may take, in seconds (less when the"
     " caller's own timeout is shorter): on a silently dropped network the"
     " check fails then, and the caller gets a new connection or an error,"
     " instead of waiting for the kernel."),
    ("leak_threshold", Seconds, "Leak warning threshold",
     "Log a warning, with where it was taken, for a connection checked out"
     " longer than this many seconds; 'off' (the default) never warns."),
    ("connect_timeout", Size, "Connect time-out",
     "Whole seconds libpq waits for a new connection to be made (libpq's"
     " connect_timeout); 0 waits for ever."),
    ("reconnect_max_delay", Seconds, "Longest reconnect delay",
     "While the server cannot be reached the pool retries with growing"
     " delays; this is the longest one, in seconds."),
    ("twophase", Flag, "Two-phase commit",
     "Commit connection() work with PREPARE TRANSACTION in the vote and"
     " COMMIT PREPARED in the finish, so that PostgreSQL takes part in"
     " two-phase commit with other resource managers. The server needs"
     " max_prepared_transactions above 0."),
    ("isolation_level", IsolationLevel, "Isolation level",
     "The isolation level of every transaction: 'READ COMMITTED',"
     " 'REPEATABLE READ' or 'SERIALIZABLE' (in any case). Left out, the"
     " server's default applies."),
    ("readonly", Flag, "Read-only",
     "Start every transaction READ ONLY, so PostgreSQL refuses writes."),
    ("deferrable", Flag, "Deferrable",
     "Start every transaction DEFERRABLE (meaningful with isolation_level"
     " SERIALIZABLE and readonly)."),
    ("transaction_manager", TransactionManagerName, "Transaction manager",
     "The dotted name of the transaction manager whose transactions"
     " connection() joins. Left out, transaction.manager."),
    ("configure", ConfigureName, "Per-connection setup",
     "The dotted name of a callable run with every new connection before"
     " its first use (register adapters, SET search_path or a role), and"
     " again after a transaction's session reset undid what it set. If it"
     " fails, the connection is discarded and the checkout fails with an"
     " error naming it."),
    ("application_name", TextLine, "Application name",
     "Reported to the server as application_name, shown in"
     " pg_stat_activity and the server log, unless the DSN sets one. Left"
     " out, 'zpgpool:NAME'."),
)


def _field(attribute, kind, title, description):
    """Return the schema field of one row of ``_ATTRIBUTES``."""
    if attribute not in OPTIONS:
        # The DSN: no pool option, as ConnectionPool takes it first, and
        # the one attribute a pool cannot do without.
        return kind(title=title, description=description, required=True)
    if issubclass(kind, (Size, Seconds)):
        # These take their default and range from the option themselves.
        return kind(attribute, title=title, description=description)
    return kind(title=title, description=description, required=False,
                default=OPTIONS[attribute].default)


#: The schema of ``<zpgpool:pool>``: a zope.interface interface whose
#: fields are made in ``_ATTRIBUTES``'s order, which is theirs.
IPoolDirective = InterfaceClass(
    "IPoolDirective", (Interface,),
    {row[0]: _field(*row) for row in _ATTRIBUTES},
    __doc__="""Declare a PostgreSQL connection pool, registered as a named
    ``zpgpool.interfaces.IConnectionPool`` utility.""",
    __module__=__name__)


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
    # Checked here too, with the schema's default for the one left out, so
    # that the message names the directive rather than the pool.
    problem = size_problem(
        options.get("minconn", IPoolDirective["minconn"].default),
        options.get("maxconn", IPoolDirective["maxconn"].default))
    if problem:
        raise ConfigurationError("<zpgpool:pool name=%r>: %s"
                                 % (name, problem))

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
