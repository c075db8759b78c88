"""``PgBouncer``: a throwaway PgBouncer in front of a PostgreSQL server.

It runs the system's ``pgbouncer`` program (Debian's package ``pgbouncer``)
in a temporary directory, as the server's system user when we are root
(PgBouncer, like PostgreSQL, refuses to run as root).
"""
import os
import re
import shutil
import signal
import subprocess
import time

from zpgpool.testing.errors import PgBouncerError
from zpgpool.testing.errors import PgBouncerUnavailable
from zpgpool.testing.program import _Program
from zpgpool.testing.support import _execute
from zpgpool.testing.support import _port_in_use
from zpgpool.testing.support import make_dsn

#: Environment variable with the path of the ``pgbouncer`` program to run.
PGBOUNCER_ENV = 'ZPGPOOL_PGBOUNCER'

# Where packagers put the program; root's PATH has /usr/sbin, a user's
# often has not.
_PGBOUNCER_FOLDERS = ('/usr/sbin', '/usr/bin', '/usr/local/sbin',
                      '/usr/local/bin', '/opt/homebrew/bin')

_PGBOUNCER_HINT = (
    'Install PgBouncer, for example with "apt-get install pgbouncer" on '
    'Debian or Ubuntu, "dnf install pgbouncer" on Fedora or Red Hat, or '
    '"brew install pgbouncer" on macOS; or set %s to the path of the '
    'pgbouncer program.' % PGBOUNCER_ENV)

POOL_MODES = ('session', 'transaction', 'statement')

_SETTING_NAME = re.compile(r'^[a-z_][a-z0-9_]*$')


def _is_program(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_pgbouncer(path=None):
    """Return the path of the ``pgbouncer`` program to run.

    *path*, when given, must be that program; otherwise
    ``ZPGPOOL_PGBOUNCER`` names it, or else it is looked for on ``PATH``
    and in the usual folders.  Raise ``PgBouncerUnavailable``, naming what
    was looked at and how to install PgBouncer, when there is none.
    """
    source = 'given'
    if not path:
        path = os.environ.get(PGBOUNCER_ENV, '').strip()
        source = 'named by %s' % PGBOUNCER_ENV
    if path:
        if _is_program(path):
            return os.path.abspath(path)
        raise PgBouncerUnavailable(
            'The pgbouncer program %s (%s) does not exist or is not '
            'executable. %s' % (path, source, _PGBOUNCER_HINT))
    found = shutil.which('pgbouncer')
    if found:
        return found
    for folder in _PGBOUNCER_FOLDERS:
        candidate = os.path.join(folder, 'pgbouncer')
        if _is_program(candidate):
            return candidate
    raise PgBouncerUnavailable(
        'No pgbouncer program was found on PATH nor in %s. %s'
        % (', '.join(_PGBOUNCER_FOLDERS), _PGBOUNCER_HINT))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError('PgBouncer: %s must be a whole number of at least '
                         '1, not %r' % (name, value))
    return value


def _ini_value(value):
    if isinstance(value, bool):
        return '1' if value else '0'
    value = str(value)
    if '\n' in value or '\r' in value:
        raise ValueError('PgBouncer: a setting cannot span lines: %r'
                         % (value,))
    return value


class PgBouncer(_Program):
    """A private PgBouncer in a temporary directory, in front of *target*.

    *target* is the PostgreSQL server PgBouncer connects to: a
    ``PostgresServer``, or a libpq DSN naming host, port, user and password.
    Every database of the server is reachable through PgBouncer by its
    name; clients log in with the target's user and password, which
    PgBouncer also uses towards the server (``auth_type`` is
    ``scram-sha-256``, the password is in PgBouncer's ``auth_file``).

    ``start()`` runs PgBouncer on a free port of 127.0.0.1 (*port* picks
    one) and on a unix socket in its temporary directory, and returns when
    it accepts connections.  ``dsn()`` and ``socket_dsn()`` are DSNs of a
    database through PgBouncer; ``admin()`` runs a command on its admin
    console (``SHOW POOLS``, ``PAUSE``, ``RECONNECT``, ...), whose DSN is
    ``admin_dsn()``.  ``stop()`` and ``start()`` keep the port;
    ``cleanup()`` stops PgBouncer and removes its directory, also when the
    process exits.  Should the process die without cleaning up, even by
    SIGKILL, a watchdog process stops PgBouncer and removes the directory.

    *pool_mode* is ``'transaction'`` (the default), ``'session'`` or
    ``'statement'``; *default_pool_size* is the number of server
    connections per database and user, *max_client_conn* the number of
    clients PgBouncer accepts.  *settings* are further ``[pgbouncer]``
    settings of pgbouncer.ini, which replace this class's.  *binary* is the
    ``pgbouncer`` program (default: ``find_pgbouncer()``); when it is
    missing, the constructor raises ``PgBouncerUnavailable``.
    """

    def __init__(self, target, pool_mode='transaction', default_pool_size=20,
                 max_client_conn=100, settings=None, binary=None, port=None,
                 os_user=None):
        if pool_mode not in POOL_MODES:
            raise ValueError('PgBouncer: pool_mode must be one of %s, not %r'
                             % (', '.join(POOL_MODES), pool_mode))
        self.pool_mode = pool_mode
        self.default_pool_size = _positive_int('default_pool_size',
                                               default_pool_size)
        self.max_client_conn = _positive_int('max_client_conn',
                                             max_client_conn)
        self.settings = {}
        for name, value in (settings or {}).items():
            if not _SETTING_NAME.match(name):
                raise ValueError('PgBouncer: %r is not a pgbouncer.ini '
                                 'setting name' % (name,))
            self.settings[name] = _ini_value(value)
        self.binary = find_pgbouncer(binary)
        self._target = target
        self._proc = None
        super().__init__(port, os_user)

    def __repr__(self):
        return '<%s port=%s %s %s>' % (
            self.__class__.__name__, self.port, self.pool_mode,
            'running' if self.is_running() else 'stopped')

    # -- what it connects to ---------------------------------------------

    def _target_params(self):
        """Return host, port, user and password of the target server."""
        target = self._target
        if not isinstance(target, str):
            target = target.dsn()
        import psycopg2.extensions
        params = psycopg2.extensions.parse_dsn(target)
        return {'host': params.get('host') or '127.0.0.1',
                'port': int(params.get('port') or 5432),
                'user': params.get('user') or 'postgres',
                'password': params.get('password') or ''}

    @property
    def version(self):
        """PgBouncer's version, such as ``'1.18.0'``."""
        if self._version is None:
            out = subprocess.run(
                [self.binary, '--version'], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, timeout=60,
                check=False).stdout
            match = re.search(r'PgBouncer\s+(\d+(?:\.\d+)*)', out)
            if match is None:
                raise PgBouncerUnavailable(
                    '%s does not look like PgBouncer; "--version" said: %s'
                    % (self.binary, out.strip()))
            self._version = match.group(1)
        return self._version

    @property
    def _stop_signal(self):
        # PgBouncer 1.23 made SIGTERM wait for the clients and SIGQUIT the
        # immediate shutdown that SIGTERM was before.
        version = tuple(int(n) for n in self.version.split('.')[:2])
        return signal.SIGQUIT if version >= (1, 23) else signal.SIGTERM

    # -- DSNs -------------------------------------------------------------

    def dsn(self, dbname='postgres', **overrides):
        """Return a DSN of database *dbname* through PgBouncer, over TCP.

        *overrides* add or replace parameters (None removes one).
        """
        target = self._target_params()
        params = {'host': self.host, 'port': self.port,
                  'user': target['user'], 'password': target['password'],
                  'dbname': dbname}
        params.update(overrides)
        return make_dsn(**params)

    def socket_dsn(self, dbname='postgres', **overrides):
        """Return a DSN of database *dbname* through PgBouncer's unix
        socket."""
        return self.dsn(dbname, host=self.socket_dir, **overrides)

    def admin_dsn(self, **overrides):
        """Return a DSN of PgBouncer's admin console."""
        return self.dsn('pgbouncer', **overrides)

    def admin(self, command):
        """Run *command* on the admin console; return its rows, or None."""
        return _execute(self.admin_dsn(), command)

    def show_pool(self, dbname='postgres', user=None):
        """Return PgBouncer's ``SHOW POOLS`` row for *dbname* (and *user*:
        PgBouncer keeps a pool per database and user; by default the
        first) as a dict of its columns (``cl_active``, ``cl_waiting``,
        ``sv_idle``, ``pool_mode``, ...), or None while it has none."""
        for row in _execute(self.admin_dsn(), 'SHOW POOLS', named=True):
            if row['database'] == dbname and user in (None, row['user']):
                return row
        return None

    # -- files ------------------------------------------------------------

    def _write(self, name, text, mode=0o600):
        path = os.path.join(self.base_dir, name)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        os.chmod(path, mode)
        self._give_to_user(path)
        return path

    def _make_base_dir(self):
        self._make_dirs('zpgpool-pgbouncer-', 'pgbouncer.log',
                        'pgbouncer.pid', 'pgbouncer', self._stop_signal)

    def _write_config(self):
        target = self._target_params()
        userlist = self._write('userlist.txt', '"%s" "%s"\n' % (
            target['user'].replace('"', '""'),
            target['password'].replace('"', '""')))
        settings = {
            'listen_addr': self.host,
            'listen_port': self.port,
            'unix_socket_dir': self.socket_dir,
            'pidfile': os.path.join(self.base_dir, 'pgbouncer.pid'),
            'auth_type': 'scram-sha-256',
            'auth_file': userlist,
            'admin_users': target['user'],
            'stats_users': target['user'],
            'pool_mode': self.pool_mode,
            'default_pool_size': self.default_pool_size,
            'max_client_conn': self.max_client_conn,
            # psycopg2 sends none of these, other drivers do.
            'ignore_startup_parameters': 'extra_float_digits',
            'server_login_retry': 1,
        }
        settings.update(self.settings)
        lines = ['; Written by zpgpool.testing at every start.',
                 '[databases]',
                 '* = %s' % make_dsn(host=target['host'],
                                     port=target['port']),
                 '[pgbouncer]']
        lines.extend('%s = %s' % (name, _ini_value(value))
                     for name, value in settings.items())
        return self._write('pgbouncer.ini', '\n'.join(lines) + '\n')

    # -- life cycle -------------------------------------------------------

    def _spawn(self, ini):
        kwargs = {}
        if self._os_user is not None:
            kwargs.update(self._os_user.subprocess_kwargs())
        with open(self.log_file, 'ab') as log:
            return subprocess.Popen(
                [self.binary, ini], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.base_dir,
                start_new_session=True, **kwargs)

    def _log_since(self, offset):
        try:
            with open(self.log_file, 'rb') as f:
                f.seek(offset)
                return f.read().decode('utf-8', 'replace')
        except OSError:  # pragma: no cover (removed under our feet)
            return ''

    def _answers(self):
        """Tell whether PgBouncer answers on its TCP port.  A mere TCP
        connect would not do: another program may hold the port, and
        PgBouncer runs on with its unix socket only."""
        import psycopg2
        try:
            _execute(self.admin_dsn(connect_timeout=2), 'SHOW VERSION')
        except psycopg2.Error:
            return False
        return True

    def start(self, timeout=60):
        """Start PgBouncer, and wait until it accepts connections.

        Starting it while it runs does nothing.  Return it.
        """
        if self.is_running():
            return self
        if self.base_dir is None:
            self._make_base_dir()
        attempts = 0
        while True:
            attempts += 1
            self._choose_port()
            offset = (os.path.getsize(self.log_file)
                      if os.path.exists(self.log_file) else 0)
            self._proc = self._spawn(self._write_config())
            cannot_listen = 'cannot listen on %s:%s' % (self.host, self.port)
            deadline = time.monotonic() + timeout
            while (self._proc.poll() is None
                   and cannot_listen not in self._log_since(offset)
                   and time.monotonic() < deadline):
                if self._answers():
                    self._fixed_port = True
                    return self
                time.sleep(0.02)
            status = self._proc.poll()
            self._kill()
            if self._try_another_port(attempts):
                continue
            # Say what happened: most failures show at once, not at the
            # time-out.
            if status is not None:
                why = 'it exited with status %s' % status
            elif cannot_listen in self._log_since(offset):
                why = 'it cannot listen there'
            else:
                why = 'no answer within %s seconds' % timeout
            if _port_in_use(self.port, self.host):
                why += ': another program holds the port'
            raise PgBouncerError(
                'PgBouncer (%s) did not start on %s:%s: %s. '
                'End of its log %s:\n%s' % (
                    self.binary, self.host, self.port, why,
                    self.log_file, self.log_tail()))

    def _kill(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()

    def is_running(self):
        """Tell whether PgBouncer runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout=10):
        """Stop PgBouncer at once, closing every client and server
        connection; keep the port for a later ``start()``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(self._stop_signal)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def cleanup(self):
        """Stop PgBouncer and remove its directory.  Never raises for one
        that is gone already."""
        if self.base_dir is None:
            return
        try:
            self.stop()
        finally:
            self._kill()
            self._proc = None
            self._remove_dirs()
