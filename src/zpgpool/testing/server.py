"""``PostgresServer``: a throwaway PostgreSQL server in a temporary
directory."""
import itertools
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time

from zpgpool.testing.asuser import _needs_copy
from zpgpool.testing.asuser import _staged
from zpgpool.testing.binaries import _has_server_binaries
from zpgpool.testing.binaries import find_bindir
from zpgpool.testing.binaries import server_version
from zpgpool.testing.errors import PostgresServerError
from zpgpool.testing.errors import PostgresUnavailable
from zpgpool.testing.program import _Program
from zpgpool.testing.support import _conf_value
from zpgpool.testing.support import _execute
from zpgpool.testing.support import _port_in_use
from zpgpool.testing.support import _quote_ident
from zpgpool.testing.support import make_dsn
from zpgpool.testing.watchdog import _process_alive

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

_SETTING_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_.]*$')


def _merged_settings(base, changes):
    """Return the settings *base* with *changes* applied: a value of None
    removes a setting.  Raise ValueError for a name that cannot be a
    postgresql.conf setting."""
    merged = dict(base)
    for name, value in (changes or {}).items():
        if not _SETTING_NAME.match(name):
            raise ValueError('%r is not a postgresql.conf setting name'
                             % (name,))
        merged[name] = value
    return {k: v for k, v in merged.items() if v is not None}


class PostgresServer(_Program):
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
    up on exit.  Should the process that started the server die without
    cleaning up, even by SIGKILL, a watchdog process stops the server (as
    ``stop('immediate')`` does) and removes its directory.

    *bindir* is the directory of the server binaries (default:
    ``find_bindir()``).  *settings* are postgresql.conf settings on top of
    ``DEFAULT_SETTINGS``; a value of None removes a default.  *port* is the
    TCP port (default: a free one), *password* the superuser's password
    (default: random).  *os_user* is the system user the server runs as
    when this process is root (default: ``$ZPGPOOL_PG_OS_USER`` or
    ``postgres``).
    """

    #: The superuser initdb creates.
    user = 'postgres'

    def __init__(self, bindir=None, settings=None, port=None, password=None,
                 os_user=None):
        self.bindir = os.path.abspath(bindir) if bindir else find_bindir()
        if not _has_server_binaries(self.bindir):
            raise PostgresUnavailable(
                '%s does not hold initdb, pg_ctl and postgres.' % self.bindir)
        self.settings = _merged_settings(DEFAULT_SETTINGS, settings)
        self.password = password or secrets.token_urlsafe(24)
        super().__init__(port, os_user)

    def _reset_paths(self):
        super()._reset_paths()
        #: The data directory (PGDATA).
        self.data_dir = None
        #: The bin directory the server runs from: ``bindir``, or a copy of
        #: its installation that the server's system user can reach.
        self.exec_bindir = None

    def __repr__(self):
        state = ('running' if self.is_running() else
                 'stopped' if self.data_dir else 'not started')
        return '<%s %s port=%s %s>' % (
            self.__class__.__name__, self.bindir, self.port, state)

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

    # -- life cycle -------------------------------------------------------

    def _prepare_binaries(self):
        if self._os_user is None:  # pragma: no cover (CI runs as root)
            self.exec_bindir = self.bindir
        elif _needs_copy(self.bindir, self._os_user):
            self.exec_bindir = _staged.acquire(self.bindir)
        else:
            self.exec_bindir = self.bindir

    def _make_base_dir(self):
        """Make the temporary directory, and have the watchdog remove it,
        and stop the server, should this process die first."""
        # SIGQUIT is what "pg_ctl stop --mode immediate" sends.
        self._make_dirs('zpgpool-pg-', 'postgresql.log',
                        os.path.join('data', 'postmaster.pid'), 'postgres',
                        signal.SIGQUIT)
        base = self.base_dir
        self.data_dir = os.path.join(base, 'data')
        if self._os_user is not None and not self._os_user.reaches(base):
            raise PostgresUnavailable(
                'The system user %r cannot reach the temporary directory %s; '
                'point TMPDIR at a directory every user can reach, such as '
                '/tmp.' % (self._os_user.name, base))
        self._prepare_binaries()

    def _create_cluster(self):
        """Fill the empty data directory: initdb, here."""
        pwfile = os.path.join(self.base_dir, 'pwfile')
        with open(pwfile, 'w', encoding='utf-8') as f:
            f.write(self.password + '\n')
        self._give_to_user(pwfile)
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
        self._give_to_user(path)

    def start(self, timeout=120):
        """Start the server, and wait until it accepts connections.

        The first start creates the data directory; later starts, after
        ``stop()``, reuse it and the same port.  Starting a running server
        does nothing.  Return the server.
        """
        if self.data_dir is None:
            self._make_base_dir()
            self._create_cluster()
        elif self.is_running():
            return self
        for attempt in itertools.count(1):
            self._choose_port()
            self._write_settings()
            proc = self._run('pg_ctl', 'start', '--wait',
                             '--timeout', str(int(timeout)),
                             '--pgdata', self.data_dir,
                             '--log', self.log_file,
                             check=False, timeout=timeout + 30)
            if proc.returncode == 0:
                break
            command = [os.path.join(self.exec_bindir, 'pg_ctl'), 'start']
            if self._try_another_port(attempt):
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

    def configure(self, timeout=60, **settings):
        """Change postgresql.conf settings of the server.

        A value of None removes a setting.  A running server reloads its
        configuration, and this returns once new sessions see it.  Settings
        that PostgreSQL reads only at start (``max_connections``, say) take
        effect at the next ``restart()``.
        """
        self.settings = _merged_settings(self.settings, settings)
        if self.data_dir is None:
            return
        self._write_settings()
        if not self.is_running():
            return
        (before,), = self.execute('SELECT pg_conf_load_time()')
        self.execute('SELECT pg_reload_conf()')
        # The server reloads a moment later; sessions started afterwards
        # carry the new load time.
        deadline = time.monotonic() + timeout
        while self.execute('SELECT pg_conf_load_time()')[0][0] <= before:
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    'The server on port %s did not reload its configuration '
                    'within %s seconds.\n%s' % (self.port, timeout,
                                                 self.log_tail()))
            time.sleep(0.02)

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
        if self.exec_bindir and self.exec_bindir != self.bindir:
            _staged.release(self.bindir)
        self._remove_dirs()
        if not self._fixed_port:  # pragma: no branch
            self.port = None

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


