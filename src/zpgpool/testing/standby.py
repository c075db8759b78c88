"""``StandbyServer``: a streaming hot standby of a ``PostgresServer``.

Tests of fail-over need a primary, a standby that has every committed
transaction, a way to kill the primary and promote the standby, and a DSN
that finds whichever server is the primary now.
"""
import re
import time

from zpgpool.testing.errors import PostgresServerError
from zpgpool.testing.server import PostgresServer
from zpgpool.testing.support import make_dsn

_STANDBY_NAME = re.compile(r'^[a-z_][a-z0-9_]{0,62}$')


def multihost_dsn(servers, dbname='postgres',
                  target_session_attrs='read-write', **overrides):
    """Return one DSN naming all *servers*, for libpq to try in turn.

    With ``target_session_attrs='read-write'`` libpq connects to the first
    server that accepts writes: the primary, whichever it is now.  The
    servers must share user and password, as a primary and its standbys
    do.  *overrides* add or replace parameters (None removes one).
    """
    servers = list(servers)
    if not servers:
        raise ValueError('multihost_dsn needs at least one server')
    params = {'host': ','.join(s.host for s in servers),
              'port': ','.join(str(s.port) for s in servers),
              'user': servers[0].user, 'password': servers[0].password,
              'dbname': dbname,
              'target_session_attrs': target_session_attrs}
    params.update(overrides)
    return make_dsn(**params)


def _synchronous_names(primary):
    """Return the names of *primary*'s synchronous standbys, in the order
    they were added."""
    value = primary.settings.get('synchronous_standby_names') or ''
    match = re.match(r'^FIRST 1 \((.*)\)$', value)
    return [n.strip() for n in match.group(1).split(',')] if match else []


def _set_synchronous_names(primary, names):
    # FIRST 1: a commit waits for the first of the standbys that is
    # connected, which is the earliest one added.
    primary.configure(synchronous_standby_names=(
        'FIRST 1 (%s)' % ', '.join(names) if names else None))


class StandbyServer(PostgresServer):
    """A hot standby of *primary*, streaming its WAL.

    The first ``start()`` copies the running *primary* with
    ``pg_basebackup --write-recovery-conf`` and starts the copy as a
    standby, on a port of its own; it returns once the primary reports the
    standby as streaming.  When *synchronous* (the default), the standby's
    *name* is then added to the primary's ``synchronous_standby_names``
    (``FIRST 1 (first, second, ...)``), so that a COMMIT on the primary
    returns only once its first connected standby has the transaction
    (``synchronous_commit`` is on in every server this package starts).

    ``promote()`` turns the standby into a primary.  A new standby can then
    be made of the promoted one: ``StandbyServer(promoted).start()``.

    The standby has the primary's settings, password and binaries;
    *settings* add to them.  ``cleanup()`` takes the standby out of the
    primary's ``synchronous_standby_names``, so that commits on a primary
    that still runs do not wait for it for ever, and then removes it like
    any ``PostgresServer``.
    """

    def __init__(self, primary, name='zpgpool_standby', synchronous=True,
                 settings=None, port=None, os_user=None):
        if not _STANDBY_NAME.match(name or ''):
            raise ValueError(
                'StandbyServer: name must be a lower-case identifier '
                '(letters, digits, underscores, at most 63), not %r'
                % (name,))
        merged = dict(primary.settings)
        # A standby made primary must not wait for standbys of its own
        # until it has one.
        merged['synchronous_standby_names'] = None
        merged['hot_standby'] = True
        merged.update(settings or {})
        super().__init__(bindir=primary.bindir, settings=merged, port=port,
                         password=primary.password, os_user=os_user)
        #: The server this one copies.
        self.primary = primary
        #: The standby's application_name, as the primary sees it.
        self.name = name
        self.synchronous = synchronous
        self._made_synchronous = False

    def __repr__(self):
        return '<%s %s of port %s, port=%s>' % (
            self.__class__.__name__, self.name, self.primary.port, self.port)

    def _create_cluster(self):
        """Fill the data directory with a base backup of the primary."""
        if not self.primary.is_running():
            raise PostgresServerError(
                'The primary on port %s does not run; start it before its '
                'standby %s.' % (self.primary.port, self.name))
        # --write-recovery-conf writes standby.signal and a primary_conninfo
        # with this DSN, application_name included.
        self._run('pg_basebackup', '--pgdata', self.data_dir,
                  '--write-recovery-conf', '--wal-method', 'stream',
                  '--checkpoint', 'fast', '--no-sync',
                  '--dbname', self.primary.dsn(application_name=self.name))

    def start(self, timeout=120):
        """Start the standby (the first time, copy the primary); wait
        until it streams from a running primary.  Return it."""
        super().start(timeout=timeout)
        if self.primary.is_running() and self.is_in_recovery():
            self.wait_streaming(timeout)
            if self.synchronous and not self._made_synchronous:
                names = _synchronous_names(self.primary)
                _set_synchronous_names(self.primary, names + [self.name])
                self._made_synchronous = True
                # The walsender picks the new setting up at its own pace,
                # after the sessions do.
                self._wait_replication(('sync', 'potential'), timeout)
        return self

    def is_in_recovery(self):
        """Tell whether the server is (still) a standby."""
        return self.execute('SELECT pg_is_in_recovery()')[0][0]

    def wait_streaming(self, timeout=60):
        """Wait until the primary reports this standby as streaming."""
        self._wait_replication(None, timeout)

    def _wait_replication(self, sync_states, timeout):
        """Wait until the primary reports this standby as streaming, in one
        of *sync_states* unless that is None."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.execute(
                'SELECT sync_state FROM pg_stat_replication '
                "WHERE application_name = %s AND state = 'streaming'",
                (self.name,))
            if rows and (sync_states is None or rows[0][0] in sync_states):
                return
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    'The standby %s on port %s does not stream from the '
                    'primary on port %s (%s) after %s seconds.\n'
                    'End of its log %s:\n%s' % (
                        self.name, self.port, self.primary.port,
                        'synchronously' if sync_states else 'at all',
                        timeout, self.log_file, self.log_tail()))
            time.sleep(0.05)

    def promote(self, timeout=60):
        """Make the standby a primary; return once it accepts writes."""
        self._run('pg_ctl', 'promote', '--wait', '--timeout', str(timeout),
                  '--pgdata', self.data_dir, timeout=timeout + 30)
        deadline = time.monotonic() + timeout
        while self.is_in_recovery():  # pragma: no cover (pg_ctl waited)
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    'The standby %s on port %s is still in recovery %s '
                    'seconds after its promotion.\n%s' % (
                        self.name, self.port, timeout, self.log_tail()))
            time.sleep(0.05)
        # Assigning a transaction id is what a server in recovery refuses.
        self.execute('SELECT txid_current()')
        return self

    def cleanup(self):
        """Take the standby out of the primary's synchronous standbys,
        then stop it and remove everything it made."""
        if self._made_synchronous:
            self._made_synchronous = False
            names = _synchronous_names(self.primary)
            if self.name in names:
                names.remove(self.name)
                try:
                    _set_synchronous_names(self.primary, names)
                except Exception:  # pragma: no cover (primary just died)
                    pass
        super().cleanup()
