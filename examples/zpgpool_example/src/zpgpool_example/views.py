"""The example's browser views.

Each view asks for a pool by name and works through ``connection()``: the
worker thread's connection, joined to the transaction that Zope's
publisher began for the request.  No view commits or rolls back; the
publisher commits when the view returns and aborts when it raises, and it
retries the whole request when the commit or a statement raises a
``TransientError`` (a ZODB ``ConflictError``, or a PostgreSQL
serialization failure, which zpgpool raises as one).

Every view answers with JSON, for the tests and for curl.
"""
import json
import math
import threading
import time

import transaction
from Acquisition import aq_base
from Products.Five.browser import BrowserView
from persistent.mapping import PersistentMapping
from zope.component import getUtility

from zpgpool.datamanager import gid_prefix
from zpgpool.datamanager import zodb_decider
from zpgpool.interfaces import IConnectionPool

import zpgpool_example

#: The pools configure.zcml declares.
POOLS = ('example', 'example2pc', 'exampleserial', 'examplechecked')

#: Attributes of the application root that hold the example's ZODB data.
NOTES = 'zpgpool_example_notes'
CONFLICTS = 'zpgpool_example_conflicts'


class JSONView(BrowserView):
    """A view that answers with JSON."""

    #: The pool used when the request names none.
    default_pool = 'example'
    #: The pools a request may name with ``?pool=``.
    pools = ('example', 'example2pc')

    @property
    def attempt(self):
        """Which attempt at this request this is: 1, then 2 after the
        publisher's first retry, and so on."""
        return getattr(self.request, 'retry_count', 0) + 1

    def pool(self):
        name = self.request.form.get('pool') or self.default_pool
        if name not in self.pools:
            raise ValueError('unknown pool %r' % (name,))
        return getUtility(IConnectionPool, name=name)

    def cursor(self):
        """A cursor of this thread's connection, in the request's
        transaction."""
        return self.pool().connection().cursor()

    def root(self):
        return aq_base(self.context)

    def gid(self):
        """The two-phase transaction id zpgpool recorded in the request's
        transaction, which ZODB stores with its transaction record (None
        for a one-phase pool)."""
        return transaction.get().extension.get(
            gid_prefix(self.pool()) + 'gid')

    def json(self, data):
        self.request.response.setHeader(
            'Content-Type', 'application/json; charset=utf-8')
        return json.dumps(data, default=str)

    def bad_request(self, message):
        """Answer 400 with ``message``, for a request the view cannot
        serve as it was asked (nothing was written)."""
        self.request.response.setStatus(400)
        return self.json({'error': message})


class Setup(JSONView):
    """Create the tables and the ZODB containers, in one transaction."""

    def __call__(self):
        self.cursor().execute(zpgpool_example.SCHEMA)
        root = self.root()
        for name in (NOTES, CONFLICTS):
            if getattr(root, name, None) is None:
                setattr(root, name, PersistentMapping())
        return self.json({'ok': True})


class Write(JSONView):
    """Write a note to PostgreSQL and to ZODB in the same request.

    ``?key=`` names the note, ``?text=`` holds it, ``?pool=`` picks the
    one-phase ``example`` (default) or the two-phase ``example2pc`` pool.
    ``?pause=`` (seconds, at most 1) waits after writing, so that
    concurrent writes overlap: they all change the one persistent mapping
    of notes, so all but the first to commit meet a ZODB ConflictError and
    are retried by the publisher.
    """

    def write(self):
        key = self.request.form['key']
        text = self.request.form.get('text', '')
        cursor = self.cursor()
        cursor.execute(
            'INSERT INTO example_note (key, text, attempt, thread,'
            ' backend_pid) VALUES (%s, %s, %s, %s, pg_backend_pid())'
            ' RETURNING id, backend_pid',
            (key, text, self.attempt, threading.current_thread().name))
        row_id, pid = cursor.fetchone()
        getattr(self.root(), NOTES)[key] = text
        pause = min(float(self.request.form.get('pause', 0)), 1.0)
        if pause:
            time.sleep(pause)
        return {'key': key, 'id': row_id, 'backend_pid': pid,
                'thread': threading.current_thread().name,
                'attempt': self.attempt, 'gid': self.gid()}

    def __call__(self):
        return self.json(self.write())


class WriteThenFail(Write):
    """Write as ``@@example-write`` does, then raise: the publisher aborts
    the request's transaction, so neither write is kept."""

    def __call__(self):
        self.write()
        raise RuntimeError('example-write-fail: failing after writing')


class Read(JSONView):
    """Show what ZODB and PostgreSQL hold for ``?key=``."""

    def __call__(self):
        key = self.request.form['key']
        cursor = self.cursor()
        cursor.execute(
            'SELECT text, attempt FROM example_note WHERE key = %s'
            ' ORDER BY id', (key,))
        rows = [{'text': text, 'attempt': attempt}
                for text, attempt in cursor.fetchall()]
        notes = getattr(self.root(), NOTES, None) or {}
        return self.json({'key': key, 'zodb': notes.get(key),
                          'postgres': rows})


class Stats(JSONView):
    """Show each pool's ``stats()``."""

    def __call__(self):
        return self.json({name: getUtility(IConnectionPool, name).stats()
                          for name in POOLS})


class ZODBCommitted(JSONView):
    """Tell whether ZODB committed the two-phase transaction ``?gid=``.

    This is the question ``zpgpool recover`` asks about a transaction left
    prepared by a crash, answered by ``zodb_decider`` from the ZODB
    transaction records.
    """

    def __call__(self):
        gid = self.request.form['gid']
        decide = zodb_decider(self.root()._p_jar.db().storage)
        return self.json({'gid': gid, 'committed': decide(gid)})


class VoteFailure(Write):
    """Write a note to both databases, then break a deferred constraint.

    The unique constraint on ``example_vote.token`` is checked only when the
    transaction ends, so the view itself succeeds and PostgreSQL refuses in
    the commit's vote: PREPARE TRANSACTION (``example2pc``, the default
    here) or COMMIT (``example``) fails, after ZODB has voted, and the
    whole transaction, ZODB's part included, is aborted.
    """

    default_pool = 'example2pc'

    def __call__(self):
        result = self.write()
        cursor = self.cursor()
        token = 'vote-' + self.request.form['key']
        cursor.execute('INSERT INTO example_vote (token) VALUES (%s), (%s)',
                       (token, token))
        return self.json(result)


class ZODBConflict(Write):
    """Write a note, and make ZODB refuse the commit with a ConflictError.

    The view changes the application's ``zpgpool_example_conflicts``
    mapping, then changes the same mapping through a second ZODB
    connection and commits that, as a concurrent request would.  The
    request's own commit then meets a ConflictError, which the publisher
    answers by retrying the request.  ``?times=N`` (default 1) makes the
    first N attempts conflict; with more than the publisher's
    ``max-conflict-retries`` every attempt conflicts and the request fails.
    The pool is ``example2pc`` unless ``?pool=`` says otherwise.
    """

    default_pool = 'example2pc'

    def __call__(self):
        result = self.write()
        key = self.request.form['key']
        root = self.root()
        conflicts = getattr(root, CONFLICTS)
        conflicts[key] = self.attempt
        if self.attempt <= int(self.request.form.get('times', 1)):
            rival_tm = transaction.TransactionManager()
            rival = root._p_jar.db().open(transaction_manager=rival_tm)
            try:
                app = rival.root()['Application']
                getattr(app, CONFLICTS)[key + '-rival'] = self.attempt
                rival_tm.commit()
            finally:
                rival_tm.abort()
                rival.close()
        return self.json(result)


class Counter(JSONView):
    """Increment the counter ``?name=`` by reading and then writing it, in
    a SERIALIZABLE transaction.

    Concurrent requests collide: PostgreSQL fails all but one with a
    serialization failure, which zpgpool raises as a TransientError, and
    the publisher retries the request.  ``?pause=`` (seconds, at most 1)
    waits between the read and the write to widen the window.  The answer
    says how many retries this request needed.  A counter that does not
    exist yet starts at 0, so its first increment answers 1.  Without a
    ``name``, or with a ``pause`` that is not a number, the answer is a
    400 that says so.
    """

    default_pool = 'exampleserial'
    pools = ('exampleserial',)

    def __call__(self):
        name = self.request.form.get('name', '').strip()
        if not name:
            return self.bad_request(
                "give the counter's name: @@example-counter?name=NAME")
        try:
            pause = float(self.request.form.get('pause', 0))
        except ValueError:
            pause = math.nan
        if not 0 <= pause <= 1:
            return self.bad_request(
                'pause must be a number of seconds from 0 to 1, got %r'
                % self.request.form['pause'])
        cursor = self.cursor()
        # A new counter: its row is made here, in the same transaction.
        # Two first increments at once collide like any other two (a
        # unique violation or a serialization failure, both retried).
        cursor.execute('INSERT INTO example_counter (name, n) VALUES'
                       ' (%s, 0) ON CONFLICT (name) DO NOTHING', (name,))
        cursor.execute('SELECT n FROM example_counter WHERE name = %s',
                       (name,))
        (n,) = cursor.fetchone()
        if pause:
            time.sleep(pause)
        cursor.execute('UPDATE example_counter SET n = %s WHERE name = %s',
                       (n + 1, name))
        return self.json({'name': name, 'n': n + 1,
                          'retries': self.attempt - 1,
                          'thread': threading.current_thread().name})


class Backend(JSONView):
    """Show the worker thread's name and its connection's backend pid.

    ``?pool=`` picks ``example`` (default) or ``examplechecked``;
    ``?sleep=`` (seconds, at most 10) makes PostgreSQL sleep first, to keep
    a request in flight.
    """

    pools = ('example', 'examplechecked')

    def __call__(self):
        cursor = self.cursor()
        sleep = min(float(self.request.form.get('sleep', 0)), 10.0)
        if sleep:
            cursor.execute('SELECT pg_sleep(%s)', (sleep,))
        cursor.execute('SELECT pg_backend_pid()')
        return self.json({'thread': threading.current_thread().name,
                          'backend_pid': cursor.fetchone()[0]})
