"""The database adapter: a ZODB object ZSQL Methods select by id.

``ZpgpoolConnection`` is a ``Shared.DC.ZRDB.Connection.Connection``, so
that the ZSQL Method add form, ``SQLConnectionIDs`` and everything else
that looks for "an SQL connection" finds it.  Its ``__call__`` returns a
``zpgpool.zope.db.DB`` over its pool, which is either a pool declared in
ZCML (the adapter keeps only its name) or a pool of its own, made from a
connection string (see ``zpgpool.zope.pools``).

Unlike other adapters it has no transaction code and no connection of
its own: the pool's ``connection()`` joins the Zope transaction, commits
in the vote, and keeps one connection per worker thread.
"""
import logging

from AccessControl.class_init import InitializeClass
from AccessControl.Permissions import change_database_connections
from AccessControl.Permissions import open_close_database_connection
from AccessControl.Permissions import use_database_methods
from AccessControl.Permissions import view_management_screens
from AccessControl.SecurityInfo import ClassSecurityInfo
from OFS.SimpleItem import Item
from Persistence import Persistent
from Products.PageTemplates.PageTemplateFile import PageTemplateFile
from Shared.DC.ZRDB.Connection import Connection
from zExceptions import BadRequest
from zope.interface import Interface
from zope.interface import implementer

from zpgpool.zope.db import DB
from zpgpool.zope.pools import ISOLATION_LEVELS
from zpgpool.zope.pools import SettingsError
from zpgpool.zope.pools import build_pool
from zpgpool.zope.pools import drop_owned
from zpgpool.zope.pools import masked
from zpgpool.zope.pools import named_pool
from zpgpool.zope.pools import new_key
from zpgpool.zope.pools import owned_pool
from zpgpool.zope.pools import peek_owned


logger = logging.getLogger("zpgpool")

META_TYPE = "Z zpgpool Database Connection"

#: The permission to add adapters (Manager by default).
ADD_PERMISSION = "Add zpgpool Database Connections"


class IZpgpoolConnection(Interface):
    """A zpgpool database adapter in the ZODB (marker for the event
    subscribers that close its own pool when it is deleted)."""


def _flag(value):
    # A ZMI checkbox sends "on"/"yes" when ticked and nothing otherwise;
    # Python callers pass booleans.
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "no", "off", "false")
    return bool(value)


def _isolation(label, value):
    level = " ".join(str(value or "").replace("_", " ").split()).upper()
    if level not in ISOLATION_LEVELS:
        raise SettingsError(
            "%s: isolation_level must be one of %s, or empty for the"
            " server's default; got %r" % (
                label, ", ".join(repr(x) for x in ISOLATION_LEVELS if x),
                value))
    return level


def _number(label, option, value, kind, least):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < least or number != number:
        raise SettingsError(
            "%s: %s must be a number, %s or more; got %r"
            % (label, option, least, value))
    return number


@implementer(IZpgpoolConnection)
class ZpgpoolConnection(Connection):
    """A Zope database adapter whose queries run on a zpgpool pool."""

    _isAnSQLConnection = True
    database_type = "PostgreSQL (zpgpool)"
    meta_type = META_TYPE
    zmi_icon = "fas fa-database"
    security = ClassSecurityInfo()

    # The base class connects while the object is loaded; this one only
    # opens the pool there, and only when ``autoopen`` asks for it.
    connect_on_load = False

    # Settings, with their defaults.  ``connection_string`` may hold a
    # password: it is private, and no page shows it unmasked.
    pool_name = ""
    connection_string = ""
    isolation_level = ""
    encoding = ""
    zdatetime = True
    autoopen = True
    maxconn = 10
    timeout = 30.0
    twophase = False
    _pool_key = None

    security.declarePrivate("connection_string")  # NOQA: D001

    manage_options = (
        Connection.manage_options[:3]
        + ({"label": "Browse", "action": "manage_browse"},)
        + Connection.manage_options[3:])

    def __init__(self, id, title="", connection_string="", pool_name="",
                 isolation_level="", encoding="", zdatetime=True,
                 autoopen=True, maxconn=10, timeout=30.0, twophase=False,
                 check=False):
        self.id = str(id)
        self._pool_key = new_key()
        self.edit(title, connection_string=connection_string,
                  pool_name=pool_name, isolation_level=isolation_level,
                  encoding=encoding, zdatetime=zdatetime, autoopen=autoopen,
                  maxconn=maxconn, timeout=timeout, twophase=twophase,
                  check=check)

    def __setstate__(self, state):
        Persistent.__setstate__(self, state)
        if self.autoopen:
            try:
                self._pool().open()
            except Exception:
                logger.error("%s: cannot open its pool", self._label(),
                             exc_info=True)

    def _path(self):
        try:
            return "/".join(self.getPhysicalPath()) or self.id
        except Exception:   # not in a container yet
            return self.id

    def _label(self):
        return "zpgpool database connection %r" % self._path()

    # -- settings -------------------------------------------------------

    @security.protected(change_database_connections)
    def edit(self, title, connection_string="", pool_name="",
             isolation_level="", encoding="", zdatetime=True, autoopen=True,
             maxconn=10, timeout=30.0, twophase=False, check=False):
        """Change the settings; with *check*, open the pool and run a
        statement to show that it works.

        Give either *pool_name* (a pool declared in ZCML, whose own
        options then apply) or *connection_string* (a libpq connection
        string, ``env:NAME``, ``ENV:NAME`` or ``file:PATH``) for a pool of
        the adapter's own, with *isolation_level*, *encoding*, *maxconn*,
        *timeout* and *twophase*.  Raises ``SettingsError`` for a bad
        value, leaving the settings as they were.
        """
        label = self._label()
        pool_name = (pool_name or "").strip()
        connection_string = connection_string or ""
        if bool(pool_name) == bool(connection_string.strip()):
            raise SettingsError(
                "%s: give either the name of a pool declared in ZCML or a"
                " connection string, not %s" % (
                    label, "both" if pool_name else "neither"))
        settings = dict(
            isolation_level=_isolation(label, isolation_level),
            encoding=(encoding or "").strip(),
            maxconn=_number(label, "maxconn", maxconn, int, 1),
            timeout=_number(label, "timeout", timeout, float, 0),
            twophase=_flag(twophase))
        if pool_name:
            named_pool(label, pool_name)
        else:
            # Made only to check the values; it connects to nothing.
            build_pool(label, "check", self._settings_for(
                connection_string, dict(settings, minconn=0)))
        self.title = title
        self.pool_name = pool_name
        self.connection_string = "" if pool_name else connection_string
        for option, value in settings.items():
            setattr(self, option, value)
        self.zdatetime = _flag(zdatetime)
        self.autoopen = _flag(autoopen)
        if pool_name:
            # The pool the adapter owned, if any, is no longer used.
            drop_owned(self._pool_key, "its adapter now uses the pool %r"
                       % pool_name)
        elif peek_owned(self._pool_key) is not None:
            # Replace (and close) the pool made for the old settings now,
            # not at the next query.
            self._pool()
        if check:
            self.connect()

    @staticmethod
    def _settings_for(connection_string, settings):
        return tuple(sorted(dict(settings, dsn=connection_string).items()))

    def _settings(self):
        # With autoopen the pool keeps a connection open from the start,
        # as ZPsycopgDA connected when it was loaded.
        return self._settings_for(self.connection_string, dict(
            isolation_level=self.isolation_level, encoding=self.encoding,
            maxconn=self.maxconn, timeout=self.timeout,
            twophase=self.twophase, minconn=1 if self.autoopen else 0))

    def _pool(self):
        """Return the pool: the named one, or the adapter's own."""
        if self.pool_name:
            return named_pool(self._label(), self.pool_name)
        if not self.connection_string:
            raise SettingsError("%s has neither a pool name nor a connection"
                                " string" % self._label())
        # Named by id and key, not by path: an adapter loaded from the ZODB
        # (where autoopen makes its pool) does not know its path yet.
        return owned_pool(self._pool_key, self._label(), "zsql:%s:%s" % (
            self.id, self._pool_key[:8]), self._settings())

    @security.protected(view_management_screens)
    def owns_pool(self):
        """Tell whether the adapter has a pool of its own (made from its
        connection string) rather than one declared in ZCML."""
        return not self.pool_name

    @security.protected(view_management_screens)
    def shown_connection_string(self):
        """Return the connection string fit to show: ``env:``/``file:``
        as entered, otherwise with the password masked."""
        return masked(self.connection_string)

    @security.protected(view_management_screens)
    def pool_dsn(self):
        """Return the pool's connection string, password masked."""
        try:
            return self._pool().dsn
        except SettingsError as e:
            return str(e)

    @security.protected(view_management_screens)
    def pool_stats(self):
        """Return the pool's ``stats()`` as sorted (name, value) pairs, or
        an empty list when the adapter's own pool is not made yet."""
        pool = self._current_pool()
        return sorted(pool.stats().items()) if pool is not None else []

    def _current_pool(self):
        # The pool if it exists, without making one.
        if self.pool_name:
            try:
                return named_pool(self._label(), self.pool_name)
            except SettingsError:
                return None
        return peek_owned(self._pool_key)

    # -- what ZRDB calls ------------------------------------------------

    @security.protected(use_database_methods)
    def __call__(self, v=None):
        # The DB object ZSQL Methods run their queries on.  (No docstring:
        # it is not for publishing.)
        return DB(self._pool(), self.zdatetime)

    def connected(self):
        # Whether the pool is there and open.  (No docstring: not
        # published, as in the base class.)
        pool = self._current_pool()
        return pool is not None and not pool.closed

    def title_and_id(self):
        # The ZSQL Method add form lists connections by this.
        return "%s, %s" % (Item.title_and_id(self), "connected"
                           if self.connected() else "not connected")

    def title_or_id(self):
        return self.title or self.id

    @security.protected(open_close_database_connection)
    def connect(self, s=None):
        """Open the pool and check it with a round trip outside any
        transaction; raise what connecting raised."""
        pool = self._pool()
        pool.open()
        with pool.checkout() as conn:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        return self

    # -- the ZMI --------------------------------------------------------

    security.declareProtected(view_management_screens,  # NOQA: D001
                              "manage_main")
    manage_main = PageTemplateFile("www/status.pt", globals(),
                                 __name__="manage_main")

    security.declareProtected(change_database_connections,  # NOQA: D001
                              "manage_properties")
    manage_properties = PageTemplateFile("www/properties.pt", globals(),
                                 __name__="manage_properties")

    security.declareProtected(view_management_screens,  # NOQA: D001
                              "manage_browse")
    manage_browse = PageTemplateFile("www/browse.pt", globals(),
                                 __name__="manage_browse")

    @security.protected(view_management_screens)
    def browse_tables(self):
        """Return the tables and views with their columns, for Browse."""
        db = self()
        return [dict(table, columns=db.columns(table["table_name"],
                                               table["table_schema"]))
                for table in db.tables()]

    @security.protected(change_database_connections)
    def manage_edit(self, title="", connection_string="", pool_name="",
                    isolation_level="", encoding="", zdatetime=False,
                    autoopen=False, maxconn=10, timeout=30.0,
                    twophase=False, check=False, REQUEST=None):
        """Change the settings from the Properties form."""
        # The form shows a password as ***: the string shown coming back
        # unchanged means the one stored.
        if connection_string and \
                connection_string == masked(self.connection_string):
            connection_string = self.connection_string
        try:
            self.edit(title, connection_string=connection_string,
                      pool_name=pool_name, isolation_level=isolation_level,
                      encoding=encoding, zdatetime=zdatetime,
                      autoopen=autoopen, maxconn=maxconn, timeout=timeout,
                      twophase=twophase, check=check)
        except SettingsError as e:
            if REQUEST is None:
                raise
            return self.manage_properties(message=str(e), error=True)
        if REQUEST is not None:
            return self.manage_properties(message="Saved.")

    @security.protected(open_close_database_connection)
    def manage_open_connection(self, REQUEST=None):
        """Open the pool and check it (Status tab)."""
        try:
            self.connect()
        except Exception as e:
            logger.warning("%s: cannot open its pool: %s", self._label(), e)
            message, error = "Cannot connect: %s" % _shown_error(e), True
        else:
            message, error = "The pool is open.", False
        if REQUEST is not None:
            return self.manage_main(message=message, error=error)

    @security.protected(open_close_database_connection)
    def manage_close_connection(self, REQUEST=None):
        """Close the adapter's own pool (Status tab); the next query makes
        a new one.  A pool declared in ZCML is shared and is not closed
        here."""
        if self.pool_name:
            message, error = (
                "The pool %r is declared in ZCML and may be shared; it"
                " closes when Zope stops." % self.pool_name, True)
        elif drop_owned(self._pool_key, "closed from the ZMI"):
            message, error = "The pool is closed.", False
        else:
            message, error = "The pool was not open.", False
        if REQUEST is not None:
            return self.manage_main(message=message, error=error)


def _shown_error(exc):
    # zpgpool's and libpq's messages carry no password.
    return " ".join(str(exc).split()) or type(exc).__name__


InitializeClass(ZpgpoolConnection)


# Zope publishes an add form under its __name__.
manage_addZpgpoolConnectionForm = PageTemplateFile(
    "www/add.pt", globals(), __name__="manage_addZpgpoolConnectionForm")


def manage_addZpgpoolConnection(self, id, title="", connection_string="",
                                pool_name="", isolation_level="",
                                encoding="", zdatetime=True, autoopen=True,
                                maxconn=10, timeout=30.0, twophase=False,
                                check=False, REQUEST=None):
    """Add a zpgpool database connection to the folder *self*.

    Give *pool_name* (a pool declared in ZCML) or *connection_string*; see
    ``ZpgpoolConnection.edit`` for the other settings.  With *check*, the
    pool is opened and tried at once.  Returns the new object's id.
    """
    try:
        connection = ZpgpoolConnection(
            id, title, connection_string=connection_string,
            pool_name=pool_name, isolation_level=isolation_level,
            encoding=encoding, zdatetime=zdatetime, autoopen=autoopen,
            maxconn=maxconn, timeout=timeout, twophase=twophase)
    except SettingsError as e:
        if REQUEST is None:
            raise
        # The add form's user gets the reason, as a 400 page.
        raise BadRequest(str(e)) from None
    id = self._setObject(id, connection)
    if _flag(check):
        self._getOb(id).connect()
    if REQUEST is not None:
        return self.manage_main(self, REQUEST, update_menu=1)
    return id
