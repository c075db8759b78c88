"""What test_zope and test_plone check alike of their Zope site over HTTP.

``SiteChecks`` holds the helpers of both modules' test cases: PostgreSQL
seen from a connection of the test's own, requests sent concurrently.
``WorkerThreadChecks`` holds the tests of the worker threads'
connections, and of what a PostgreSQL restart costs them, that both
sites pass; a test case of either module mixes it in and names its
site's backend view.

Both are mixins, not TestCases, so that the test modules that import
them do not collect their tests a second time.
"""
import concurrent.futures
import time
import uuid

import psycopg2

from tests.scaleouthelpers import report


class SiteChecks:
    """Helpers for a ``unittest.TestCase`` whose layer is a
    ``tests.zopehelpers.ZopeLayer``."""

    def report(self, message):
        """Show a measured figure in the test output (-vv)."""
        report(self.__module__.rpartition('.')[2], message)

    def key(self):
        """A key no other test uses: a valid Plone id (no underscores, at
        most 49 characters)."""
        return '%s-%s' % (self._testMethodName.replace('_', '-')[:40],
                          uuid.uuid4().hex[:8])

    def sql(self, statement, params=None):
        """Run *statement* on a connection of the test's own, autocommit;
        return its rows."""
        conn = psycopg2.connect(self.layer.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(statement, params)
                if cursor.description is not None:
                    return cursor.fetchall()
                return None
        finally:
            conn.close()

    def prepared(self):
        return self.sql('SELECT gid FROM pg_prepared_xacts')

    def concurrently(self, calls, clients=None):
        """Run the callables *calls* from *clients* threads (default: one
        per call); return their results in order."""
        with concurrent.futures.ThreadPoolExecutor(
                clients or len(calls)) as executor:
            return list(executor.map(lambda call: call(), calls))


def publisher_retries(results):
    """A note of how often the publisher retried the successful *results*,
    for a report, or '' when the backend view does not say (the example
    product's does not)."""
    ok = [r for r in results if r.ok]
    if not all('attempt' in r.json for r in ok):
        return ''
    return ', %d retried by the publisher' % sum(
        r.json['attempt'] - 1 for r in ok)


class WorkerThreadChecks(SiteChecks):
    """Each worker thread keeps its connection, and a PostgreSQL restart
    costs at most one request per thread.

    The test case names its site's ``backend_view``, which answers the
    worker thread's name and its connection's backend pid (and, with
    ``sleep=SECONDS``, makes PostgreSQL sleep first), and says how a
    write after a restart is checked (``assertWrites``).
    """

    backend_view = None
    #: How long requests in flight may take to reach PostgreSQL.
    sleepers_within = 10

    def assertWrites(self):
        raise NotImplementedError

    def backends(self, rounds, **params):
        """The answers of *rounds* rounds of one ``backend_view`` request
        per worker thread at once."""
        seen = []
        for _ in range(rounds):
            seen += self.concurrently(
                [lambda: self.layer.zope.get(self.backend_view, **params)]
                * self.layer.threads)
        return seen

    def test_each_worker_thread_keeps_its_connection(self):
        results = self.backends(rounds=8)
        self.assertTrue(all(r.ok for r in results), results)
        pids = {}
        for r in results:
            pids.setdefault(r.json['thread'], set()).add(
                r.json['backend_pid'])
        self.report('backend pids per worker thread over %d requests: %s'
                    % (len(results),
                       {t: sorted(p) for t, p in pids.items()}))
        self.assertGreater(len(pids), 1)
        for thread, thread_pids in pids.items():
            self.assertEqual(len(thread_pids), 1, (thread, thread_pids))
        # Different threads, different connections.
        all_pids = [p for thread_pids in pids.values() for p in thread_pids]
        self.assertEqual(len(all_pids), len(set(all_pids)))

    def restart_costs(self, pool=None):
        """Restart PostgreSQL between requests, then send rounds of
        requests (to *pool*, default: the view's) until every worker
        thread has answered; check and report how many failed."""
        threads = self.layer.threads
        params = {} if pool is None else {'pool': pool}
        before = self.backends(rounds=3, **params)
        self.assertTrue(all(r.ok for r in before), before)
        old_pids = {r.json['backend_pid'] for r in before}
        try:
            self.layer.server.stop('fast')
            self.layer.server.start()
            after = []
            for _ in range(20):
                after += self.backends(rounds=1, **params)
                served = {r.json['thread'] for r in after if r.ok}
                if len(served) == threads and len(after) >= 20:
                    break
            self.assertEqual(len(served), threads, after)
            failed = [r for r in after if not r.ok]
            self.report('pool %s, after a PostgreSQL restart between'
                        ' requests: %d of %d requests failed (bound: %d, one'
                        ' per worker thread)%s'
                        % (pool or "the view's default", len(failed),
                           len(after), threads, publisher_retries(after)))
            # A thread meets its dead connection at most once.  Which
            # requests those are depends on the order the connections were
            # opened in: a connection found dead retires those opened
            # before it, not those opened after it.
            self.assertLessEqual(len(failed), threads, failed)
            self.assertTrue(all(r.status == 500 for r in failed), failed)
            new_pids = {r.json['backend_pid'] for r in after if r.ok}
            self.assertFalse(old_pids & new_pids)
            # Every thread has a live connection now: nothing fails.
            again = self.backends(rounds=2, **params)
            self.assertTrue(all(r.ok for r in again), again)
        finally:
            # The site's other pools still hold dead connections, which
            # would fail the first requests of the next tests: start the
            # site afresh.
            self.layer.zope.restart()

    def test_a_restart_between_requests_costs_at_most_one_per_thread(self):
        """Between requests no request is in flight, so none should fail:
        a thread's dead connection is pinged once another was found dead,
        and a session lost by a request's first statement is retried by
        the publisher.  The figure is reported; the bound asserted is one
        failed request per worker thread, and none once every thread has
        answered."""
        self.restart_costs()

    def test_a_restart_costs_only_the_requests_in_flight(self):
        """One request per worker thread is in flight, sleeping in
        PostgreSQL, when the server stops: only those may fail, and no
        request after the restart does, because each thread's broken
        connection is discarded with the request that met it.  (The sleep
        is the request's first statement, so its lost session is a
        SessionLost that the publisher may retry on a new connection; a
        retried request succeeds.)"""
        threads = self.layer.threads
        before = self.backends(rounds=2)
        self.assertTrue(all(r.ok for r in before), before)
        executor = concurrent.futures.ThreadPoolExecutor(threads)
        try:
            in_flight = [executor.submit(self.layer.zope.get,
                                         self.backend_view, sleep=5)
                         for _ in range(threads)]
            self.wait_for_sleepers(threads)
            self.layer.server.stop('fast')
            self.layer.server.start()
            in_flight = [f.result() for f in in_flight]
        finally:
            executor.shutdown()
        try:
            statuses = [r.status for r in in_flight]
            self.assertTrue(set(statuses) <= {200, 500}, in_flight)
            after = self.backends(rounds=5)
            failed = [r for r in after if not r.ok]
            self.report('a PostgreSQL restart with %d requests in flight: %d'
                        ' of them failed%s; %d of the %d requests after it'
                        ' failed' % (len(in_flight), statuses.count(500),
                                     publisher_retries(in_flight),
                                     len(failed), len(after)))
            self.assertEqual(failed, [])
        finally:
            self.layer.zope.restart()

    def wait_for_sleepers(self, count):
        deadline = time.monotonic() + self.sleepers_within
        # The first statement of a transaction travels behind its BEGIN.
        while self.sql("SELECT count(*) FROM pg_stat_activity WHERE query"
                       " LIKE '%SELECT pg_sleep(%' AND pid <>"
                       " pg_backend_pid()")[0][0] < count:
            self.assertLess(time.monotonic(), deadline,
                            'the requests did not reach PostgreSQL')
            time.sleep(0.05)

    def test_the_site_writes_after_a_restart(self):
        try:
            self.layer.server.stop('fast')
            self.layer.server.start()
        finally:
            self.layer.zope.restart()
        self.assertWrites()
