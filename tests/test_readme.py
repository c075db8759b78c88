"""README.rst is a doctest: the examples users copy are known to work."""
import doctest
import os

import transaction
import zope.component.testing

from zpgpool.testing import POSTGRES_LAYER


README = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "README.rst")


def setUp(test):
    zope.component.testing.setUp(test)
    # The README's pool reads its DSN from APP_DSN: point it at a fresh
    # database of the test server, so that the README's table is new.
    test.globs["_saved_APP_DSN"] = os.environ.get("APP_DSN")
    os.environ["APP_DSN"] = POSTGRES_LAYER.new_database("zpgpool_readme")


def tearDown(test):
    from zpgpool.zcml import close_registered_pools
    transaction.abort()
    close_registered_pools()
    zope.component.testing.tearDown(test)
    saved = test.globs["_saved_APP_DSN"]
    if saved is None:
        os.environ.pop("APP_DSN", None)
    else:
        os.environ["APP_DSN"] = saved


def test_suite():
    suite = doctest.DocFileSuite(
        README, module_relative=False, setUp=setUp, tearDown=tearDown,
        encoding="utf-8",
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    suite.layer = POSTGRES_LAYER
    return suite
