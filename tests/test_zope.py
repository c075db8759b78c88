"""zpgpool inside a real Zope 6: the example product over HTTP.

ZOPE_LAYER (tests/zopehelpers.py) builds a throwaway Zope 6 instance with a
FileStorage in a temporary directory, loads examples/zpgpool_example, and
serves it with waitress (four worker threads) through Zope's runwsgi in a
subprocess, beside a private PostgreSQL server.  Every test talks to it
over real HTTP, and checks PostgreSQL with a connection of its own.
ZODB's state is seen through the example's ``@@example-read`` view, which
reads it in a fresh request, that is a fresh ZODB transaction.

Each test uses keys of its own, so that the tests share the one site.
"""
import unittest

from tests.sitechecks import SiteChecks
from tests.sitechecks import WorkerThreadChecks
from tests.zopehelpers import ZOPE_LAYER


class ZopeTestCase(SiteChecks, unittest.TestCase):

    layer = ZOPE_LAYER

    @property
    def zope(self):
        return self.layer.zope

    def rows(self, key):
        return self.sql('SELECT text, attempt FROM example_note'
                        ' WHERE key = %s ORDER BY id', (key,))

    def zodb_committed(self, gid):
        result = self.zope.get('@@example-zodb-committed', gid=gid)
        self.assertEqual(result.status, 200, result)
        return result.json['committed']

    def read(self, key):
        result = self.zope.get('@@example-read', key=key)
        self.assertEqual(result.status, 200, result)
        return result.json


class RequestTransactionTests(ZopeTestCase):
    """The transaction Zope's publisher begins for a request is the one
    the pool's connection joins."""

    def test_success_commits_the_zodb_object_and_the_row(self):
        for pool in ('example', 'example2pc'):
            key = self.key()
            result = self.zope.get('@@example-write', key=key, text='hello',
                                   pool=pool)
            self.assertEqual(result.status, 200, result)
            self.assertEqual(result.json['attempt'], 1)
            self.assertEqual(self.rows(key), [('hello', 1)], pool)
            if pool == 'example2pc':
                # The request's transaction carried zpgpool's transaction
                # id, and ZODB's record of that same transaction holds it.
                self.assertTrue(result.json['gid'].startswith(
                    'zpgpool:example2pc:'), result)
                self.assertTrue(self.zodb_committed(result.json['gid']))
            else:
                self.assertIsNone(result.json['gid'])
            self.assertEqual(self.read(key), {
                'key': key, 'zodb': 'hello',
                'postgres': [{'text': 'hello', 'attempt': 1}]})
        self.assertEqual(self.prepared(), [])

    def test_a_raising_view_leaves_neither(self):
        for pool in ('example', 'example2pc'):
            key = self.key()
            result = self.zope.get('@@example-write-fail', key=key,
                                   text='never', pool=pool)
            self.assertEqual(result.status, 500, result)
            self.assertEqual(self.rows(key), [], pool)
            self.assertEqual(self.read(key),
                             {'key': key, 'zodb': None, 'postgres': []})
        self.assertEqual(self.prepared(), [])

    def test_the_pools_stats(self):
        self.assertTrue(self.zope.get('@@example-write', key=self.key()).ok)
        stats = self.zope.get('@@example-stats').json
        self.assertEqual(sorted(stats), ['example', 'example2pc',
                                         'examplechecked', 'exampleserial'])
        for name, pool in stats.items():
            self.assertEqual(pool['name'], name)
            self.assertLessEqual(pool['size'], pool['maxconn'])
            self.assertFalse(pool['closed'])
        # This request is the only one running, and it is a stats request.
        self.assertEqual(stats['example']['in_use'], 0)
        self.assertGreaterEqual(stats['example']['checkouts'], 1)


class TwoPhaseTests(ZopeTestCase):
    """With twophase="true", PostgreSQL and ZODB commit both or neither."""

    def test_a_postgresql_vote_failure_leaves_zodb_untouched(self):
        # The view writes a ZODB object and a row, and inserts a duplicate
        # into a DEFERRABLE INITIALLY DEFERRED unique constraint: PREPARE
        # TRANSACTION fails in tpc_vote, after ZODB has voted, so ZODB's
        # vote is undone by tpc_abort.  The one-phase pool's COMMIT in
        # tpc_vote fails the same way.
        for pool in ('example2pc', 'example'):
            key = self.key()
            result = self.zope.get('@@example-vote-fail', key=key, pool=pool)
            self.assertEqual(result.status, 500, result)
            self.assertEqual(self.read(key),
                             {'key': key, 'zodb': None, 'postgres': []})
            self.assertEqual(self.rows(key), [])
            self.assertEqual(self.sql(
                'SELECT count(*) FROM example_vote WHERE token = %s',
                ('vote-' + key,)), [(0,)])
        self.assertEqual(self.prepared(), [])

    def test_a_zodb_conflict_leaves_no_row_and_no_prepared_transaction(self):
        """The first attempt conflicts in ZODB; the publisher retries.

        Zope's publisher retries a ConflictError (max-conflict-retries, 3
        by default; zope.conf cannot turn retries off), so a conflict is
        seen from outside as a retry.  The example's view makes its first
        attempt conflict for real: it changes a persistent mapping, and a
        second ZODB connection commits a change to the same mapping before
        the request commits.  The row that first attempt inserted must be
        gone, only the retry's row stays, and no prepared transaction is
        left behind.
        """
        key = self.key()
        result = self.zope.get('@@example-conflict', key=key, times=1)
        self.assertEqual(result.status, 200, result)
        self.assertEqual(result.json['attempt'], 2)
        self.assertEqual(self.rows(key), [('', 2)])
        self.assertTrue(self.zodb_committed(result.json['gid']))
        self.assertEqual(self.prepared(), [])

    def test_concurrent_writes_that_conflict_in_zodb_stay_consistent(self):
        """Concurrent requests change the same persistent mapping: ZODB
        refuses all but one commit of each overlapping group with a
        ConflictError, and the publisher retries them.  Afterwards every
        request that succeeded has its ZODB note and exactly one row, from
        the attempt that committed; a request that ran out of retries (not
        expected, but possible) has neither; no transaction stays
        prepared."""
        keys = [self.key() for _ in range(3 * ZOPE_LAYER.threads)]
        results = []
        for burst in range(3):
            chunk = keys[burst * ZOPE_LAYER.threads:
                         (burst + 1) * ZOPE_LAYER.threads]
            results += self.concurrently([
                (lambda key=key: self.zope.get(
                    '@@example-write', key=key, text=key, pool='example2pc',
                    pause='0.05'))
                for key in chunk])
        retries = 0
        for key, result in zip(keys, results):
            if result.ok:
                attempt = result.json['attempt']
                retries += attempt - 1
                self.assertEqual(self.rows(key), [(key, attempt)])
                self.assertEqual(self.read(key)['zodb'], key)
            else:
                self.assertEqual(self.rows(key), [])
                self.assertEqual(self.read(key)['zodb'], None)
        self.report('%d concurrent two-phase writes to one persistent'
                    ' mapping: %d ZODB conflicts retried, %d requests failed'
                    % (len(keys), retries, sum(not r.ok for r in results)))
        self.assertGreater(retries, 0)
        self.assertEqual(self.prepared(), [])

    def test_a_conflict_on_every_attempt_leaves_nothing(self):
        """Every attempt conflicts, so the request fails after the
        publisher's last retry; none of the four attempts' rows stays."""
        key = self.key()
        result = self.zope.get('@@example-conflict', key=key, times=99)
        self.assertEqual(result.status, 500, result)
        self.assertEqual(self.rows(key), [])
        self.assertEqual(self.read(key)['zodb'], None)
        self.assertEqual(self.prepared(), [])


class SerializableTests(ZopeTestCase):

    def test_colliding_requests_are_retried_and_all_succeed(self):
        """Concurrent read-modify-write increments of one counter in
        SERIALIZABLE transactions collide; the publisher retries the
        losers (zpgpool raises serialization failures as TransientErrors)
        and every request succeeds exactly once."""
        name = self.key()
        self.sql('INSERT INTO example_counter (name, n) VALUES (%s, 0)',
                 (name,))
        requests = 12

        def increment():
            return self.zope.get('@@example-counter', name=name,
                                 pause='0.05')

        # In bursts of one request per worker thread: a request retried
        # then competes only with its own burst, not with a stream of new
        # arrivals, so that it rarely needs more than the publisher's
        # three retries.
        results = []
        for _ in range(requests // ZOPE_LAYER.threads):
            results += self.concurrently([increment] * ZOPE_LAYER.threads)
        self.assertEqual([r.status for r in results], [200] * requests,
                         [r for r in results if not r.ok])
        self.assertEqual(self.sql('SELECT n FROM example_counter'
                                  ' WHERE name = %s', (name,)),
                         [(requests,)])
        self.assertEqual(sorted(r.json['n'] for r in results),
                         list(range(1, requests + 1)))
        retries = [r.json['retries'] for r in results]
        self.report('%d concurrent SERIALIZABLE increments from %d clients:'
                    ' %d retries in all (per request: %s)'
                    % (requests, ZOPE_LAYER.threads, sum(retries), retries))
        self.assertGreater(sum(retries), 0)


class CounterTests(ZopeTestCase):
    """``@@example-counter`` as a newcomer first calls it."""

    def counter(self, name):
        return self.sql('SELECT n FROM example_counter WHERE name = %s',
                        (name,))

    def test_a_missing_name_is_a_bad_request(self):
        for params in ({}, {'name': ''}, {'name': '  '}):
            result = self.zope.get('@@example-counter', **params)
            self.assertEqual(result.status, 400, (params, result))
            self.assertEqual(result.json, {
                'error': "give the counter's name: "
                         "@@example-counter?name=NAME"})

    def test_a_bad_pause_is_a_bad_request(self):
        name = self.key()
        for pause in ('soon', '-1', '2', 'nan'):
            result = self.zope.get('@@example-counter', name=name,
                                   pause=pause)
            self.assertEqual(result.status, 400, (pause, result))
            self.assertEqual(result.json, {
                'error': 'pause must be a number of seconds from 0 to 1,'
                         ' got %r' % pause})
        self.assertEqual(self.counter(name), [])

    def test_a_new_counter_starts_at_zero(self):
        name = self.key()
        self.assertEqual(self.counter(name), [])
        first = self.zope.get('@@example-counter', name=name)
        self.assertEqual(first.status, 200, first)
        self.assertEqual((first.json['name'], first.json['n']), (name, 1))
        second = self.zope.get('@@example-counter', name=name)
        self.assertEqual(second.json['n'], 2)
        self.assertEqual(self.counter(name), [(2,)])


class ThreadConnectionTests(WorkerThreadChecks, ZopeTestCase):

    backend_view = '@@example-backend'

    def test_a_restart_with_health_check_after_0(self):
        """A restart between requests costs at most one request per thread
        with health_check_after="0" (pool "examplechecked") too, which
        pings every connection before use."""
        self.restart_costs(pool='examplechecked')

    def assertWrites(self):
        key = self.key()
        result = self.zope.get('@@example-write', key=key, text='again')
        self.assertEqual(result.status, 200, result)
        self.assertEqual(self.read(key)['zodb'], 'again')
        self.assertEqual(self.rows(key), [('again', 1)])
