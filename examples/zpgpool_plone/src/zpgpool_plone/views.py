"""The add-on's browser views, on the site root; each answers with JSON.

Each view asks for a pool by name and works through ``connection()``: the
worker thread's connection, joined to the transaction that Zope's
publisher began for the request, the same transaction that holds the
view's ZODB changes.  No view commits or rolls back: the publisher commits
when the view returns and aborts when it raises, and runs the whole
request again when a ``TransientError`` escapes (a ZODB ConflictError, or a
PostgreSQL serialization failure, which zpgpool raises as one).

A view that writes is POST-only and checks the CSRF token itself, even
when it writes ZODB too: Plone's automatic protection (plone.protect) only
looks at ZODB, so a request that writes nothing but PostgreSQL would get
past it without a token.
"""
import json
import threading
import time

import transaction
from Acquisition import aq_base
from plone import api
from plone.protect import CheckAuthenticator
from plone.protect import PostOnly
from plone.protect import createToken
from Products.Five.browser import BrowserView
from zExceptions import NotFound
from zope.annotation.interfaces import IAnnotations
from zope.component import getUtility

from zpgpool.interfaces import IConnectionPool

import zpgpool_plone
from zpgpool_plone.setuphandlers import CONFLICTS

#: The pools configure.zcml declares.
POOLS = ('plone', 'plone_serial', 'plone_readonly', 'plone_2pc')


def cursor(name=zpgpool_plone.POOL):
    """A cursor of this thread's connection of pool *name*, in the
    request's transaction."""
    return getUtility(IConnectionPool, name=name).connection().cursor()


class JSONView(BrowserView):
    """A view that answers with JSON; ``writes = True`` makes it POST-only
    with a valid CSRF token (form field ``_authenticator`` or header
    ``X-CSRF-TOKEN``), or else Forbidden (403) before it does anything."""

    writes = True

    def __call__(self):
        if self.writes:
            PostOnly(self.request)
            CheckAuthenticator(self.request)
        result = self.run()
        self.request.response.setHeader(
            'Content-Type', 'application/json; charset=utf-8')
        return json.dumps(result, default=str)

    def run(self):
        raise NotImplementedError

    @property
    def attempt(self):
        """Which attempt at this request this is: 1, then 2 after the
        publisher's first retry, and so on."""
        return getattr(self.request, 'retry_count', 0) + 1

    @property
    def thread(self):
        return threading.current_thread().name

    def pause(self, name='pause'):
        """Sleep for the form's *name* seconds (at most 1), so that
        concurrent requests overlap."""
        seconds = min(float(self.request.form.get(name, 0)), 1.0)
        if seconds:
            time.sleep(seconds)


class Add(JSONView):
    """Create a Document ``key`` (title ``title``) with plone.api, and a
    row for it in ``zpgpool_plone_note``; the subscriber adds its mirror
    row to ``zpgpool_plone_content``.  ``pause`` waits after writing."""

    def add(self):
        key = self.request.form['key']
        item = api.content.create(
            container=self.context, type='Document', id=key,
            title=self.request.form.get('title', key), safe_id=False)
        c = cursor()
        c.execute(
            'INSERT INTO zpgpool_plone_note (key, uid, attempt, thread,'
            ' backend_pid) VALUES (%s, %s, %s, %s, pg_backend_pid())'
            ' RETURNING id, backend_pid',
            (key, item.UID(), self.attempt, self.thread))
        row_id, pid = c.fetchone()
        self.pause()
        return {'key': key, 'uid': item.UID(), 'row': row_id,
                'backend_pid': pid, 'thread': self.thread,
                'attempt': self.attempt}

    def run(self):
        return self.add()


class AddThenFail(Add):
    """Add as ``@@zpgpool-add`` does, then raise: the publisher aborts the
    request's transaction, so neither the Document nor a row is kept."""

    def run(self):
        self.add()
        raise RuntimeError('zpgpool-add-fail: failing after writing')


class VoteFailure(Add):
    """Add, then insert a duplicate into a unique constraint that is
    checked only at COMMIT.  The view returns normally; PostgreSQL refuses
    the COMMIT that zpgpool sends in its vote, after ZODB has voted, so
    the publisher aborts ZODB's changes as well."""

    def run(self):
        result = self.add()
        token = 'vote-' + result['key']
        cursor().execute(
            'INSERT INTO zpgpool_plone_vote (token) VALUES (%s), (%s)',
            (token, token))
        return result


class ZODBConflict(Add):
    """Add, and make ZODB refuse the first ``times`` (default 1) attempts'
    commits with a ConflictError, which the publisher retries.

    The view changes a persistent mapping in the site's annotations, and a
    second ZODB connection commits a change to the same mapping before the
    request commits, as a concurrent request would.
    """

    def run(self):
        result = self.add()
        key = result['key']
        IAnnotations(self.context)[CONFLICTS][key] = self.attempt
        if self.attempt <= int(self.request.form.get('times', 1)):
            rival_tm = transaction.TransactionManager()
            rival = self.context._p_jar.db().open(
                transaction_manager=rival_tm)
            try:
                site = rival.get(self.context._p_oid)
                IAnnotations(site)[CONFLICTS][key + '-rival'] = self.attempt
                rival_tm.commit()
            finally:
                rival_tm.abort()
                rival.close()
        return result


class Delete(JSONView):
    """Delete the Document ``key``; the subscriber deletes its mirror
    row."""

    def run(self):
        key = self.request.form['key']
        item = aq_base(self.context).get(key)
        if item is None:
            raise NotFound('zpgpool-delete: the site holds no item %r'
                           % (key,))
        api.content.delete(obj=self.context[key], check_linkintegrity=False)
        return {'key': key, 'deleted': True}


class WriteSQL(JSONView):
    """Write a row to ``zpgpool_plone_note`` and nothing to ZODB."""

    def run(self):
        key = self.request.form['key']
        cursor().execute(
            "INSERT INTO zpgpool_plone_note (key, uid, attempt, thread,"
            " backend_pid) VALUES (%s, '', %s, %s, pg_backend_pid())",
            (key, self.attempt, self.thread))
        return {'key': key, 'attempt': self.attempt}


class Counter(JSONView):
    """Increment the counter ``name`` by reading and then writing it, in a
    SERIALIZABLE transaction (pool ``plone_serial``).

    Concurrent requests collide: PostgreSQL fails all but one with a
    serialization failure, which zpgpool raises as a TransientError, and
    the publisher retries the request.  ``pause`` waits between the read
    and the write, to widen the window.  ``collide=N`` makes the first N
    attempts collide for certain: another connection updates the row
    between this transaction's read and write.  The answer says how many
    retries this request needed.
    """

    def run(self):
        name = self.request.form['name']
        c = cursor('plone_serial')
        c.execute('SELECT n FROM zpgpool_plone_counter WHERE name = %s',
                  (name,))
        row = c.fetchone()
        if row is None:
            raise NotFound('zpgpool-counter: no counter named %r in the'
                           ' table zpgpool_plone_counter' % (name,))
        (n,) = row
        self.pause()
        if self.attempt <= int(self.request.form.get('collide', 0)):
            pool = getUtility(IConnectionPool, name='plone_serial')
            with pool.checkout() as rival:
                with rival.cursor() as rc:
                    rc.execute('UPDATE zpgpool_plone_counter SET n = n'
                               ' WHERE name = %s', (name,))
        c.execute('UPDATE zpgpool_plone_counter SET n = %s WHERE name = %s',
                  (n + 1, name))
        return {'name': name, 'n': n + 1, 'retries': self.attempt - 1,
                'thread': self.thread}


class TwoPools(Add):
    """Add (the Document's rows go through ``plone``, a one-phase pool),
    then use the pool ``second`` in the same transaction: read through
    ``plone_readonly``, or write a row to ``zpgpool_plone_vote`` through
    ``plone_2pc`` or ``plone_serial``.  zpgpool refuses a second writable
    one-phase pool (``plone_serial``) with ConnectionMisuse before it sends
    anything, so that request fails and leaves nothing."""

    seconds = ('plone_serial', 'plone_readonly', 'plone_2pc')

    def run(self):
        second = self.request.form['second']
        if second not in self.seconds:
            raise ValueError('second must be one of %s, got %r'
                             % (', '.join(self.seconds), second))
        result = self.add()
        c = cursor(second)
        if second == 'plone_readonly':
            c.execute('SELECT count(*) FROM zpgpool_plone_note')
            result['notes_seen'] = c.fetchone()[0]
        else:
            c.execute('INSERT INTO zpgpool_plone_vote (token) VALUES (%s)',
                      ('two-pools-' + result['key'],))
        return result


class Token(JSONView):
    """A CSRF token for the logged-in user, for clients that POST."""

    writes = False

    def run(self):
        return {'token': createToken()}


class Read(JSONView):
    """What ZODB holds for the Document ``key`` (null when there is
    none)."""

    writes = False

    def run(self):
        key = self.request.form['key']
        item = aq_base(self.context).get(key) if key else None
        if item is None:
            return {'key': key, 'zodb': None}
        item = self.context[key]
        return {'key': key, 'zodb': {
            'uid': item.UID(), 'title': item.Title(),
            'path': '/'.join(item.getPhysicalPath())}}


class Backend(JSONView):
    """The worker thread's name and its connection's backend pid;
    ``sleep`` (seconds, at most 10) makes PostgreSQL sleep first, to keep
    the request in flight."""

    writes = False

    def run(self):
        c = cursor()
        sleep = min(float(self.request.form.get('sleep', 0)), 10.0)
        if sleep:
            c.execute('SELECT pg_sleep(%s)', (sleep,))
        c.execute('SELECT pg_backend_pid()')
        return {'thread': self.thread, 'backend_pid': c.fetchone()[0],
                'attempt': self.attempt}


class Stats(JSONView):
    """Each pool's ``stats()``."""

    writes = False

    def run(self):
        return {name: getUtility(IConnectionPool, name=name).stats()
                for name in POOLS}


# For tests only (testing.zcml): writing views without the token check.

class UncheckedAdd(Add):
    """``@@zpgpool-add`` without its own CSRF check, and open to GET."""

    writes = False


class UncheckedWriteSQL(WriteSQL):
    """``@@zpgpool-sql`` without its own CSRF check, and open to GET."""

    writes = False
