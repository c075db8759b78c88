"""Replace a Products.ZPsycopgDA connection with a zpgpool one, in place,
and back.

The new object takes the old one's id in the same folder, so every ZSQL
Method that names it keeps working.  Its settings, title, local roles,
owner and permission settings are carried over.  Call the functions from
code that commits the transaction afterwards, for instance a script run
with ``zconsole run etc/zope.conf script.py``::

    import transaction
    from zpgpool.zope.migrate import replace_zpsycopgda
    replace_zpsycopgda(app.unrestrictedTraverse("/site"), "db")
    transaction.commit()
"""
from zpgpool.zope.connection import META_TYPE
from zpgpool.zope.connection import ZpgpoolConnection
from zpgpool.zope.pools import SettingsError


ZPSYCOPGDA_META_TYPE = "Z Psycopg 2 Database Connection"

# psycopg2's isolation level numbers, which ZPsycopgDA stores as tilevel.
# READ UNCOMMITTED (4) is run by PostgreSQL as READ COMMITTED.
_FROM_TILEVEL = {1: "READ COMMITTED", 2: "REPEATABLE READ",
                 3: "SERIALIZABLE", 4: "READ COMMITTED"}
_TO_TILEVEL = {"READ COMMITTED": 1, "REPEATABLE READ": 2, "SERIALIZABLE": 3}
# ZPsycopgDA's own default, for a zpgpool connection that leaves the
# level to the server.
_ZPSYCOPGDA_DEFAULT_TILEVEL = 2

# Attributes of an OFS object that hold its security settings: local
# roles, owner, and one "_<Permission>_Permission" per changed permission.
_SECURITY = ("__ac_local_roles__", "__ac_local_roles_block__", "_owner")


def settings_from_zpsycopgda(old):
    """Return the zpgpool settings matching the ZPsycopgDA connection
    *old*, as keyword arguments for ``ZpgpoolConnection``."""
    label = "ZPsycopgDA connection %r" % (old.getId(),)
    tilevel = getattr(old, "tilevel", _ZPSYCOPGDA_DEFAULT_TILEVEL)
    try:
        level = _FROM_TILEVEL[int(tilevel)]
    except (KeyError, TypeError, ValueError):
        raise SettingsError(
            "%s: its isolation level %r (tilevel) has no zpgpool"
            " equivalent: 0 is autocommit, and every zpgpool statement"
            " runs in the Zope transaction; allowed are 1 (read committed),"
            " 2 (repeatable read), 3 (serializable) and 4 (read"
            " uncommitted, run as read committed)" % (label, tilevel)
        ) from None
    return dict(
        title=old.title,
        connection_string=old.connection_string,
        isolation_level=level,
        encoding=(getattr(old, "encoding", "") or "").strip(),
        zdatetime=bool(getattr(old, "zdatetime", False)),
        # ZPsycopgDA connects whenever it is loaded from the ZODB.
        autoopen=True,
    )


def replace_zpsycopgda(container, id, **overrides):
    """Replace the ZPsycopgDA connection *id* in *container* with a
    zpgpool connection of the same id; return the new object.

    The connection string, isolation level, encoding and zdatetime are
    carried over; *overrides* are settings of ``ZpgpoolConnection``
    to use instead (``pool_name="main"`` for a pool declared in ZCML,
    say, with ``connection_string=""``).  Nothing connects; nothing is
    committed.  Raises ``SettingsError`` when *id* is not a ZPsycopgDA
    connection or its settings have no zpgpool equivalent, before
    anything is changed.
    """
    old = _get(container, id, ZPSYCOPGDA_META_TYPE)
    settings = settings_from_zpsycopgda(old)
    settings.update(overrides)
    new = ZpgpoolConnection(id, **settings)
    return _swap(container, id, old, new)


def restore_zpsycopgda(container, id, connection_string=None, **overrides):
    """Replace the zpgpool connection *id* in *container* with a
    Products.ZPsycopgDA connection of the same id; return the new object.

    The reverse of ``replace_zpsycopgda``.  A connection on a pool declared
    in ZCML, or whose connection string is a ``file:``, needs the
    *connection_string* ZPsycopgDA should use.  *overrides* go to
    ZPsycopgDA's ``Connection`` (``tilevel``, ``encoding``,
    ``zdatetime``).  Needs Products.ZPsycopgDA installed.
    """
    from Products.ZPsycopgDA.DA import Connection as ZPsycopgConnection
    old = _get(container, id, META_TYPE)
    label = "zpgpool connection %r" % (id,)
    if connection_string is None:
        connection_string = old.connection_string.strip()
        if old.pool_name:
            raise SettingsError(
                "%s uses the pool %r declared in ZCML, whose password"
                " zpgpool does not show; pass connection_string= for"
                " ZPsycopgDA" % (label, old.pool_name))
        if connection_string.startswith("file:"):
            raise SettingsError(
                "%s reads its connection string from a file (%r), which"
                " ZPsycopgDA cannot; pass connection_string= (ENV:NAME"
                " works)" % (label, connection_string))
        if connection_string[:4] in ("env:", "ENV:"):
            # ZPsycopgDA reads only ENV:NAME, taking the name as written;
            # zpgpool also allows blanks after the colon.
            connection_string = "ENV:" + connection_string[4:].strip()
    settings = dict(
        tilevel=_TO_TILEVEL.get(old.isolation_level,
                                _ZPSYCOPGDA_DEFAULT_TILEVEL),
        encoding=old.encoding or "UTF-8",
        zdatetime=old.zdatetime or None)
    settings.update(overrides)
    new = ZPsycopgConnection(id, old.title, connection_string,
                             settings.pop("zdatetime"), **settings)
    return _swap(container, id, old, new)


def _get(container, id, meta_type):
    old = container._getOb(id, None)
    if old is None:
        raise SettingsError("%r holds no object %r" % (
            "/".join(container.getPhysicalPath()) or "/", id))
    if getattr(old, "meta_type", None) != meta_type:
        raise SettingsError("%r in %r is a %r, not a %r" % (
            id, "/".join(container.getPhysicalPath()) or "/",
            getattr(old, "meta_type", type(old).__name__), meta_type))
    return old


def _swap(container, id, old, new):
    old._p_activate()   # a ghost's vars() are empty
    for name, value in vars(old).items():
        if name in _SECURITY or (name.startswith("_")
                                 and name.endswith("_Permission")):
            setattr(new, name, value)
    container._delObject(id)
    container._setObject(id, new, set_owner=False)
    return container._getOb(id)
