"""What installing the add-on in a site does beyond its profile's XML."""
from persistent.mapping import PersistentMapping
from plone import api
from zope.annotation.interfaces import IAnnotations
from zope.component import getUtility

from zpgpool.interfaces import IConnectionPool

import zpgpool_plone

#: The site annotation that ``@@zpgpool-conflict`` makes ZODB conflicts on.
CONFLICTS = 'zpgpool_plone.conflicts'


def post_install(context):
    """Create the add-on's tables and its ZODB mapping.

    Installing runs in a transaction like any request (the Add-ons control
    panel's, or a zconsole script's), so the tables go through the pool's
    ``connection()`` and are created only if the installation commits.
    ``CREATE TABLE IF NOT EXISTS``: the tables are the database's, not the
    site's, and a second site or a reinstall finds them there.
    """
    cursor = getUtility(IConnectionPool, name=zpgpool_plone.POOL) \
        .connection().cursor()
    cursor.execute(zpgpool_plone.SCHEMA)
    annotations = IAnnotations(api.portal.get())
    if CONFLICTS not in annotations:
        annotations[CONFLICTS] = PersistentMapping()
