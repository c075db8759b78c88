"""What a throwaway PostgreSQL server and a throwaway PgBouncer share.

Each runs a program on a port of 127.0.0.1 and on a unix socket, as the
server's system user when this process is root, with its files in a
temporary directory of its own that goes away with it -- also, through the
watchdog, when this process dies without cleaning up.
"""
import atexit
import os
import shutil
import tempfile

from zpgpool.testing import watchdog
from zpgpool.testing.asuser import _os_user
from zpgpool.testing.support import _free_port
from zpgpool.testing.support import _port_in_use


class _Program:
    """The port, the system user, the temporary directory and the clean-up
    of a program started for tests.

    A subclass makes its directory with ``_make_dirs``, chooses its port
    with ``_choose_port`` (and ``_try_another_port`` when the first start
    fails), and removes the directory in ``cleanup`` with ``_remove_dirs``.
    """

    #: The TCP address the program listens on.
    host = '127.0.0.1'

    def __init__(self, port, os_user):
        self.port = port
        self._fixed_port = port is not None
        self._os_user = _os_user(os_user)
        self._version = None
        self._reset_paths()

    def _reset_paths(self):
        #: The temporary directory that holds the program's files.
        self.base_dir = None
        #: The directory of its unix socket.
        self.socket_dir = None
        #: Its log file.
        self.log_file = None
        self._owner_pid = None
        self._watch = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.cleanup()

    # -- port -------------------------------------------------------------

    def _choose_port(self):
        if self.port is None:
            self.port = _free_port(self.host)

    def _try_another_port(self, attempt):
        """Tell whether a start that failed should be tried again on
        another port, and forget the port if so.

        Until the first start succeeds, another program may take the port
        chosen; after that (or with a port given) the port is kept.
        """
        if (not self._fixed_port and attempt < 5
                and _port_in_use(self.port, self.host)):
            self.port = None
            return True
        return False

    # -- files ------------------------------------------------------------

    def _give_to_user(self, path):
        if self._os_user is not None:
            os.chown(path, self._os_user.uid, self._os_user.gid)

    def _make_dirs(self, prefix, log_name, pidfile, program, sig):
        """Make the temporary directory, its socket directory and the log's
        path, and have the watchdog stop *program* (by *pidfile*, relative
        to the directory, with *sig*) and remove the directory should this
        process die first."""
        self._owner_pid = os.getpid()
        atexit.register(self._cleanup_at_exit)
        base = self.base_dir = tempfile.mkdtemp(prefix=prefix)
        self._watch = watchdog.watch(
            remove=[base], pidfile=os.path.join(base, pidfile),
            program=program, sig=sig)
        self.socket_dir = os.path.join(base, 'socket')
        self.log_file = os.path.join(base, log_name)
        os.mkdir(self.socket_dir, 0o700)
        for path in (base, self.socket_dir):
            self._give_to_user(path)

    def _remove_dirs(self):
        """Remove the temporary directory, and forget what ``_make_dirs``
        asked of the exit hook and the watchdog."""
        shutil.rmtree(self.base_dir, ignore_errors=True)
        atexit.unregister(self._cleanup_at_exit)
        watchdog.forget(self._watch)
        self._reset_paths()

    def log_tail(self, lines=30):
        """Return the last *lines* lines of the program's log."""
        if not self.log_file:
            return ''
        try:
            with open(self.log_file, encoding='utf-8',
                      errors='replace') as f:
                return ''.join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ''

    def _cleanup_at_exit(self):
        # A forked child inherits atexit handlers; the program is the
        # parent's to stop.
        if os.getpid() == self._owner_pid:
            self.cleanup()
