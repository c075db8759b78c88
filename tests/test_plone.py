"""zpgpool inside a real Plone 6.2 site: the example add-on over HTTP.

PLONE_LAYER (tests/plonehelpers.py) builds a throwaway Zope instance with a
FileStorage in a temporary directory, creates a Plone site in it with
plone.distribution (a zconsole script), installs
examples/zpgpool_plone with plone.api, and serves it with waitress (four
worker threads) through Zope's runwsgi in a subprocess, beside a private
PostgreSQL server.  Every test talks to the site over real HTTP, logged in
as a Zope manager with basic auth, and checks PostgreSQL with a connection
of its own.  What ZODB holds is read through the add-on's
``@@zpgpool-read`` view, in a request of its own, that is a fresh ZODB
transaction.

scripts/test-plone installs Plone and runs this module at zope.testrunner's
level 2 (the main suite runs level 1 and so leaves it out); without Plone
installed, the layer fails with a message saying so.  Each test uses keys
of its own, so that the tests share the one site.
"""
import unittest

from tests.plonehelpers import PLONE_LAYER
from tests.plonehelpers import SCRIPT_DOCUMENT
from tests.plonehelpers import SITE_ID
from tests.sitechecks import SiteChecks
from tests.sitechecks import WorkerThreadChecks


class PloneTestCase(SiteChecks, unittest.TestCase):

    layer = PLONE_LAYER
    # zope.testrunner's level 2: the main suite (level 1, in zpgpool's own
    # virtualenv) leaves these tests to scripts/test-plone, which runs them
    # with Plone installed (--at-level 2).
    level = 2

    @property
    def plone(self):
        return self.layer.zope

    def token(self):
        """A CSRF token for the manager the tests log in as."""
        result = self.plone.get('@@zpgpool-token')
        self.assertEqual(result.status, 200, result)
        return result.json['token']

    def add(self, view='@@zpgpool-add', **params):
        """POST to a writing view with a valid token."""
        return self.plone.post(view, token=self.token(), **params)

    def zodb(self, key):
        """What ZODB holds for the Document *key* (None when nothing)."""
        result = self.plone.get('@@zpgpool-read', key=key)
        self.assertEqual(result.status, 200, result)
        return result.json['zodb']

    def notes(self, key):
        return self.sql('SELECT uid, attempt FROM zpgpool_plone_note'
                        ' WHERE key = %s ORDER BY id', (key,))

    def mirrored(self, key):
        """The subscriber's rows for the Document *key*."""
        return self.sql('SELECT uid, path, title FROM zpgpool_plone_content'
                        ' WHERE path = %s', ('/%s/%s' % (SITE_ID, key),))

    def assertNothingFor(self, key):
        """Neither ZODB nor PostgreSQL holds anything of the Document
        *key*."""
        self.assertIsNone(self.zodb(key))
        self.assertEqual(self.notes(key), [])
        self.assertEqual(self.mirrored(key), [])

    def assertAllFor(self, key, result, title=None):
        """The Document *key* that the request answered with *result*
        exists in ZODB, and both its rows are those of the attempt that
        committed."""
        uid, attempt = result.json['uid'], result.json['attempt']
        self.assertEqual(self.zodb(key), {
            'uid': uid, 'title': title or key,
            'path': '/%s/%s' % (SITE_ID, key)})
        self.assertEqual(self.notes(key), [(uid, attempt)])
        self.assertEqual(self.mirrored(key),
                         [(uid, '/%s/%s' % (SITE_ID, key), title or key)])

    def retries_logged(self, view, since):
        """How many retries of *view* the server logged after the event
        log's first *since* characters.  Products.SiteErrorLog logs each
        TransientError that the publisher will retry at INFO ("E at PATH:
        message. Request will be retried.", the message possibly running
        over several lines), and the others at ERROR."""
        head = ' INFO [Zope.SiteErrorLog]'
        path = ' at /%s/%s: ' % (SITE_ID, view)
        return sum(head in line and path in line
                   for line in self.plone.event_log()[since:].splitlines())


class InstallTests(PloneTestCase):

    def test_installing_created_the_tables_through_the_pool(self):
        """The post-install handler ran in the zconsole script that created
        the site, which had the DSN from zope.conf's <environment> only
        (plonehelpers removes it from the environment of every process it
        starts); so did the server that answers here."""
        tables = {name for (name,) in self.sql(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE"
            " 'zpgpool_plone_%%'")}
        self.assertEqual(tables, {
            'zpgpool_plone_content', 'zpgpool_plone_note',
            'zpgpool_plone_vote', 'zpgpool_plone_counter'})
        self.report('creating the Plone site took %.1f s, starting Zope'
                    ' %.1f s' % (self.layer.timings['create site'],
                                 self.layer.timings['start Zope']))

    def test_the_pools_are_registered_when_zope_starts_and_open_nothing(self):
        # The layer read the stats once the server answered, before any
        # request used a pool: all four are there, and none has opened a
        # connection (the post-install handler's ran in another process).
        stats = self.layer.initial_stats
        self.assertEqual(sorted(stats), ['plone', 'plone_2pc',
                                         'plone_readonly', 'plone_serial'])
        for name, pool in stats.items():
            self.assertEqual(pool['connections_opened'], 0, (name, pool))
            self.assertEqual(pool['size'], 0, (name, pool))

    def test_the_subscriber_acts_only_once_the_add_on_is_installed(self):
        # The site-creation script (no request layer there) made the
        # classic distribution's example content before it installed the
        # add-on, and a Document after: only that one is mirrored.
        self.assertIsNotNone(self.zodb('news'))
        self.assertEqual(self.mirrored('news'), [])
        made = self.zodb(SCRIPT_DOCUMENT)
        self.assertEqual(self.mirrored(SCRIPT_DOCUMENT), [
            (made['uid'], made['path'], 'Made by a script')])


class RequestTransactionTests(PloneTestCase):
    """The transaction Zope's publisher begins for a request holds the
    Document (ZODB) and its rows (PostgreSQL): both commit or neither."""

    def test_success_commits_the_document_and_its_rows(self):
        key = self.key()
        result = self.add(key=key, title='Hello PostgreSQL')
        self.assertEqual(result.status, 200, result)
        self.assertEqual(result.json['attempt'], 1)
        self.assertAllFor(key, result, title='Hello PostgreSQL')

    def test_the_token_may_come_in_the_form_too(self):
        key = self.key()
        result = self.plone.post('@@zpgpool-add', key=key,
                                 _authenticator=self.token())
        self.assertEqual(result.status, 200, result)
        self.assertAllFor(key, result)

    def test_deleting_the_document_deletes_its_mirror_row(self):
        key = self.key()
        added = self.add(key=key)
        self.assertEqual(added.status, 200, added)
        self.assertEqual(len(self.mirrored(key)), 1)
        result = self.add('@@zpgpool-delete', key=key)
        self.assertEqual(result.status, 200, result)
        self.assertIsNone(self.zodb(key))
        self.assertEqual(self.mirrored(key), [])
        # Once more: there is nothing left to delete.
        result = self.add('@@zpgpool-delete', key=key)
        self.assertEqual(result.status, 404, result)

    def test_a_raising_view_leaves_neither(self):
        key = self.key()
        result = self.add('@@zpgpool-add-fail', key=key)
        self.assertEqual(result.status, 500, result)
        self.assertNothingFor(key)

    def test_a_postgresql_vote_failure_leaves_neither(self):
        """The view returns normally; a deferred unique constraint fails the
        COMMIT that zpgpool sends in its vote, after ZODB voted, and the
        publisher aborts ZODB's changes too."""
        key = self.key()
        result = self.add('@@zpgpool-vote-fail', key=key)
        self.assertEqual(result.status, 500, result)
        self.assertIn('UniqueViolation', result.text)
        self.assertNothingFor(key)
        self.assertEqual(self.sql(
            'SELECT count(*) FROM zpgpool_plone_vote WHERE token = %s',
            ('vote-' + key,)), [(0,)])

    def test_a_zodb_conflict_is_retried_and_only_the_retry_is_kept(self):
        """The first attempt's commit meets a ZODB ConflictError; the
        publisher retries the request.  The first attempt created its own
        Document (with its own UID) and rows: none of them is left, only
        the retry's."""
        key = self.key()
        result = self.add('@@zpgpool-conflict', key=key, times=1)
        self.assertEqual(result.status, 200, result)
        self.assertEqual(result.json['attempt'], 2)
        self.assertAllFor(key, result)

    def test_a_conflict_on_every_attempt_leaves_nothing(self):
        """Every attempt conflicts, so the request fails after the
        publisher's last retry; no attempt left a Document or a row."""
        key = self.key()
        result = self.add('@@zpgpool-conflict', key=key, times=99)
        self.assertEqual(result.status, 500, result)
        self.assertNothingFor(key)

    def test_concurrent_adds_stay_consistent(self):
        """Concurrent requests add Documents to the one site: those that
        collide in ZODB are retried by the publisher.  Afterwards each
        request that succeeded has its Document and exactly the rows of the
        attempt that committed; one that ran out of retries (possible, not
        expected) has nothing."""
        threads = self.layer.threads
        keys = [self.key() for _ in range(3 * threads)]
        since = len(self.plone.event_log())
        results = []
        for burst in range(3):
            chunk = keys[burst * threads:(burst + 1) * threads]
            token = self.token()
            results += self.concurrently([
                (lambda key=key: self.plone.post(
                    '@@zpgpool-add', token=token, key=key, pause='0.05'))
                for key in chunk])
        retries = 0
        logged = self.retries_logged('@@zpgpool-add', since)
        for key, result in zip(keys, results):
            if result.ok:
                retries += result.json['attempt'] - 1
                self.assertAllFor(key, result)
            else:
                self.assertNothingFor(key)
        self.report('%d concurrent adds (%d clients): %d ZODB conflicts'
                    ' retried (the server logged %d retries), %d requests'
                    ' failed' % (len(keys), threads, retries, logged,
                                 sum(not r.ok for r in results)))
        self.assertTrue(any(r.ok for r in results), results)
        # A request that failed was retried too, as often as allowed.
        self.assertGreaterEqual(logged, retries)


class CSRFTests(PloneTestCase):
    """Who may write, and what plone.protect does and does not see."""

    def test_the_views_refuse_a_write_without_a_token(self):
        key = self.key()
        for view in ('@@zpgpool-add', '@@zpgpool-sql'):
            result = self.plone.post(view, key=key)
            self.assertEqual(result.status, 403, (view, result))
        self.assertNothingFor(key)

    def test_the_views_refuse_get(self):
        key = self.key()
        for view in ('@@zpgpool-add', '@@zpgpool-sql'):
            result = self.plone.get(view, token=self.token(), key=key)
            self.assertEqual(result.status, 403, (view, result))
        self.assertNothingFor(key)

    def test_an_anonymous_write_is_unauthorized(self):
        key = self.key()
        result = self.plone.post('@@zpgpool-add', auth=False, key=key)
        # Plone answers Unauthorized with a redirect to its login form.
        self.assertEqual(result.status, 302, result)
        self.assertNothingFor(key)

    def test_plone_protect_aborts_a_tokenless_zodb_write_with_200(self):
        """A view without its own check (testing.zcml) writes a Document
        and a row for a logged-in user who sent no token.  plone.protect
        sees the ZODB write and aborts the transaction, PostgreSQL's part
        with it; the answer is still the view's, with status 200."""
        # What plone.protect logs: for GET it aborts quietly, for POST its
        # Forbidden is logged by plone.transformchain instead of raised.
        logged = {'GET': 'aborting transaction due to no CSRF protection',
                  'POST': 'Form authenticator is invalid'}
        for method in ('GET', 'POST'):
            key = self.key()
            seen = len(self.plone.event_log())
            result = self.plone.request(method, '@@zpgpool-add-unchecked',
                                        key=key)
            self.assertEqual(result.status, 200, (method, result))
            self.assertEqual(result.json['key'], key)
            self.assertNothingFor(key)
            self.assertIn(logged[method], self.plone.event_log()[seen:])

    def test_plone_protect_does_not_see_a_postgresql_only_write(self):
        """The same without a ZODB write: plone.protect lets it through and
        the row is committed.  That is why the add-on's writing views check
        the token themselves."""
        key = self.key()
        result = self.plone.get('@@zpgpool-sql-unchecked', key=key)
        self.assertEqual(result.status, 200, result)
        self.assertEqual(self.notes(key), [('', 1)])


class SeveralPoolsTests(PloneTestCase):
    """The Document's rows go through the one-phase pool "plone"; the
    request then uses a second pool."""

    def test_a_second_writable_one_phase_pool_is_refused(self):
        key = self.key()
        result = self.add('@@zpgpool-two-pools', key=key,
                          second='plone_serial')
        self.assertEqual(result.status, 500, result)
        self.assertIn('ConnectionMisuse', result.text)
        self.assertNothingFor(key)
        self.assertEqual(self.sql(
            'SELECT count(*) FROM zpgpool_plone_vote WHERE token = %s',
            ('two-pools-' + key,)), [(0,)])

    def test_a_read_only_pool_may_join(self):
        key = self.key()
        result = self.add('@@zpgpool-two-pools', key=key,
                          second='plone_readonly')
        self.assertEqual(result.status, 200, result)
        self.assertAllFor(key, result)

    def test_a_two_phase_pool_may_join(self):
        key = self.key()
        result = self.add('@@zpgpool-two-pools', key=key, second='plone_2pc')
        self.assertEqual(result.status, 200, result)
        self.assertAllFor(key, result)
        self.assertEqual(self.sql(
            'SELECT count(*) FROM zpgpool_plone_vote WHERE token = %s',
            ('two-pools-' + key,)), [(1,)])
        self.assertEqual(self.prepared(), [])


class SerializableTests(PloneTestCase):
    """SERIALIZABLE transactions (pool "plone_serial") whose serialization
    failures the publisher retries; the site's zope.conf raises
    max-conflict-retries to 4."""

    def counter(self):
        name = self.key()
        self.sql('INSERT INTO zpgpool_plone_counter (name, n)'
                 ' VALUES (%s, 0)', (name,))
        return name

    def count(self, name):
        return self.sql('SELECT n FROM zpgpool_plone_counter'
                        ' WHERE name = %s', (name,))[0][0]

    def test_colliding_requests_are_retried_until_all_succeed(self):
        """Concurrent read-modify-write increments of one counter collide;
        the publisher retries the losers and every request succeeds exactly
        once."""
        name = self.counter()
        threads = self.layer.threads
        requests = 3 * threads
        since = len(self.plone.event_log())
        results = []
        # In bursts of one request per worker thread: a retried request
        # then competes only with its own burst, so that it rarely needs
        # more than the site's retries.
        for _ in range(requests // threads):
            token = self.token()
            results += self.concurrently([
                lambda: self.plone.post('@@zpgpool-counter', token=token,
                                        name=name, pause='0.05')] * threads)
        self.assertEqual([r.status for r in results], [200] * requests,
                         [r for r in results if not r.ok])
        self.assertEqual(self.count(name), requests)
        self.assertEqual(sorted(r.json['n'] for r in results),
                         list(range(1, requests + 1)))
        retries = [r.json['retries'] for r in results]
        logged = self.retries_logged('@@zpgpool-counter', since)
        self.report('%d concurrent SERIALIZABLE increments from %d clients:'
                    ' %d retries in all (per request: %s; the server logged'
                    ' %d), 0 failed' % (requests, threads, sum(retries),
                                        retries, logged))
        self.assertGreater(sum(retries), 0)
        self.assertEqual(logged, sum(retries))

    def test_max_conflict_retries_bounds_the_retries(self):
        """``collide=N`` makes the first N attempts meet a concurrent
        update for certain.  Four collisions need four retries, one more
        than Zope's default allows: with max-conflict-retries 4 the request
        succeeds; five collisions exhaust the retries, and the request
        fails without changing the counter."""
        retries = self.plone.retries
        name = self.counter()
        result = self.add('@@zpgpool-counter', name=name, collide=retries)
        self.assertEqual(result.status, 200, result)
        self.assertEqual(result.json['retries'], retries)
        self.assertEqual(self.count(name), 1)
        result = self.add('@@zpgpool-counter', name=name,
                          collide=retries + 1)
        self.assertEqual(result.status, 500, result)
        self.assertIn('SerializationFailure', result.text)
        self.assertEqual(self.count(name), 1)


class ThreadConnectionTests(WorkerThreadChecks, PloneTestCase):

    backend_view = '@@zpgpool-backend'
    sleepers_within = 20

    def assertWrites(self):
        key = self.key()
        result = self.add(key=key)
        self.assertEqual(result.status, 200, result)
        self.assertAllFor(key, result)
