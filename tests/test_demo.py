"""Tests for zpgpool.demo and ``zpgpool demo``.

The application is tested through WebTest with the pool its ZCML declares,
against the real server of POSTGRES_LAYER; the command runs in-process with
``--check`` and as a process of its own, served until SIGINT or SIGTERM,
with and without a throwaway server.
"""
import contextlib
import io
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.request

import psycopg2
import transaction
import webtest
import zope.component.testing
from zope.component import getUtility
from zope.configuration import xmlconfig

import zpgpool.demo
from zpgpool import cli
from zpgpool import testing
from zpgpool.demo import app as demo_app
from zpgpool.demo.check import run_check
from zpgpool.interfaces import IConnectionPool
from zpgpool.testing import POSTGRES_LAYER


from tests.poolhelpers import closed_port
from tests.poolhelpers import run_cli as run
from tests.support import python_env


def running(pid):
    """Tell whether process ``pid`` runs: it exists and is no zombie (an
    exited postmaster stays one until whoever inherited it reaps it)."""
    try:
        with open('/proc/%d/stat' % pid, encoding='ascii') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ('Z', 'X')


def load_demo_zcml(dsn):
    """Register the demo's pool as ``zpgpool demo`` does."""
    os.environ[cli.DEMO_DSN_ENV] = dsn
    try:
        xmlconfig.file('demo.zcml', package=zpgpool.demo)
    finally:
        del os.environ[cli.DEMO_DSN_ENV]
    return getUtility(IConnectionPool, name=demo_app.POOL_NAME)


class DemoAppTests(unittest.TestCase):
    """The views, through WebTest, with the pool of demo.zcml."""

    layer = POSTGRES_LAYER

    def setUp(self):
        zope.component.testing.setUp()
        self.dsn = self.layer.new_database('zpgpool_demo')
        self.pool = load_demo_zcml(self.dsn)
        demo_app.create_schema(self.pool)
        self.app = webtest.TestApp(demo_app.make_app())

    def tearDown(self):
        transaction.abort()
        self.pool.close(timeout=0)
        zope.component.testing.tearDown()

    def committed(self):
        """The notes another session sees, oldest first."""
        with contextlib.closing(psycopg2.connect(self.dsn)) as conn:
            cur = conn.cursor()
            cur.execute('SELECT text, thread FROM zpgpool_demo_note'
                        ' ORDER BY id')
            return cur.fetchall()

    def test_zcml_declares_the_pool(self):
        self.assertEqual(self.pool.name, 'demo')
        self.assertEqual(self.pool.maxconn, 3)
        self.assertIn('password=***', self.pool.dsn)

    def test_create_schema_twice(self):
        demo_app.create_schema(self.pool)
        self.assertEqual(self.committed(), [])

    def test_empty_home(self):
        page = self.app.get('/')
        self.assertEqual(page.content_type, 'text/html')
        self.assertIn('<h1>Notes</h1>', page.text)
        self.assertIn('No notes yet.', page.text)
        self.assertIn("The pool <b>demo</b> has", page.text)

    def test_add_from_the_form(self):
        page = self.app.get('/')
        form = page.forms[0]
        form['text'] = 'hello <b>world</b>'
        response = form.submit()
        self.assertEqual(response.status_int, 303)
        self.assertEqual(response.location, 'http://localhost/')
        [(text, thread)] = self.committed()
        self.assertEqual(text, 'hello <b>world</b>')
        page = response.follow()
        self.assertIn('hello &lt;b&gt;world&lt;/b&gt;', page.text)
        self.assertIn('<td>%s</td>' % thread, page.text)

    def test_home_lists_the_notes_newest_first(self):
        for text in ('first', 'second', 'third'):
            self.app.post('/notes', {'text': text})
        page = self.app.get('/').text
        positions = [page.find('<td>%s</td>' % text)
                     for text in ('third', 'second', 'first')]
        self.assertNotIn(-1, positions, page)
        self.assertEqual(positions, sorted(positions))

    def test_add_as_json(self):
        response = self.app.post('/notes', {'text': ' a note '},
                                 headers={'Accept': 'application/json'},
                                 status=201)
        note = response.json
        self.assertEqual(note['text'], 'a note')
        self.assertEqual(sorted(note), ['backend_pid', 'created', 'id',
                                        'text', 'thread'])
        self.assertEqual(response.location, 'http://localhost/notes')
        self.assertEqual(self.committed(), [('a note', note['thread'])])

    def test_add_refuses_empty_and_long_notes(self):
        for text in ('', '   ', 'x' * (demo_app.MAX_TEXT + 1)):
            response = self.app.post('/notes', {'text': text}, status=400)
            self.assertIn("The form field 'text' must hold 1 to 500 "
                          "characters.", response.text)
        self.app.post('/notes', {}, status=400)
        self.assertEqual(self.committed(), [])

    def test_list_as_json(self):
        for text in ('apple', 'banana', 'apricot'):
            self.app.post('/notes', {'text': text})
        notes = self.app.get('/notes').json['notes']
        self.assertEqual([n['text'] for n in notes],
                         ['apricot', 'banana', 'apple'])
        notes = self.app.get('/notes', {'prefix': 'ap'}).json['notes']
        self.assertEqual([n['text'] for n in notes], ['apricot', 'apple'])

    def test_fail_leaves_nothing_behind(self):
        self.app.post('/notes', {'text': 'kept'})
        response = self.app.post('/fail', {'text': 'lost'}, status=500)
        self.assertIn('DemoFailure', response.text)
        self.assertRegex(response.text, r'inserted note \d+, then failed on'
                                        r' purpose')
        self.assertEqual([t for t, _ in self.committed()], ['kept'])

    def test_fail_inserts_before_it_fails(self):
        # The failing request did insert its note (it took an id), and
        # the abort rolled it back.
        kept = self.app.post('/notes', {'text': 'kept'},
                             headers={'Accept': 'application/json'}).json
        response = self.app.post('/fail', {'text': 'lost'}, status=500)
        self.assertIn('inserted note %d, then failed on purpose'
                      % (kept['id'] + 1), response.text)
        after = self.app.post('/notes', {'text': 'after'},
                              headers={'Accept': 'application/json'}).json
        self.assertEqual(after['id'], kept['id'] + 2)
        self.assertEqual([t for t, _ in self.committed()], ['kept', 'after'])

    def test_a_note_records_the_thread_that_served_it(self):
        def post():
            self.app.post('/notes', {'text': 'from a worker'})
        worker = threading.Thread(target=post, name='demo-test-worker')
        worker.start()
        worker.join(30)
        self.assertFalse(worker.is_alive())
        self.assertEqual(self.committed(),
                         [('from a worker', 'demo-test-worker')])

    def test_metrics(self):
        from prometheus_client.exposition import CONTENT_TYPE_LATEST
        response = self.app.get('/metrics')
        self.assertEqual(response.headers['Content-Type'],
                         CONTENT_TYPE_LATEST)
        self.assertIn('zpgpool_maxconn{pool="demo"} 3.0', response.text)

    def test_fail_without_text(self):
        self.app.get('/fail', status=500)
        self.assertEqual(self.committed(), [])

    def test_connection_is_back_after_each_request(self):
        for i in range(3):
            self.app.post('/notes', {'text': 'n%d' % i})
            stats = self.app.get('/stats').json
            self.assertEqual(stats['in_use'], 0)
            self.assertEqual(stats['size'], 1)
        # One thread, one connection: parked with its thread in between.
        self.assertEqual(len({n['backend_pid'] for n in
                              self.app.get('/notes').json['notes']}), 1)

    def test_stats(self):
        response = self.app.get('/stats')
        self.assertEqual(response.content_type, 'application/json')
        self.assertIn('no-store', response.headers['Cache-Control'])
        self.assertEqual(response.json, json.loads(json.dumps(
            self.pool.stats())))
        # The dashboard on /stats.html is tested in test_dashboard.

    def test_transaction_manager_is_the_pools(self):
        request = type('Request', (), {})()
        self.assertIs(demo_app._transaction_manager(request),
                      self.pool.transaction_manager)


class DemoCheckTests(unittest.TestCase):
    """``zpgpool demo --check`` and its scripted session."""

    layer = POSTGRES_LAYER

    def setUp(self):
        zope.component.testing.setUp()
        self.tmp = tempfile.mkdtemp(prefix='zpgpool-test-demo-')
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def tearDown(self):
        zope.component.testing.tearDown()

    def failed_check(self, app, clients, notes):
        """Run the demo's check against *app*, served by the demo's web
        server: it must fail; return the lines it wrote."""
        web = cli._WebServer(app, '127.0.0.1', 0, 2)
        web.start()
        try:
            out = io.StringIO()
            self.assertFalse(run_check(web.url, clients=clients, notes=notes,
                                       out=out))
        finally:
            web.stop()
        self.assertFalse(web.thread.is_alive())
        return out.getvalue().splitlines()

    def test_demo_check(self):
        dsn = self.layer.new_database('zpgpool_demo')
        status, out, err = run('demo', '--check', '--dsn', dsn,
                               '--threads', '3')
        self.assertEqual(status, 0, out + err)
        self.assertEqual(err, '')
        self.assertNotIn('FAIL ', out)
        self.assertNotIn('throwaway', out)
        self.assertRegex(out, r"pool 'demo' \(host=.* password=\*\*\*\), "
                              r"maxconn 3, 3 server threads")
        self.assertIn('ok    POST /notes from several clients at once (18 '
                      'notes from 6 clients)', out)
        self.assertIn('ok    /fail inserts, raises, and leaves nothing behind',
                      out)
        self.assertIn('ok    GET /stats adds up after the requests', out)
        self.assertTrue(out.endswith('zpgpool demo: check passed\n'))
        self.assertEqual(len([line for line in out.splitlines()
                              if line.startswith('ok    ')]), 6)
        self.assertTrue(getUtility(IConnectionPool, name='demo').closed)
        # The DSN, password and all, went through the environment for the
        # ZCML only.
        self.assertNotIn(cli.DEMO_DSN_ENV, os.environ)
        # A second run against the same database, which holds the notes of
        # the first, passes too; the environment is left as it was.
        os.environ[cli.DEMO_DSN_ENV] = 'as it was'
        try:
            # The DSN read from a file, as --dsn file:PATH allows.
            path = os.path.join(self.tmp, 'dsn')
            with open(path, 'w') as f:
                f.write(dsn + '\n')
            status, out, err = run('demo', '--check', '--dsn',
                                   'file:' + path)
            self.assertEqual(os.environ[cli.DEMO_DSN_ENV], 'as it was')
        finally:
            del os.environ[cli.DEMO_DSN_ENV]
        self.assertEqual(status, 0, out + err)

    def test_a_failed_check_exits_1(self):
        # A database whose notes table refuses the inserts (a trigger): the
        # demo's views fail for real, and so does the check.
        dsn = self.layer.new_database('zpgpool_demo')
        with contextlib.closing(psycopg2.connect(dsn)) as conn:
            with conn, conn.cursor() as cur:
                cur.execute(demo_app._SCHEMA)
                cur.execute(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE"
                    " plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused by the"
                    " test'; END $$;"
                    " CREATE TRIGGER refuse BEFORE INSERT ON"
                    " zpgpool_demo_note FOR EACH ROW EXECUTE FUNCTION"
                    " refuse()")
        status, out, err = run('demo', '--check', '--dsn', dsn,
                               '--threads', '1')
        self.assertIn('FAIL  ', out)
        self.assertTrue(out.endswith('zpgpool demo: check FAILED\n'), out)
        self.assertEqual(status, 1, out + err)

    def test_no_server_binaries(self):
        saved = os.environ.get(testing.BINDIR_ENV)
        os.environ[testing.BINDIR_ENV] = '/nonexistent'
        try:
            status, out, err = run('demo', '--check')
        finally:
            if saved is None:
                del os.environ[testing.BINDIR_ENV]
            else:  # pragma: no cover
                os.environ[testing.BINDIR_ENV] = saved
        self.assertEqual(status, 1)
        self.assertIn("zpgpool demo: error: cannot start a throwaway "
                      "PostgreSQL server: ZPGPOOL_PG_BINDIR='/nonexistent' is"
                      " not a directory holding initdb", err)
        self.assertTrue(err.endswith('\nOr give the demo a server with '
                                     '--dsn.\n'))

    def test_demo_dependencies_missing(self):
        # What a user who installed zpgpool without the demo extra sees.
        with unittest.mock.patch.dict(sys.modules, {'waitress': None}):
            status, out, err = run('demo', '--check')
        self.assertEqual(status, 1)
        self.assertIn('the demo needs pyramid, pyramid_tm and waitress', err)
        self.assertIn("pip install 'zpgpool[demo]'", err)

    def test_signals_handled_only_in_the_main_thread(self):
        self.assertEqual(set(cli.STOP_SIGNALS),
                         {signal.SIGTERM, signal.SIGHUP})
        seen = []

        def in_thread():
            with cli._stop_on_signals():
                seen.append([signal.getsignal(s) for s in cli.STOP_SIGNALS])

        before = [signal.getsignal(s) for s in cli.STOP_SIGNALS]
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        self.assertEqual(seen, [before])
        with cli._stop_on_signals():
            during = [signal.getsignal(s) for s in cli.STOP_SIGNALS]
            for handler, previous in zip(during, before):
                self.assertIsNot(handler, previous)
            with self.assertRaises(cli._Stop):
                signal.raise_signal(signal.SIGHUP)
        self.assertEqual([signal.getsignal(s) for s in cli.STOP_SIGNALS],
                         before)

    def test_stop_finishes_the_requests_in_progress(self):
        # A request is running in a worker thread when stop() is called:
        # it gets its whole answer, the server closes nothing under the
        # worker's feet (once, EBADF came from a worker writing to the
        # closed trigger), and waitress logs no error.
        entered, release = threading.Event(), threading.Event()

        def slow(environ, start_response):
            entered.set()
            release.wait(30)
            start_response('200 OK', [('Content-Type', 'text/plain')])
            return [b'answered after stop() began']

        logged = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = logged.append
        logger = logging.getLogger('waitress')
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        web = cli._WebServer(slow, '127.0.0.1', 0, 2)
        web.start()
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            urllib.request.urlopen(web.url, timeout=30).read()))
        client.start()
        self.assertTrue(entered.wait(30))
        stopper = threading.Thread(target=web.stop)
        stopper.start()
        # stop() closes the listening socket first, and waits for the
        # request.
        host, port = web.url[len('http://'):-1].rsplit(':', 1)
        for _ in range(300):
            try:
                socket.create_connection((host, int(port)), 1).close()
            except (ConnectionRefusedError, ConnectionResetError):
                # Reset: it was still waiting to be accepted when the
                # listening socket was closed.
                break
            time.sleep(0.01)
        else:  # pragma: no cover - only when it is broken
            self.fail('stop() did not close the listening socket')
        self.assertTrue(stopper.is_alive())
        release.set()
        stopper.join(30)
        client.join(30)
        self.assertFalse(stopper.is_alive())
        self.assertEqual(answers, [b'answered after stop() began'])
        self.assertFalse(web.thread.is_alive())
        self.assertEqual([r.getMessage() for r in logged], [])

    def test_stop_sends_the_rest_of_an_answer(self):
        # The client has not read its answer yet, so most of it is still
        # in waitress's buffer when stop() begins: it is sent whole before
        # the connection is closed.
        size = 12 * 1024 * 1024      # more than the socket buffers hold
        buffered = threading.Event()

        class Body(list):
            def close(self):         # waitress calls it once all is buffered
                buffered.set()

        def big(environ, start_response):
            start_response('200 OK', [('Content-Length', str(size))])
            return Body([b'x' * size])

        web = cli._WebServer(big, '127.0.0.1', 0, 2)
        web.start()
        host, port = web.url[len('http://'):-1].rsplit(':', 1)
        client = socket.create_connection((host, int(port)), 30)
        self.addCleanup(client.close)
        client.sendall(b'GET / HTTP/1.1\r\nHost: test\r\n\r\n')
        self.assertTrue(buffered.wait(30))
        pending = [c for c in list(web.server._map.values())
                   if getattr(c, 'total_outbufs_len', 0)]
        self.assertEqual(len(pending), 1,
                         'nothing left in the buffer: the test shows nothing')
        [channel] = pending
        stopper = threading.Thread(target=web.stop)
        stopper.start()
        # Read only once stop() has dealt with the connection (marked it
        # to close when flushed, or closed it): reading earlier would
        # empty the buffer first.
        for _ in range(3000):
            if getattr(channel, 'close_when_flushed', False) \
                    or channel not in list(web.server._map.values()):
                break
            time.sleep(0.01)
        else:  # pragma: no cover - only when it is broken
            self.fail('stop() did not come to the connection')
        received = bytearray()
        while True:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        stopper.join(30)
        self.assertFalse(stopper.is_alive())
        head, _, body = bytes(received).partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 200 OK'), head)
        self.assertEqual(len(body), size)

    def test_ipv6_url(self):
        try:
            web = cli._WebServer(lambda environ, start_response: [], '::1', 0,
                                 1)
        except OSError:  # pragma: no cover - a host without IPv6
            self.skipTest('no IPv6 loopback address')
        web.start()
        web.stop()
        self.assertRegex(web.url, r'^http://\[::1\]:\d+/$')

    def test_database_unreachable(self):
        dsn = psycopg2.extensions.make_dsn(self.layer.dsn,
                                           port=closed_port())
        status, out, err = run('demo', '--check', '--dsn', dsn)
        self.assertEqual(status, 1)
        self.assertIn('zpgpool demo: error: cannot use the database: '
                      "zpgpool pool 'demo': cannot connect to", err)
        self.assertIn('Connection refused', err)

    def test_port_taken(self):
        with socket.socket() as taken:
            taken.bind(('127.0.0.1', 0))
            taken.listen()
            port = taken.getsockname()[1]
            status, out, err = run('demo', '--check', '--dsn',
                                   self.layer.new_database('zpgpool_demo'),
                                   '--port', str(port))
        self.assertEqual(status, 1)
        self.assertIn('zpgpool demo: error: cannot listen on 127.0.0.1:%d: '
                      % port, err)

    def test_check_reports_a_server_that_is_gone(self):
        out = io.StringIO()
        url = 'http://127.0.0.1:%d/' % closed_port()
        self.assertFalse(run_check(url, clients=2, notes=2, out=out))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 6)
        for line in lines:
            self.assertTrue(line.startswith('FAIL  '), line)
        self.assertIn('Connection refused', lines[0])

    def test_check_reports_wrong_answers(self):
        # An application that gets everything wrong, to see that each step
        # notices; the real demo cannot be made to misbehave on demand.
        def wrong(environ, start_response):
            path = environ['PATH_INFO']
            method = environ['REQUEST_METHOD']
            if path == '/stats':
                body = json.dumps({
                    'in_use': 1, 'size': 5, 'maxconn': 3, 'idle': 1,
                    'bound_idle': 0, 'timeouts': 2, 'waiting': 1,
                    'checkouts': 0, 'waits': 0}).encode()
                ctype = 'application/json'
            elif path == '/notes' and method == 'GET':
                body = b'{"notes": []}'
                ctype = 'application/json'
            elif path == '/notes':
                length = int(environ.get('CONTENT_LENGTH') or 0)
                environ['wsgi.input'].read(length)
                body = b'{"text": "something else"}'
                ctype = 'application/json'
                start_response('201 Created', [('Content-Type', ctype)])
                return [body]
            else:
                body = b'<p>no</p>'
                ctype = 'text/html'
            start_response('200 OK', [('Content-Type', ctype)])
            return [body]

        lines = self.failed_check(wrong, clients=2, notes=2)
        self.assertEqual(lines[0], 'FAIL  GET / shows the notes page: '
                                   'answered 200 text/html')
        self.assertRegex(lines[1], r"^FAIL  POST /notes from several clients"
                                   r" at once: 2 of 2 failed; first: "
                                   r"'check-\w+ note \d' came back as "
                                   r'\{"text": "something else"\}$')
        self.assertRegex(lines[2], r'^FAIL  GET /notes lists every note '
                                   r'once: expected 2 notes, got 0 \(missing:'
                                   r' check-\w+ note 0, check-\w+ note 1\)$')
        self.assertEqual(lines[3], 'FAIL  /fail inserts, raises, and leaves '
                                   'nothing behind: expected 500, got 200')
        self.assertEqual(lines[4], 'FAIL  GET /stats adds up after the '
                                   'requests: in_use is 1, not 0; size 5 is '
                                   'above maxconn 3; size 5 != idle 1 + '
                                   'bound_idle 0 + in_use 1; 2 callers timed '
                                   'out; 1 callers still waiting')
        self.assertEqual(lines[5], 'FAIL  GET /stats.html shows the '
                                   'dashboard, fed by /stats/snapshot.json: '
                                   'answered 200 text/html')

    def test_check_reports_other_wrong_answers(self):
        def wrong(environ, start_response):
            path = environ['PATH_INFO']
            query = environ['QUERY_STRING']
            if environ['REQUEST_METHOD'] == 'POST':
                length = int(environ.get('CONTENT_LENGTH') or 0)
                environ['wsgi.input'].read(length)
            if path == '/fail':
                start_response('500 Internal Server Error',
                               [('Content-Type', 'text/html')])
                return [b'failed']
            if path == '/notes' and 'failed' in query:
                start_response('200 OK', [('Content-Type',
                                           'application/json')])
                return [b'{"notes": [{"text": "left behind"}]}']
            start_response('404 Not Found', [('Content-Type', 'text/plain')])
            return [b'not here']

        lines = self.failed_check(wrong, clients=1, notes=1)
        self.assertEqual(lines[0], 'FAIL  GET / shows the notes page: '
                                   'answered 404 text/plain')
        self.assertRegex(lines[1], r"^FAIL  POST /notes from several clients"
                                   r" at once: 1 of 1 failed; first: "
                                   r"'check-\w+ note 0' answered 404 "
                                   r"text/plain$")
        self.assertRegex(lines[2], r'^FAIL  GET /notes lists every note '
                                   r'once: GET /notes\?prefix=check-\w+\+note'
                                   r' answered 404 text/plain$')
        self.assertEqual(lines[3], "FAIL  /fail inserts, raises, and leaves "
                                   "nothing behind: the note of the failed "
                                   "request was committed: [{'text': 'left "
                                   "behind'}]")
        self.assertEqual(lines[4], 'FAIL  GET /stats adds up after the '
                                   'requests: GET /stats answered 404 '
                                   'text/plain')


class DemoArgumentTests(unittest.TestCase):
    """``zpgpool demo`` refusing what it cannot run with, before it starts
    any server."""

    def test_threads(self):
        status, out, err = run('demo', '--threads', '0')
        self.assertEqual(status, 1)
        self.assertIn('--threads must be 1 or more, got 0', err)
        self.assertNotIn('throwaway', out)

    def test_dsn_from_an_unset_variable(self):
        variable = 'ZPGPOOL_TEST_DEMO_%s' % secrets.token_hex(4).upper()
        self.assertNotIn(variable, os.environ)
        status, out, err = run('demo', '--check', '--dsn', 'env:' + variable)
        self.assertEqual(status, 1)
        self.assertIn("zpgpool demo: error: --dsn: the environment variable "
                      "'%s' is not set" % variable, err)
        self.assertNotIn('throwaway', out)


class DemoProcessTests(unittest.TestCase):
    """``zpgpool demo`` as a user runs it: a process served until a signal.
    """

    layer = POSTGRES_LAYER

    def start(self, *args, under=(), ready='press Ctrl-C to stop'):
        """Start ``zpgpool demo *args`` (run by the command ``under``, if
        given); return the process and what it printed until a line with
        ``ready``."""
        # With faulthandler, SIGABRT makes it print every thread's stack:
        # what stop() asks for when it hangs.
        proc = subprocess.Popen(
            list(under)
            + [sys.executable, '-X', 'faulthandler', '-m', 'zpgpool', 'demo']
            + list(args),
            env=python_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.addCleanup(self.kill, proc)
        # A thread reads the output, so that waiting for a line has a
        # time-out.
        self.output = queue.Queue()
        reader = threading.Thread(target=self.read, args=(proc,),
                                  daemon=True)
        reader.start()
        lines = []
        while True:
            try:
                line = self.output.get(timeout=120)
            except queue.Empty:  # pragma: no cover - only when it hangs
                line = None
            if line is None:
                self.fail('the demo did not start:\n%s' % ''.join(lines))
            lines.append(line)
            if ready in line:
                return proc, lines

    def read(self, proc):
        for line in proc.stdout:
            self.output.put(line)
        self.output.put(None)

    def kill(self, proc):
        if proc.poll() is None:  # pragma: no cover - only when a test failed
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def url(self, lines):
        for line in lines:
            if line.startswith('zpgpool demo: serving '):
                return line.split()[-1]
        self.fail('no URL in:\n%s' % ''.join(lines))  # pragma: no cover

    def stop(self, proc, signum):
        """Send ``signum``; return the exit status and the rest of the
        output."""
        proc.send_signal(signum)
        try:
            status = proc.wait(60)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang
            proc.send_signal(signal.SIGABRT)
            proc.wait(30)
            rest = []
            while True:
                line = self.output.get(timeout=30)
                if line is None:
                    break
                rest.append(line)
            self.fail('the demo did not stop within 60 s of signal %d; its '
                      'threads:\n%s' % (signum, ''.join(rest)))
        rest = []
        while True:
            line = self.output.get(timeout=60)
            if line is None:
                return status, ''.join(rest)
            rest.append(line)

    def test_serves_until_sigint(self):
        dsn = self.layer.new_database('zpgpool_demo')
        proc, lines = self.start('--dsn', dsn, '--threads', '2')
        url = self.url(lines)
        self.assertRegex(url, r'^http://127\.0\.0\.1:\d+/$')
        request = urllib.request.Request(
            url + 'notes', data=b'text=from+the+test',
            headers={'Accept': 'application/json'})
        with urllib.request.urlopen(request, timeout=30) as response:
            self.assertEqual(response.status, 201)
        with urllib.request.urlopen(url, timeout=30) as response:
            self.assertIn(b'from the test', response.read())
        status, rest = self.stop(proc, signal.SIGINT)
        self.assertEqual(status, 0, rest)
        self.assertIn('zpgpool demo: interrupted; stopping', rest)
        # Everything it started is stopped: nobody listens any more.
        with self.assertRaises(OSError):
            urllib.request.urlopen(url, timeout=5)

    def test_throwaway_server_removed_on_sigterm(self):
        proc, lines = self.start()
        text = ''.join(lines)
        self.assertIn('zpgpool demo: starting a throwaway PostgreSQL server',
                      text)
        base_dir = text.split(', in ')[1].split(' (removed')[0]
        self.assertTrue(os.path.isdir(base_dir), text)
        with urllib.request.urlopen(self.url(lines) + 'stats',
                                    timeout=30) as response:
            self.assertEqual(json.load(response)['name'], 'demo')
        status, rest = self.stop(proc, signal.SIGTERM)
        self.assertEqual(status, 0, rest)
        self.assertIn('zpgpool demo: removing the throwaway PostgreSQL server',
                      rest)
        self.assertFalse(os.path.exists(base_dir))

    def test_throwaway_server_removed_on_sighup(self):
        # Closing the terminal sends SIGHUP: the demo stops as on SIGTERM,
        # and its PostgreSQL server goes with it.
        proc, lines = self.start()
        text = ''.join(lines)
        base_dir = text.split(', in ')[1].split(' (removed')[0]
        with open(os.path.join(base_dir, 'data', 'postmaster.pid')) as f:
            postmaster = int(f.readline())
        self.assertTrue(running(postmaster))
        with urllib.request.urlopen(self.url(lines) + 'stats',
                                    timeout=30) as response:
            self.assertEqual(json.load(response)['name'], 'demo')
        status, rest = self.stop(proc, signal.SIGHUP)
        self.assertEqual(status, 0, rest)
        self.assertIn('zpgpool demo: interrupted; stopping', rest)
        self.assertIn('zpgpool demo: removing the throwaway PostgreSQL server',
                      rest)
        self.assertFalse(os.path.exists(base_dir))
        self.assertFalse(running(postmaster))

    def test_check_interrupted_fails(self):
        # Ctrl-C during --check: the check did not pass, so the exit
        # status says so, and everything is stopped as on any Ctrl-C.
        dsn = self.layer.new_database('zpgpool_demo')
        proc, lines = self.start('--dsn', dsn, '--check',
                                 ready='zpgpool demo: checking ')
        status, rest = self.stop(proc, signal.SIGINT)
        self.assertIn('zpgpool demo: interrupted; stopping', rest)
        self.assertNotIn('check passed', rest)
        self.assertEqual(status, 1, rest)

    def test_nohup_outlives_its_terminal(self):
        # Started under nohup, which ignores SIGHUP, the demo leaves SIGHUP
        # ignored: closing its terminal does not stop it. SIGTERM does.
        dsn = self.layer.new_database('zpgpool_demo')
        proc, lines = self.start('--dsn', dsn, under=['nohup'])
        with open('/proc/%d/status' % proc.pid) as f:
            masks = dict(line.split(':\t') for line in f)

        def has(mask, signum):
            return bool(int(masks[mask], 16) >> (signum - 1) & 1)
        self.assertTrue(has('SigIgn', signal.SIGHUP))
        self.assertFalse(has('SigCgt', signal.SIGHUP))
        self.assertTrue(has('SigCgt', signal.SIGTERM))
        proc.send_signal(signal.SIGHUP)
        with urllib.request.urlopen(self.url(lines) + 'stats',
                                    timeout=30) as response:
            self.assertEqual(json.load(response)['name'], 'demo')
        status, rest = self.stop(proc, signal.SIGTERM)
        self.assertEqual(status, 0, rest)
        self.assertEqual(rest.count('zpgpool demo: interrupted; stopping'),
                         1, rest)

    def test_check_with_a_throwaway_server(self):
        proc = subprocess.run(
            [sys.executable, '-m', 'zpgpool', 'demo', '--check'],
            env=python_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assertIn('zpgpool demo: check passed', proc.stdout)
        self.assertIn('removing the throwaway PostgreSQL server', proc.stdout)


class DemoScriptTests(unittest.TestCase):
    """``scripts/demo``: it says what it does, and makes its virtualenv
    once."""

    script = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'scripts', 'demo')

    def run_script(self, venv, *args):
        env = dict(os.environ, ZPGPOOL_VENV=venv, PYTHON=sys.executable)
        env.pop('ZPGPOOL_FRESH_VENV', None)
        proc = subprocess.run([self.script] + list(args), env=env,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              timeout=600, check=False)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        return [line for line in proc.stdout.splitlines()
                if line.startswith('scripts/demo: ')], proc.stdout

    def test_installs_once(self):
        if not os.path.exists(self.script):  # pragma: no cover
            self.skipTest('no scripts/demo (not a source checkout)')
        tmp = tempfile.mkdtemp(prefix='zpgpool-test-demo-script-')
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        venv = os.path.join(tmp, 'venv')
        steps, out = self.run_script(venv, '--help')
        self.assertEqual(steps[0], 'scripts/demo: creating a virtualenv in '
                                   '%s with %s' % (venv, sys.executable))
        self.assertRegex(steps[1], r"^scripts/demo: installing zpgpool from "
                                   r".* into %s with the demo's requirements"
                                   r" \(.*pyramid_tm.*\); this takes a "
                                   r"minute the first time$" % venv)
        self.assertEqual(steps[2:], ['scripts/demo: installed',
                                     'scripts/demo: starting: zpgpool demo '
                                     '--help'])
        self.assertIn('usage: zpgpool demo', out)
        # Nothing changed: no pip.
        steps, out = self.run_script(venv, '--help')
        self.assertEqual(steps, [
            'scripts/demo: reusing %s: zpgpool and the demo\'s requirements'
            ' are up to date' % venv,
            'scripts/demo: starting: zpgpool demo --help'])
        self.assertIn('usage: zpgpool demo', out)
        # What it was installed from changed (as the recorded hash sees
        # it): pip runs again, in the same virtualenv.
        with open(os.path.join(venv, '.zpgpool-demo-installed'), 'w') as f:
            f.write('an older setup.py\n')
        steps, out = self.run_script(venv, '--help')
        self.assertRegex(steps[0], r'^scripts/demo: installing zpgpool ')
        self.assertEqual(len(steps), 3)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
