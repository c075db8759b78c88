"""The pool's options: one table of defaults, checks and allowed values.

``ConnectionPool`` checks its keyword arguments with ``check_options``; the
``<zpgpool:pool>`` directive (zcml.py) builds its fields from ``OPTIONS``,
so a default, a lower bound or an isolation level is written here once and
the pool and the ZCML cannot disagree about it.
"""
import psycopg2.extensions as _ext
from transaction.interfaces import ITransactionManager

from zpgpool.errors import InvalidOption


#: The isolation levels a pool accepts, as PostgreSQL spells them, with
#: psycopg2's constant for each.  READ UNCOMMITTED is left out: PostgreSQL
#: runs it as READ COMMITTED, and accepting it would only mislead.
ISOLATION_LEVELS = {
    "READ COMMITTED": _ext.ISOLATION_LEVEL_READ_COMMITTED,
    "REPEATABLE READ": _ext.ISOLATION_LEVEL_REPEATABLE_READ,
    "SERIALIZABLE": _ext.ISOLATION_LEVEL_SERIALIZABLE,
}


def isolation_level_name(text):
    """Return the ISOLATION_LEVELS key ``text`` spells, or None.

    Any case is accepted, and underscores or runs of white space between
    the words ("repeatable_read").
    """
    level = " ".join(text.replace("_", " ").split()).upper()
    return level if level in ISOLATION_LEVELS else None


class _Bad(Exception):
    """A value an option does not allow; the text says what it allows."""


class Option:
    """An option that takes any value (a mapping of libpq parameters)."""

    def __init__(self, default):
        self.default = default

    def check(self, value):
        """Return ``value`` as the pool keeps it, or raise _Bad."""
        return value


class TransactionManager(Option):
    """A transaction manager, or None for ``transaction.manager``."""

    ALLOWED = ("a transaction manager (an ITransactionManager, such as "
               "transaction.manager or pyramid_tm's request.tm)")

    def check(self, value):
        if value is not None and not ITransactionManager.providedBy(value):
            raise _Bad(self.ALLOWED + ", or None for transaction.manager")
        return value


class Count(Option):
    """A whole number, ``least`` or more."""

    def __init__(self, default, least):
        super().__init__(default)
        self.least = least

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, int) \
                or value < self.least:
            raise _Bad("an integer >= %d" % self.least)
        return value


class Seconds(Option):
    """A duration: a number greater than 0 (or 0 and more unless
    ``positive``), or None for no limit when ``none_ok``."""

    def __init__(self, default, positive=False, none_ok=False):
        super().__init__(default)
        self.positive = positive
        self.none_ok = none_ok

    def allows(self, number):
        """Tell whether the number ``number`` is in range (NaN is not)."""
        return number > 0 if self.positive else number >= 0

    def check(self, value):
        if value is None and self.none_ok:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not self.allows(value):
            raise _Bad("a number of seconds %s 0%s" % (
                ">" if self.positive else ">=",
                " or None" if self.none_ok else ""))
        return float(value)


class Flag(Option):
    """True or False, nothing else (not 1, not "yes")."""

    def check(self, value):
        if not isinstance(value, bool):
            raise _Bad("True or False")
        return value


class Text(Option):
    """A string, or None when ``none_ok``."""

    def __init__(self, default, none_ok=False):
        super().__init__(default)
        self.none_ok = none_ok

    def check(self, value):
        if not (isinstance(value, str) or value is None and self.none_ok):
            raise _Bad("a string")
        return value


class Callable(Option):
    """None, or something to call."""

    def check(self, value):
        if value is not None and not callable(value):
            raise _Bad("None or a callable taking the new connection")
        return value


class IsolationLevel(Option):
    """None (the server's default), a name from ISOLATION_LEVELS, or
    psycopg2's constant for one of them; kept as the constant."""

    def check(self, value):
        if value is None:
            return None
        if isinstance(value, str):
            name = isolation_level_name(value)
            if name is not None:
                return ISOLATION_LEVELS[name]
        elif isinstance(value, int) and not isinstance(value, bool) \
                and value in ISOLATION_LEVELS.values():
            return value
        raise _Bad("None or one of %s"
                   % ", ".join(repr(k) for k in ISOLATION_LEVELS))


#: Every pool option.  ConnectionPool's docstring says what each means.
OPTIONS = {
    "name": Text(""),
    "minconn": Count(1, least=0),
    "maxconn": Count(10, least=1),
    "timeout": Seconds(30.0),
    "max_lifetime": Seconds(1800.0, positive=True, none_ok=True),
    "max_idle": Seconds(600.0, positive=True, none_ok=True),
    "health_check_after": Seconds(10.0, none_ok=True),
    "validation_timeout": Seconds(5.0, positive=True),
    "leak_threshold": Seconds(None, positive=True, none_ok=True),
    "connect_timeout": Count(10, least=0),
    "reconnect_max_delay": Seconds(10.0, positive=True),
    "twophase": Flag(False),
    "isolation_level": IsolationLevel(None),
    "readonly": Flag(False),
    "deferrable": Flag(False),
    "transaction_manager": TransactionManager(None),
    "application_name": Text(None, none_ok=True),
    "connect_kwargs": Option(None),
    "configure": Callable(None),
}

#: Each option's default.
DEFAULTS = {name: option.default for name, option in OPTIONS.items()}


def label(name):
    """How errors and logs name the pool called ``name``."""
    return "zpgpool pool %r" % (name,)


def size_problem(minconn, maxconn):
    """Say what is wrong with this pair of sizes, or return None."""
    if minconn > maxconn:
        return ("minconn (%d) must not be greater than maxconn (%d)"
                % (minconn, maxconn))
    return None


def check_call_timeout(pool_label, value):
    """Check the ``timeout`` given to one call (getconn, checkout, ...):
    seconds as the option takes them; None means the pool's own."""
    if value is None:
        return None
    try:
        return OPTIONS["timeout"].check(value)
    except _Bad as exc:
        raise InvalidOption("%s: timeout must be %s (None for the pool's "
                            "timeout), got %r" % (pool_label, exc, value)
                            ) from None


def check_transaction_manager(pool_label, value):
    """Check the transaction manager given to ``connection()``."""
    if not ITransactionManager.providedBy(value):
        raise InvalidOption("%s: connection() takes %s, got %r"
                            % (pool_label, TransactionManager.ALLOWED, value))
    return value


def check_options(options):
    """Return every option, checked and with the defaults filled in.

    Raises ``InvalidOption`` naming the pool, the option, what it allows
    and the value given; an unknown option is refused with the list of
    valid ones.
    """
    name = options.get("name", "")
    if not isinstance(name, str):
        # No name to put in the label yet.
        raise InvalidOption("zpgpool pool: option 'name' must be a string,"
                            " got %r" % (name,))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidOption("%s: unknown option%s %s; valid options are: %s"
                            % (label(name), "s" if len(unknown) > 1 else "",
                               ", ".join(unknown), ", ".join(sorted(OPTIONS))))
    checked = {}
    for option, spec in OPTIONS.items():
        value = options.get(option, spec.default)
        try:
            checked[option] = spec.check(value)
        except _Bad as exc:
            raise InvalidOption("%s: option %r must be %s, got %r"
                                % (label(name), option, exc, value)) from None
    problem = size_problem(checked["minconn"], checked["maxconn"])
    if problem:
        raise InvalidOption("%s: %s" % (label(name), problem))
    return checked
