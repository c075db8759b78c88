"""What happens to an adapter's own pool when the adapter is copied or
deleted (registered in this package's configure.zcml)."""
from zpgpool.zope.pools import drop_owned
from zpgpool.zope.pools import new_key


def adapter_removed(connection, event):
    """Close the pool the deleted adapter owned.

    Should the deleting transaction abort, the adapter comes back and
    makes a new pool at its next query.
    """
    drop_owned(connection._pool_key, "its adapter was deleted")


def adapter_copied(connection, event):
    """Give the copy a key of its own, so that the copy and the original
    do not take turns replacing each other's pool."""
    connection._pool_key = new_key()
