"""zpgpool for Zope's ZSQL Methods: a database adapter on a zpgpool pool.

Include this package's ZCML in the site (``<include
package="zpgpool.zope" />``) to register the "Z zpgpool Database
Connection" product.  It needs Zope and Products.ZSQLMethods (the
``zope`` extra); nothing here is imported by the rest of zpgpool.
"""


def initialize(context):
    """Register the adapter class and its add form with Zope (called by
    ``<five:registerPackage>`` at start-up)."""
    from zpgpool.zope.connection import ADD_PERMISSION
    from zpgpool.zope.connection import ZpgpoolConnection
    from zpgpool.zope.connection import manage_addZpgpoolConnection
    from zpgpool.zope.connection import manage_addZpgpoolConnectionForm
    context.registerClass(
        ZpgpoolConnection,
        permission=ADD_PERMISSION,
        constructors=(manage_addZpgpoolConnectionForm,
                      manage_addZpgpoolConnection),
    )
