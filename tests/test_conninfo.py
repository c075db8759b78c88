"""Tests for conninfo.py: a DSN parsed once, masked, and its limits."""
import unittest

from zpgpool.conninfo import ConnInfo
from zpgpool.conninfo import mask_dsn


class ConnInfoTests(unittest.TestCase):

    def test_mask_dsn(self):
        self.assertEqual(mask_dsn("host=db password=s3cret user=app"),
                         "host=db password=*** user=app")
        self.assertEqual(mask_dsn("host=db sslpassword='a b'"),
                         "host=db sslpassword=***")
        self.assertEqual(mask_dsn("host=db password"), "<unparsable dsn>")

    def test_connect_limit(self):
        made = ConnInfo("zpgpool pool 't'", "host=db connect_timeout=5", {},
                        10, "zpgpool:t")
        self.assertEqual(made.connect_limit, 6.0)
        # libpq counts less than 2 s as 2.
        made = ConnInfo("zpgpool pool 't'", "host=db connect_timeout=1", {},
                        10, "zpgpool:t")
        self.assertEqual(made.connect_limit, 3.0)
        # Not a number: libpq will say so at the first connect; until then
        # one connect may take up to the fallback 30 s.
        made = ConnInfo("zpgpool pool 't'", "host=db connect_timeout=soon",
                        {}, 10, "zpgpool:t")
        self.assertEqual(made.connect_limit, 30.0)
        self.assertIn("connect_timeout=soon", made.conninfo)
        self.assertEqual(made.target,
                         "host=db port=(default) dbname=(default) "
                         "user=(default)")
