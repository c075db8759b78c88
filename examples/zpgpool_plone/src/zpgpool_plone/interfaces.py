from zope.interface import Interface


class IZpgpoolPloneLayer(Interface):
    """The add-on's browser layer: a request to a site where the add-on is
    installed provides it (profiles/default/browserlayer.xml), so the
    views and the subscriber act only in such sites."""
