"""Where a database adapter's pool comes from.

An adapter either names a pool declared in ZCML (``<zpgpool:pool>``), which
it only looks up, or carries a connection string, for which it owns a pool
of its own.  Owned pools live here, one per adapter for the whole process,
keyed by a random key the adapter keeps in the ZODB: every ZODB connection
(every worker thread) that loads the adapter finds the same pool, and a
moved or renamed adapter keeps its pool.  A pool is made on first use,
with nothing connected; it is replaced when the adapter's settings change
and closed when the adapter is deleted.
"""
import logging
import os
import threading
import uuid

import psycopg2
import psycopg2.extensions
from zope.component import getUtilitiesFor
from zope.component import queryUtility

from zpgpool import ConnectionPool
from zpgpool import InvalidOption
from zpgpool.interfaces import IConnectionPool


logger = logging.getLogger("zpgpool")

#: The isolation levels an owned pool accepts; "" leaves the server's.
ISOLATION_LEVELS = ("", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")


class SettingsError(ValueError):
    """An adapter setting is not allowed; the text says which, why, and
    what is allowed (never a password)."""


def new_key():
    """Return a fresh key for an adapter's owned pool."""
    return uuid.uuid4().hex


def resolve_dsn(label, text):
    """Return the connection string *text* stands for.

    ``env:NAME`` (and ZPsycopgDA's ``ENV:NAME``) reads the environment
    variable NAME, ``file:PATH`` the file PATH; anything else is the
    connection string itself.  They are read at each call, so a changed
    secret is picked up when the pool is next made.  Errors name the
    variable or the file, never what they hold.
    """
    stripped = text.strip()
    if stripped[:4] in ("env:", "ENV:"):
        name = stripped[4:].strip()
        if not name:
            raise SettingsError(
                "%s: the connection string %r must name an environment"
                " variable, as in 'env:APP_DSN'" % (label, text))
        value = os.environ.get(name)
        if value is None:
            raise SettingsError(
                "%s: the environment variable %r named by the connection"
                " string is not set" % (label, name))
        return value.strip()
    if stripped.startswith("file:"):
        path = stripped[5:].strip()
        if not path:
            raise SettingsError(
                "%s: the connection string %r must name a file, as in"
                " 'file:/run/secrets/app_dsn'" % (label, text))
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise SettingsError(
                "%s: cannot read the connection string from the file %r: %s"
                % (label, path, reason)) from None
    return text


def is_indirect(text):
    """Tell whether *text* points at a connection string elsewhere
    (``env:``, ``ENV:`` or ``file:``) rather than holding one."""
    return text.strip()[:4] in ("env:", "ENV:") or \
        text.strip().startswith("file:")


def masked(text):
    """Return *text* fit to show: ``env:``/``file:`` forms as they are, a
    connection string with its password replaced by ``***``, and a string
    libpq cannot parse not at all (it could hold a password anywhere)."""
    if is_indirect(text):
        return text
    try:
        params = psycopg2.extensions.parse_dsn(text)
    except psycopg2.Error:
        return "(a connection string libpq cannot parse)"
    if "password" not in params:
        return text
    params["password"] = "***"
    return psycopg2.extensions.make_dsn(**params)


def named_pool(label, name):
    """Return the pool declared in ZCML as *name*, or say which exist."""
    pool = queryUtility(IConnectionPool, name=name)
    if pool is None:
        names = sorted(n for n, _ in getUtilitiesFor(IConnectionPool))
        raise SettingsError(
            "%s: no pool named %r is declared (with <zpgpool:pool> in the"
            " site's ZCML); declared pools: %s"
            % (label, name, ", ".join(repr(n) for n in names) or "none"))
    return pool


# _lock protects _owned: key -> (settings, pool).
_lock = threading.Lock()
_owned = {}


def build_pool(label, name, settings):
    """Make (not open) the pool an adapter's *settings* describe.

    *settings* is a tuple of ``(option, value)`` pairs: ``dsn`` (as
    entered), ``isolation_level``, ``encoding``, ``minconn``, ``maxconn``,
    ``timeout`` and ``twophase``.  Bad values raise ``SettingsError``.
    """
    options = dict(settings)
    dsn = resolve_dsn(label, options.pop("dsn"))
    extra = {}
    encoding = options.pop("encoding")
    if encoding:
        extra["client_encoding"] = encoding
    level = options.pop("isolation_level")
    try:
        return ConnectionPool(
            dsn, name=name, isolation_level=level or None,
            connect_kwargs=extra, **options)
    except InvalidOption as e:
        raise SettingsError("%s: %s" % (label, e)) from None


def owned_pool(key, label, name, settings):
    """Return the owned pool under *key*, made for *settings*.

    When the pool under *key* was made for other settings it is closed
    and replaced: the adapter was edited (perhaps in another thread's
    view of it, which catches up at its next transaction).
    """
    with _lock:
        entry = _owned.get(key)
        if entry is not None and entry[0] == settings \
                and not entry[1].closed:
            return entry[1]
    # Building a pool connects to nothing, but it may read a file.
    pool = build_pool(label, name, settings)
    with _lock:
        entry = _owned.get(key)
        if entry is not None and entry[0] == settings \
                and not entry[1].closed:
            return entry[1]   # another thread was quicker
        _owned[key] = (settings, pool)
    if entry is not None:
        _close(entry[1], "its adapter's settings changed")
    return pool


def peek_owned(key):
    """Return the owned pool under *key* if there is one, else None."""
    with _lock:
        entry = _owned.get(key)
    return None if entry is None else entry[1]


def drop_owned(key, why):
    """Close and forget the owned pool under *key*, if any."""
    with _lock:
        entry = _owned.pop(key, None)
    if entry is not None:
        _close(entry[1], why)
        return True
    return False


def _close(pool, why):
    logger.info("zpgpool.zope: closing pool %r: %s", pool.name, why)
    # Connections still in use are closed when they come back; nothing
    # here waits for them (the caller may hold one itself).
    pool.close(timeout=0)
