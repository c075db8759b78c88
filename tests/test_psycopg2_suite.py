"""psycopg2's own test suite, run on connections a zpgpool pool lends.

Code written for psycopg2 should not tell a pooled connection from its
own; and a connection handed from one of psycopg2's tests to the next
must not carry what the first left on it (a temporary table, LISTEN, a
typecaster, an encoding, a two-phase transaction), since psycopg2's tests
each expect a fresh connection. The source of the installed psycopg2
version comes from the package index (pip download), as scripts/test
installs everything else; psycopg2_suite.py runs it in a process of its
own.
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest

import psycopg2
import psycopg2.extensions

from zpgpool.testing import POSTGRES_LAYER

from .poolhelpers import query
from .support import python_env


# psycopg2's test modules run here: all of them but replication (which
# needs a replication setup of its own and skips without one) and
# test_async, whose asynchronous connections a pool does not lend.
# (test_green's check that a large query blocks on write depends on the
# load; psycopg2_suite.py keeps the warning it gives a warning.)
MODULES = [
    "test_bugX000", "test_bug_gc",
    "test_cancel", "test_connection", "test_copy", "test_cursor",
    "test_dates", "test_errcodes", "test_errors", "test_extras_dictcursor",
    "test_fast_executemany", "test_green", "test_ipaddress", "test_lobject",
    "test_module", "test_notify", "test_psycopg2_dbapi20", "test_quote",
    "test_sql", "test_transaction", "test_types_basic", "test_types_extras",
    "test_with",
]

# Where a pooled connection behaves otherwise, on purpose (README, "The
# next borrower gets a clean connection"), and the test that notices.
EXPECTED_FAILURES = {
    "tests.test_connection.ConnectionTests.test_cursor_factory_none":
        "type(cur) is a subclass of psycopg2's cursor, which notes the "
        "statements that change the session",
}

DATABASE = "psycopg2_test"


def download_psycopg2_source(directory):
    """The installed psycopg2 version's source, unpacked in ``directory``."""
    version = psycopg2.__version__.split()[0]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--no-binary", ":all:", "--dest", directory,
         "psycopg2==%s" % version],
        capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise AssertionError(
            "cannot download psycopg2 %s's source from the package index, "
            "which this test runs psycopg2's own tests from: %s"
            % (version, done.stderr.strip()[-2000:]))
    archive = os.path.join(directory, "psycopg2-%s.tar.gz" % version)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(directory, filter="data")
        else:   # Python before 3.11.4
            tar.extractall(directory)
    return os.path.join(directory, "psycopg2-%s" % version)


class Psycopg2SuiteTests(unittest.TestCase):

    layer = POSTGRES_LAYER

    def test_psycopg2_s_tests_pass_on_pooled_connections(self):
        work = tempfile.mkdtemp(prefix="zpgpool-psycopg2-suite-")
        self.addCleanup(subprocess.run, ["rm", "-rf", work])
        source = download_psycopg2_source(work)
        query(self.layer.dsn, "DROP DATABASE IF EXISTS %s" % DATABASE)
        query(self.layer.dsn, "CREATE DATABASE %s" % DATABASE)
        self.addCleanup(query, self.layer.dsn,
                        "DROP DATABASE %s WITH (FORCE)" % DATABASE)
        params = psycopg2.extensions.parse_dsn(self.layer.dsn)
        env = python_env(PSYCOPG2_TESTDB=DATABASE,
                         PSYCOPG2_TESTDB_HOST=params["host"],
                         PSYCOPG2_TESTDB_PORT=params["port"],
                         PSYCOPG2_TESTDB_USER=params["user"],
                         PSYCOPG2_TESTDB_PASSWORD=params.get("password", ""))
        env.pop("PSYCOPG2_TEST_REPL_DSN", None)
        # Not measured by coverage: its warnings in the Python processes
        # psycopg2's tests start would fail the tests that expect those to
        # print nothing.
        for name in list(env):
            if name.startswith("COVERAGE_"):
                del env[name]
        result_file = os.path.join(work, "result.json")
        runner = os.path.join(os.path.dirname(__file__), "psycopg2_suite.py")
        done = subprocess.run(
            [sys.executable, runner, source, result_file] + MODULES,
            env=env, cwd=work, capture_output=True, text=True, timeout=900)
        self.assertTrue(os.path.exists(result_file),
                        "psycopg2's suite did not finish: %s\n%s"
                        % (done.stdout[-3000:], done.stderr[-3000:]))
        with open(result_file) as f:
            result = json.load(f)
        failed = sorted(result["failed"] + result["errors"])
        # What psycopg2's runner printed about the first of them.
        report = done.stdout[done.stdout.find("=" * 70):][:6000]
        self.assertEqual(sorted(set(failed) - set(EXPECTED_FAILURES)), [],
                         report)
        # Each difference documented is still one (else: update README).
        self.assertEqual(failed, sorted(EXPECTED_FAILURES))
        # Every connection went back without an error, and none is left.
        self.assertEqual(result["return_errors"], {})
        self.assertEqual(result["never_returned"], [])
        self.assertGreater(result["ran"], 600)
        # The suite really ran on the pool, and most of its tests got a
        # connection an earlier test had used.
        self.assertGreater(result["counts"]["pooled"], 900)
        self.assertGreater(result["counts"]["handed_over"], 800)
        self.assertEqual(result["in_use_at_end"], 0)
