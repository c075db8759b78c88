"""Running the server as an unprivileged user when the tests run as root.

PostgreSQL and PgBouncer refuse to run as root.  When we are root, they run
as the system user ``postgres`` (or the one ``ZPGPOOL_PG_OS_USER`` names).
When that user cannot reach the server binaries (a virtualenv below a
private home directory, say), the installation is copied into a
world-readable temporary directory, shared by the servers of this process.
"""
import atexit
import os
import shutil
import stat
import tempfile
import threading

from zpgpool.testing import watchdog
from zpgpool.testing.binaries import _REQUIRED_BINARIES
from zpgpool.testing.errors import PostgresUnavailable

#: Environment variable naming the system user the server runs as when the
#: tests run as root (default: ``postgres``).
OS_USER_ENV = 'ZPGPOOL_PG_OS_USER'


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
        # source bindir -> [copy dir, its bindir, users, watchdog order]
        self._copies = {}
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
                # Should this process die before it removes the copy, the
                # watchdog does.
                order = watchdog.watch(remove=[base])
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
                    watchdog.forget(order)
                    raise
                entry = [base, os.path.join(base, os.path.relpath(bindir, top)),
                         0, order]
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
                watchdog.forget(entry[3])

    def _remove_all(self):
        # A forked child inherits this handler; the copies are the parent's.
        if os.getpid() != self._pid:  # pragma: no cover
            return
        with self._lock:
            for base, _, _, order in self._copies.values():
                shutil.rmtree(base, ignore_errors=True)
                watchdog.forget(order)
            self._copies.clear()


_staged = _StagedCopies()

