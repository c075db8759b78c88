"""Mirror the site's content into PostgreSQL, in the same transaction.

A handler of ``IObjectAddedEvent`` runs inside the transaction that adds
the item, so its row commits with the item or not at all: when the request
fails, PostgreSQL's part is rolled back with ZODB's.
"""
from plone.browserlayer.utils import registered_layers
from zope.component import getUtility

from zpgpool.interfaces import IConnectionPool

import zpgpool_plone
from zpgpool_plone.interfaces import IZpgpoolPloneLayer


def _installed():
    # Subscribers are global: they run in every site of the process.  The
    # layer registered in the current site's component registry says
    # whether the add-on is installed there, also where no request carries
    # the layer (a zconsole script that called setSite).
    return IZpgpoolPloneLayer in registered_layers()


def _cursor():
    return getUtility(IConnectionPool, name=zpgpool_plone.POOL) \
        .connection().cursor()


def content_added(obj, event):
    if not _installed():
        return
    _cursor().execute(
        'INSERT INTO zpgpool_plone_content (uid, path, title)'
        ' VALUES (%s, %s, %s)',
        (obj.UID(), '/'.join(obj.getPhysicalPath()), obj.Title()))


def content_removed(obj, event):
    if not _installed():
        return
    _cursor().execute('DELETE FROM zpgpool_plone_content WHERE uid = %s',
                      (obj.UID(),))
