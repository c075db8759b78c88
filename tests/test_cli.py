"""Tests for zpgpool.cli: ``zpgpool check`` and ``zpgpool recover``.

The commands run in-process through ``main(argv)`` against the real server
of POSTGRES_LAYER (and, for a server without prepared transactions, one of
their own); one test runs ``python -m zpgpool`` to see the command as a
user does.
"""
import contextlib
import datetime
import importlib.metadata
import io
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import unittest
import unittest.mock
from xml.sax.saxutils import quoteattr

import psycopg2
import psycopg2.extensions
import transaction
import ZODB
import zope.component.testing
import zope.schema
from ZODB.FileStorage import FileStorage

from zpgpool import cli
from zpgpool.datamanager import gid_prefix
from zpgpool.pool import ConnectionPool
from zpgpool.testing import POSTGRES_LAYER
from zpgpool.zcml import IPoolDirective


SITE = """\
<configure
    xmlns="http://namespaces.zope.org/zope"
    xmlns:zpgpool="http://namespaces.zope.org/zpgpool">
  <include package="zpgpool" />
%s
</configure>
"""

from tests.poolhelpers import NO_TWOPHASE_LAYER
from zpgpool.pool import hide_passwords


from tests.poolhelpers import LogCapture
from tests.poolhelpers import closed_port
from tests.poolhelpers import run_cli as run
from tests.poolhelpers import with_params
from tests.support import python_env
from tests.zopehelpers import zope_conf


def password_of(dsn):
    return psycopg2.extensions.parse_dsn(dsn).get('password')


class CommandTestCase(unittest.TestCase):
    """Runs each test with an empty component registry and a temporary
    directory for ZCML files; closes the pools a test's ZCML registered."""

    def setUp(self):
        zope.component.testing.setUp()
        self.tmp = tempfile.mkdtemp(prefix='zpgpool-test-cli-')

    def tearDown(self):
        for _name, pool in cli.registered_pools():
            pool.close(timeout=0)
        zope.component.testing.tearDown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write_site(self, *pools, name='site.zcml'):
        """Write a site ZCML declaring ``pools`` ((name, dsn, extra) or
        (name, dsn)); return its path."""
        lines = []
        for each in pools:
            pool_name, dsn = each[:2]
            extra = each[2] if len(each) > 2 else ''
            lines.append('  <zpgpool:pool name=%s dsn=%s %s/>' % (
                quoteattr(pool_name), quoteattr(dsn), extra))
        return self.write_zcml(SITE % '\n'.join(lines), name)

    def write_zcml(self, text, name='site.zcml'):
        path = os.path.join(self.tmp, name)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        return path

    write_file = write_zcml

    def unset_variable(self):
        """The name of an environment variable that is not set, and is
        unset again after the test."""
        name = 'ZPGPOOL_TEST_CLI_%s' % secrets.token_hex(4).upper()
        self.assertNotIn(name, os.environ)
        self.addCleanup(os.environ.pop, name, None)
        return name

    def write_zope_conf(self, environment, name='zope.conf'):
        """Write a zope.conf as mkwsgiinstance makes one, whose
        <environment> section sets ``environment``; return its path."""
        return self.write_file(zope_conf(self.tmp, environment), name)


class CommandLineTests(CommandTestCase):
    """The command line itself; no server needed."""

    def test_no_command(self):
        status, out, err = run()
        self.assertEqual(status, 2)
        self.assertIn('usage: zpgpool', err)
        self.assertIn('a command is required (demo, check or recover)', err)

    def test_help(self):
        status, out, err = run('--help')
        self.assertEqual(status, 0)
        for command in ('demo', 'check', 'recover'):
            self.assertIn(command, out)

    def test_version(self):
        status, out, err = run('--version')
        self.assertEqual((status, err), (0, ''))
        self.assertEqual(out, 'zpgpool %s\n'
                         % importlib.metadata.version('zpgpool'))
        self.assertRegex(out, r'^zpgpool \d+\.\d+\.\d+')

    def test_unknown_pool_attribute(self):
        path = self.write_site(('main', 'host=db password=sekrit',
                                'maxconns="5"'))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('File "%s", line 5' % path, err)
        self.assertIn("<zpgpool:pool> has no attribute 'maxconns'. Did you "
                      "mean 'maxconn'?", err)
        # Every attribute the directive's schema has, in its order.
        fields = zope.schema.getFieldNamesInOrder(IPoolDirective)
        self.assertIn('health_check_after', fields)
        self.assertIn('\nIts attributes are: %s.\n' % ', '.join(fields),
                      err)
        self.assertNotIn('sekrit', err + out)

    def test_unknown_pool_attributes_in_an_included_file(self):
        self.write_zcml(
            '<configure xmlns:zpgpool="http://namespaces.zope.org/zpgpool">'
            '\n\n  <zpgpool:pool name="a" dsn=""\n   frobnicate="1"'
            ' twophse="yes" />\n</configure>\n', 'pools.zcml')
        path = self.write_zcml(SITE % '  <include file="pools.zcml" />')
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn("<zpgpool:pool> has no attribute 'frobnicate'.\n", err)
        self.assertIn("<zpgpool:pool> has no attribute 'twophse'. Did you "
                      "mean 'twophase'?", err)
        self.assertIn('File "%s", line 3.2' % os.path.join(
            self.tmp, 'pools.zcml'), err)

    def test_unknown_attribute_of_another_directive(self):
        # Not zpgpool's: zope.configuration's text alone.
        path = self.write_zcml(SITE % '  <include package="zpgpool" '
                               'maxconns="1" />')
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn("('Unrecognized parameters:', 'maxconns')", err)
        self.assertNotIn('Did you mean', err)
        self.assertNotIn('Its attributes are', err)

    def test_missing_include(self):
        path = self.write_zcml(SITE.replace(
            '  <include package="zpgpool" />\n', '') %
            '  <zpgpool:pool name="main" dsn="" />')
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn("('Unknown directive', "
                      "'http://namespaces.zope.org/zpgpool', 'pool')", err)
        self.assertIn('<zpgpool:pool> is unknown because zpgpool\'s ZCML is '
                      'not included: put <include package="zpgpool" /> (or '
                      '<include package="zpgpool" file="meta.zcml" /> for the'
                      ' directives alone) inside <configure>, before the '
                      'first <zpgpool:...> directive in %s.' % path, err)

    def test_unknown_directive(self):
        path = self.write_zcml(SITE % '  <zpgpool:pools name="x" dsn="" />')
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('zpgpool has no directive <zpgpool:pools>; it has '
                      '<zpgpool:closePoolsAtExit>, <zpgpool:pool>. Did you '
                      "mean 'pool'?", err)
        self.assertNotIn('is not included', err)

    def test_env_dsn_not_set(self):
        variable = self.unset_variable()
        path = self.write_site(('main', 'env:' + variable))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn("the environment variable '%s' is not set" % variable,
                      err)
        self.assertIn('%s is not set in this shell. When Zope gets it from '
                      'the <environment> section of its zope.conf, pass that'
                      ' file: --zope-conf ' % variable, err)
        # A zope.conf that sets other variables only.
        conf = self.write_zope_conf({'CHAMELEON_CACHE': '$INSTANCE/cache',
                                     'OTHER_DSN': 'host=db'})
        status, out, err = run('check', '--zope-conf', conf, path)
        self.assertEqual(status, 1)
        self.assertIn('--zope-conf %s does not set %s either (its '
                      '<environment> section sets CHAMELEON_CACHE, OTHER_DSN)'
                      % (conf, variable), err)
        self.assertNotIn('OTHER_DSN', os.environ)
        # One with no <environment> section at all.
        bare = self.write_file('instancehome /x\n', 'bare.conf')
        status, out, err = run('check', '--zope-conf', bare, path)
        self.assertEqual(status, 1)
        self.assertIn('--zope-conf %s does not set %s either (its '
                      '<environment> section sets nothing)' % (bare, variable),
                      err)

    def test_zope_conf_missing(self):
        path = self.write_site(('main', ''))
        conf = os.path.join(self.tmp, 'nowhere.conf')
        status, out, err = run('check', '--zope-conf', conf, path)
        self.assertEqual(status, 1)
        self.assertEqual(err, 'zpgpool check: error: --zope-conf %s: cannot '
                              'read it: No such file or directory\n' % conf)

    def test_recover_dsn_forms(self):
        variable = self.unset_variable()
        for dsn, message in [
                ('env:', "--dsn='env:' must name an environment variable"),
                ('env:' + variable, "--dsn: the environment variable '%s' "
                                    "is not set" % variable),
                ('file:', "--dsn='file:' must name a file"),
                ('file:' + os.path.join(self.tmp, 'none'),
                 "--dsn: cannot read the file '%s': No such file or "
                 "directory" % os.path.join(self.tmp, 'none')),
                ('host=db password=sekrit nonsense',
                 '--dsn must be a connection string libpq can parse: ')]:
            status, out, err = run('recover', '--dsn', dsn, '--pool-name',
                                   'x')
            self.assertEqual(status, 1, dsn)
            self.assertTrue(err.startswith('zpgpool recover: error: %s'
                                           % message), err)
            self.assertNotIn('sekrit', err + out)
        status, out, err = run('recover', '--dsn', 'env:' + variable,
                               '--pool-name', 'x')
        self.assertIn('--zope-conf', err)
        empty = self.write_file('  \n', 'empty-dsn')
        status, out, err = run('recover', '--dsn', 'file:' + empty,
                               '--pool-name', 'x')
        self.assertIn("--dsn: the file '%s' is empty" % empty, err)

    def test_unknown_command(self):
        status, out, err = run('frobnicate')
        self.assertEqual(status, 2)
        self.assertIn("invalid choice: 'frobnicate'", err)

    def test_check_needs_a_file(self):
        status, out, err = run('check')
        self.assertEqual(status, 2)
        self.assertIn('the following arguments are required: zcml', err)

    def test_check_missing_file(self):
        path = os.path.join(self.tmp, 'nowhere.zcml')
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertEqual(err, 'zpgpool check: error: cannot load %s: No such '
                              'file or directory\n' % path)
        status, out, err = run('check', self.tmp)
        self.assertEqual(status, 1)
        self.assertEqual(err, 'zpgpool check: error: cannot load %s: Is a '
                              'directory\n' % self.tmp)

    def test_check_broken_zcml_names_file_and_line(self):
        path = self.write_site(
            ('main', 'host=db password=sekrit', 'maxconn="many"'))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('zpgpool check: error: cannot load %s:' % path, err)
        self.assertIn('File "%s", line 5' % path, err)
        self.assertIn("maxconn must be a whole number, 1 or more; got 'many'",
                      err)
        self.assertNotIn('sekrit', err + out)

    def test_check_unparsable_zcml(self):
        path = self.write_zcml('<configure xmlns="http://namespaces.zope.org'
                               '/zope"\n  <include package="zpgpool" />\n')
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('cannot load %s:' % path, err)
        self.assertIn('not well-formed', err)

    def test_check_without_pools(self):
        path = self.write_site()
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('%s registers no pool' % path, err)

    def test_recover_needs_zcml_or_dsn(self):
        status, out, err = run('recover')
        self.assertEqual(status, 2)
        self.assertIn('one of the arguments --zcml --dsn is required', err)

    def test_recover_zcml_and_dsn_exclude_each_other(self):
        status, out, err = run('recover', '--zcml', 'a.zcml', '--dsn', '')
        self.assertEqual(status, 2)
        self.assertIn('not allowed with argument', err)

    def test_recover_commit_and_rollback_exclude_each_other(self):
        status, out, err = run('recover', '--dsn', '', '--pool-name', 'x',
                               '--commit', '--rollback')
        self.assertEqual(status, 2)
        self.assertIn('not allowed with argument --commit', err)

    def test_recover_dsn_needs_pool_name(self):
        status, out, err = run('recover', '--dsn', 'host=db')
        self.assertEqual(status, 1)
        self.assertIn('--dsn needs --pool-name NAME', err)

    def test_recover_negative_age(self):
        status, out, err = run('recover', '--dsn', 'host=db', '--pool-name',
                               'x', '--older-than', '-1')
        self.assertEqual(status, 1)
        self.assertIn('--older-than must be 0 or more seconds, got -1', err)

    def test_recover_unknown_pool(self):
        path = self.write_site(('main', 'host=db'))
        status, out, err = run('recover', '--zcml', path, '--pool', 'other')
        self.assertEqual(status, 1)
        self.assertIn("declares no pool named 'other'; it declares 'main'",
                      err)
        zope.component.testing.tearDown()   # forget the pool 'main'
        zope.component.testing.setUp()
        path = self.write_site(name='empty.zcml')
        status, out, err = run('recover', '--zcml', path, '--pool', 'other')
        self.assertIn("declares no pool named 'other'; it declares none",
                      err)
        status, out, err = run('recover', '--zcml', path)
        self.assertEqual(status, 1)
        self.assertEqual(err, 'zpgpool recover: error: %s declares no pool\n'
                              % path)

    def test_recover_zodb_missing(self):
        path = os.path.join(self.tmp, 'Data.fs')
        status, out, err = run('recover', '--dsn', 'host=db', '--pool-name',
                               'x', '--zodb', path)
        self.assertEqual(status, 1)
        self.assertIn('--zodb %s: no such file' % path, err)
        with open(path, 'w') as f:
            f.write('not a FileStorage')
        status, out, err = run('recover', '--dsn', 'host=db', '--pool-name',
                               'x', '--zodb', path)
        self.assertEqual(status, 1)
        self.assertIn('--zodb %s: cannot open it as a FileStorage: ' % path,
                      err)

    def test_recover_zodb_not_installed(self):
        # What a user without ZODB sees: the import fails.
        with unittest.mock.patch.dict(sys.modules,
                                      {'ZODB.FileStorage': None}):
            status, out, err = run('recover', '--dsn', 'host=db',
                                   '--pool-name', 'x', '--zodb', 'Data.fs')
        self.assertEqual(status, 1)
        self.assertIn('--zodb needs ZODB: pip install ZODB', err)

    def test_age(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        ago = [cli._age(now - datetime.timedelta(seconds=s))
               for s in (-5, 0, 119, 120, 7199, 7200, 90000)]
        self.assertEqual(ago, ['0 s', '0 s', '119 s', '2 min', '119 min',
                               '2.0 h', '25.0 h'])

    def test_short_dsn(self):
        def short(dsn):
            return cli.short_dsn(ConnectionPool(dsn))
        self.assertEqual(short(''), '(libpq defaults)')
        self.assertEqual(short('postgresql://me:secret@db:6432/app'
                               '?sslmode=require&application_name=x'),
                         'host=db port=6432 dbname=app user=me password=***'
                         ' sslmode=require')
        self.assertEqual(short("host=db application_name='my app' "
                               "password='a b' service=s"),
                         'service=s host=db password=***')

    def test_hide_passwords(self):
        self.assertEqual(
            hide_passwords("dsn='host=x password=abc user=y' and "
                               "password = 'a b\\'c' and "
                               "postgresql://me:pw@host/db?sslpassword=s&x=1"),
            "dsn='host=x password=*** user=y' and password = *** and "
            "postgresql://me:***@host/db?sslpassword=***&x=1")


class ZopeConfTests(CommandTestCase):
    """Reading the <environment> section of a zope.conf."""

    def read(self, text):
        return cli.read_zope_environment(self.write_file(text, 'zope.conf'))

    def assertRefused(self, text, message):
        path = self.write_file(text, 'zope.conf')
        with self.assertRaises(cli.CommandError) as caught:
            cli.read_zope_environment(path)
        self.assertEqual(str(caught.exception),
                         '--zope-conf %s, %s' % (path, message))

    def test_as_mkwsgiinstance_writes_it(self):
        conf = self.write_zope_conf({'CHAMELEON_CACHE': '$INSTANCE/var/cache',
                                     'APP_DSN': 'host=db password=a#b'})
        self.assertEqual(cli.read_zope_environment(conf), {
            'CHAMELEON_CACHE': self.tmp + '/var/cache',
            'APP_DSN': 'host=db password=a#b'})

    def test_no_environment_section(self):
        self.assertEqual(self.read('instancehome /x\n'), {})

    def test_substitutions(self):
        os.environ['ZPGPOOL_TEST_CLI_HOST'] = 'db.example'
        self.addCleanup(os.environ.pop, 'ZPGPOOL_TEST_CLI_HOST')
        self.assertEqual(self.read(
            '%define Port 6432\n'
            '# <environment> in a comment does not count\n'
            '<Environment>\n'
            '\tA_DSN\thost=$(ZPGPOOL_TEST_CLI_HOST) port=${port}\n'
            '  PRICE  costs $$5  \n'
            '  EMPTY\n'
            '  # B_DSN host=commented-out\n'
            '</environment >\n'
            'debug-mode on\n'), {
                'A_DSN': 'host=db.example port=6432', 'PRICE': 'costs $5',
                'EMPTY': ''})

    def test_directives_inside_the_section(self):
        # ZConfig reads a %define wherever it is, <environment> included.
        self.assertEqual(self.read(
            '<environment>\n  %define host db.example\n'
            '  A_DSN host=$host\n</environment>\n'),
            {'A_DSN': 'host=db.example'})
        self.write_file('  INNER 1\n', 'inner.conf')
        self.assertRefused('<environment>\n  A 1\n  %include inner.conf\n'
                           '</environment>\n',
                           'line 3: %include inside <environment> (line 1) '
                           'is not read by --zope-conf; move the variables '
                           'into this file')

    def test_include(self):
        self.write_file('<environment>\n  INNER 1\n</environment>\n',
                        'inner.conf')
        self.assertEqual(self.read(
            '<environment>\n  OUTER 1\n</environment>\n'
            '%include inner.conf\n'), {'OUTER': '1', 'INNER': '1'})
        path = self.write_file('%include zope.conf\n', 'zope.conf')
        with self.assertRaises(cli.CommandError) as caught:
            cli.read_zope_environment(path)
        self.assertEqual(str(caught.exception),
                         '--zope-conf %s: it includes itself' % path)

    def test_errors(self):
        self.assertRefused('<environment>\n  A 1\n',
                           'line 1: <environment> is never closed by '
                           '</environment>')
        self.assertRefused('\n<environment>\n  <environment>\n',
                           'line 3: <environment> inside <environment> '
                           '(line 2)')
        self.assertRefused('<environment>\n <zodb_db main>\n',
                           'line 2: <zodb_db main> inside <environment> '
                           '(line 1), which holds only NAME value lines')
        self.assertRefused('<environment>\n  A $nowhere\n</environment>\n',
                           'line 2: $nowhere is not defined by a %define '
                           'above it')
        self.assertRefused('<environment>\n  A 5$\n</environment>\n',
                           "line 2: a lone '$' (write $$ for a dollar sign)")
        variable = self.unset_variable()
        self.assertRefused('<environment>\n  A $(%s)\n</environment>\n'
                           % variable, 'line 2: $(%s): the environment '
                           'variable %s is not set' % (variable, variable))


class CheckTests(CommandTestCase):

    layer = POSTGRES_LAYER

    def test_good_site(self):
        dsn = self.layer.dsn
        path = self.write_site(('main', dsn), ('reports', dsn,
                                               'maxconn="2" twophase="true"'))
        status, out, err = run('check', path)
        self.assertEqual(err, '')
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), [
            'pool', 'dsn', 'server', 'connect', 'round', 'trip', 'two-phase',
            'status'])
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[1].startswith('main '))
        self.assertTrue(lines[2].startswith('reports '))
        with psycopg2.connect(dsn) as conn:
            version = conn.cursor()
            version.execute('SHOW server_version')
            server_version = version.fetchone()[0].split()[0]
        conn.close()
        for line in lines[1:]:
            self.assertIn(' %s ' % server_version, line)
            self.assertIn('password=***', line)
            self.assertRegex(line, r' \d+\.\d ms +\d+\.\d\d ms ')
            self.assertRegex(line, r'yes \(max_prepared_transactions=\d+\) '
                                   r'+ok$')
        self.assertNotIn(password_of(dsn) or 'no password', out)

    def test_dsn_from_zope_conf(self):
        # What the README tells Zope users: the DSN in zope.conf's
        # <environment>, the ZCML naming it with env:.
        variable = self.unset_variable()
        path = self.write_site(('main', 'env:' + variable))
        conf = self.write_zope_conf({variable: self.layer.dsn,
                                     'CHAMELEON_CACHE': '$INSTANCE/cache'})
        status, out, err = run('check', '--zope-conf', conf, path)
        self.assertEqual((status, err), (0, ''))
        self.assertRegex(out.splitlines()[1], r'^main .* ok$')
        self.assertNotIn(password_of(self.layer.dsn) or 'no password', out)
        # Applied for the command only.
        self.assertNotIn(variable, os.environ)
        self.assertNotIn('CHAMELEON_CACHE', os.environ)

    def test_zope_conf_wins_over_the_environment(self):
        # As in Zope, which sets the variables of <environment> over what
        # its process was started with.
        variable = self.unset_variable()
        os.environ[variable] = with_params(self.layer.dsn,
                                           port=closed_port())
        path = self.write_site(('main', 'env:' + variable))
        conf = self.write_zope_conf({variable: self.layer.dsn})
        status, out, err = run('check', '--zope-conf', conf, path)
        self.assertEqual((status, err), (0, ''))
        self.assertNotEqual(os.environ[variable], self.layer.dsn)

    def test_pools_are_closed_afterwards(self):
        path = self.write_site(('main', self.layer.dsn))
        self.assertEqual(run('check', path)[0], 0)
        [(name, pool)] = cli.registered_pools()
        self.assertTrue(pool.closed)

    def test_unnamed_pool(self):
        path = self.write_site(('', self.layer.dsn))
        status, out, err = run('check', path)
        self.assertEqual(status, 0)
        self.assertTrue(out.splitlines()[1].startswith('""  '))

    def test_server_down(self):
        port = closed_port()
        path = self.write_site(
            ('main', self.layer.dsn),
            ('down', with_params(self.layer.dsn, port=port)))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        lines = out.splitlines()
        self.assertRegex(lines[1], r'^down .*port=%d .* FAILED$' % port)
        self.assertRegex(lines[2], r'^main .* ok$')
        self.assertIn(
            "zpgpool check: pool down cannot serve: zpgpool pool 'down': "
            "cannot connect to host=127.0.0.1 port=%d" % port, err)
        self.assertIn('Connection refused', err)
        self.assertIn('zpgpool check: 1 of 2 pools cannot serve', err)
        self.assertNotIn(password_of(self.layer.dsn) or 'no password',
                         out + err)

    def test_the_pools_own_warnings_are_held_back(self):
        # check reports a pool that cannot connect itself, once: the pool's
        # own warnings of the same failure are held back meanwhile, and
        # the log is left as it was.
        log = LogCapture().install(self)     # the zpgpool logger at DEBUG
        path = self.write_site(
            ('down', with_params(self.layer.dsn, port=closed_port()),
             'timeout="1"'))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('zpgpool check: pool down cannot serve', err)
        self.assertEqual([record.getMessage() for record in log.records
                          if record.levelno >= logging.WARNING], [])
        self.assertEqual(logging.getLogger('zpgpool').level, logging.DEBUG)

    def test_wrong_password(self):
        dsn = with_params(self.layer.dsn, password='wrong-' +
                          secrets.token_hex(8))
        path = self.write_site(('main', dsn))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        if not password_of(self.layer.dsn):  # pragma: no cover
            self.skipTest('the server of ZPGPOOL_TEST_DSN needs no password')
        self.assertIn('password authentication failed', err)
        self.assertNotIn(password_of(dsn), out + err)
        self.assertIn('password=***', out)

    def test_unknown_database(self):
        path = self.write_site(
            ('main', with_params(self.layer.dsn, dbname='no_such_db')))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        self.assertIn('database "no_such_db" does not exist', err)

    def test_python_m(self):
        # The command as a user runs it, in a process of its own.
        path = self.write_site(('main', self.layer.dsn))
        proc = subprocess.run(
            [sys.executable, '-m', 'zpgpool', 'check', path],
            env=python_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            timeout=120, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stdout.splitlines()[1], r'^main .* ok$')


class CheckTwoPhaseTests(CommandTestCase):

    layer = NO_TWOPHASE_LAYER

    def test_twophase_unavailable(self):
        dsn = self.layer.dsn
        path = self.write_site(('plain', dsn), ('xa', dsn,
                                                'twophase="true"'))
        status, out, err = run('check', path)
        self.assertEqual(status, 1)
        lines = out.splitlines()
        self.assertRegex(lines[1], r'^plain .* no \(max_prepared_transactions'
                                   r'=0\) +ok$')
        self.assertRegex(lines[2], r'^xa .* no \(max_prepared_transactions'
                                   r'=0\) +FAILED$')
        self.assertIn("zpgpool check: pool xa cannot serve: the pool has "
                      "twophase=True, but the server's "
                      "max_prepared_transactions is 0", err)


class RecoverTests(CommandTestCase):

    layer = POSTGRES_LAYER

    def setUp(self):
        super().setUp()
        self.dsn = self.layer.new_database('zpgpool_cli')
        self.gids = []
        with contextlib.closing(psycopg2.connect(self.dsn)) as conn:
            conn.autocommit = True
            conn.cursor().execute('CREATE TABLE IF NOT EXISTS t (x text)')

    def tearDown(self):
        # Never leave a prepared transaction behind: it would keep the
        # test database from being dropped.
        with contextlib.closing(psycopg2.connect(self.dsn)) as conn:
            conn.autocommit = True
            cur = conn.cursor()
            for gid in self.gids:
                cur.execute('SELECT 1 FROM pg_prepared_xacts WHERE gid = %s',
                            (gid,))
                if cur.fetchone():
                    cur.execute('ROLLBACK PREPARED %s', (gid,))
        super().tearDown()

    def prepare(self, value, pool_name='orders', gid=None):
        """Leave a prepared transaction inserting ``value``, as a process
        killed between PREPARE and COMMIT PREPARED leaves it; return its
        gid."""
        if gid is None:
            pool = ConnectionPool(self.dsn, name=pool_name)
            gid = '%sdeadhost:4242:%s' % (
                gid_prefix(pool), secrets.token_hex(4))
        self.gids.append(gid)
        with contextlib.closing(psycopg2.connect(self.dsn)) as conn:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute('BEGIN')
            cur.execute('INSERT INTO t VALUES (%s)', (value,))
            cur.execute('PREPARE TRANSACTION %s', (gid,))
        return gid

    def query(self, sql, params=None):
        with contextlib.closing(psycopg2.connect(self.dsn)) as conn:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall()

    def values(self):
        return sorted(v for (v,) in self.query('SELECT x FROM t'))

    def pending(self):
        return sorted(g for (g,) in self.query(
            'SELECT gid FROM pg_prepared_xacts'
            ' WHERE database = current_database()'))

    def test_list(self):
        gid = self.prepare('a')
        status, out, err = run('recover', '--dsn', self.dsn, '--pool-name',
                               'orders', '--older-than', '0')
        self.assertEqual((status, err), (0, ''))
        lines = out.splitlines()
        self.assertRegex(lines[0], r"^pool orders \(host=.* password=\*\*\*\):"
                                   r" 1 in-doubt prepared transaction older"
                                   r" than 0 s with the prefix"
                                   r" 'zpgpool:orders:'$")
        self.assertRegex(lines[1], r'^  %s  prepared \d{4}-\d\d-\d\d '
                                   r'\d\d:\d\d:\d\d[+-]\d\d(:\d\d)? '
                                   r'\(\d+ s ago\) by postgres in '
                                   r'zpgpool_cli_' % gid)
        self.assertEqual(lines[2], 'Nothing was changed; run again with '
                                   '--commit, --rollback or --zodb to resolve'
                                   ' what is listed.')
        self.assertEqual(self.pending(), [gid])
        self.assertEqual(self.values(), [])
        self.assertNotIn(password_of(self.dsn) or 'no password', out)

    def test_default_age_skips_recent_ones(self):
        gid = self.prepare('a')
        self.prepare('b')
        self.prepare('another pool', pool_name='invoices')
        status, out, err = run('recover', '--dsn', self.dsn, '--pool-name',
                               'orders', '--commit')
        self.assertEqual((status, err), (0, ''))
        lines = out.splitlines()
        self.assertRegex(lines[0], r': 0 in-doubt prepared transactions '
                                   r'older than 60 s with the prefix '
                                   r"'zpgpool:orders:'$")
        self.assertEqual(lines[1], '  and 2 younger than 60 s, left alone: '
                                   'they may still be committing; to include'
                                   ' them, run again with --older-than 0')
        self.assertEqual(len(lines), 2)
        self.assertEqual(self.values(), [])
        self.assertIn(gid, self.pending())
        # Once they are older than --older-than, they are listed instead.
        status, out, err = run('recover', '--dsn', self.dsn, '--pool-name',
                               'orders', '--older-than', '0.001')
        self.assertIn(': 2 in-doubt prepared transactions older than '
                      '0.001 s', out)
        self.assertNotIn('younger', out)

    def test_dsn_from_the_environment_or_a_file(self):
        gid = self.prepare('a')
        variable = self.unset_variable()
        os.environ[variable] = self.dsn
        status, out, err = run('recover', '--dsn', 'env:' + variable,
                               '--pool-name', 'orders', '--older-than', '0')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  %s  prepared ' % gid, out)
        del os.environ[variable]
        path = self.write_file('\n%s\n' % self.dsn, 'dsn.secret')
        status, out, err = run('recover', '--dsn', 'file:' + path,
                               '--pool-name', 'orders', '--older-than', '0',
                               '--commit')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  committed %s\n' % gid, out)
        self.assertEqual(self.values(), ['a'])
        self.assertNotIn(password_of(self.dsn) or 'no password', out)

    def test_zcml_with_zope_conf(self):
        gid = self.prepare('a')
        variable = self.unset_variable()
        path = self.write_site(('orders', 'env:' + variable,
                                'twophase="true"'))
        status, out, err = run('recover', '--zcml', path, '--older-than',
                               '0', '--rollback')
        self.assertEqual(status, 1)
        self.assertIn('--zope-conf', err)
        conf = self.write_zope_conf({variable: self.dsn})
        status, out, err = run('recover', '--zcml', path, '--zope-conf',
                               conf, '--older-than', '0', '--rollback')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  rolled back %s\n' % gid, out)
        self.assertEqual(self.pending(), [])
        self.assertNotIn(variable, os.environ)
        # And with --dsn env:NAME, which zope.conf sets.
        gid = self.prepare('b')
        status, out, err = run('recover', '--zope-conf', conf, '--dsn',
                               'env:' + variable, '--pool-name', 'orders',
                               '--older-than', '0', '--commit')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  committed %s\n' % gid, out)
        self.assertEqual(self.values(), ['b'])

    def test_commit(self):
        gid = self.prepare('a')
        status, out, err = run('recover', '--dsn', self.dsn, '--pool-name',
                               'orders', '--older-than', '0', '--commit')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  committed %s\n' % gid, out)
        self.assertNotIn('Nothing was changed', out)
        self.assertEqual(self.pending(), [])
        self.assertEqual(self.values(), ['a'])

    def test_rollback_through_zcml(self):
        gid = self.prepare('a')
        path = self.write_site(('orders', self.dsn, 'twophase="true"'))
        status, out, err = run('recover', '--zcml', path, '--pool', 'orders',
                               '--older-than', '0', '--rollback')
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  rolled back %s\n' % gid, out)
        self.assertEqual(self.pending(), [])
        self.assertEqual(self.values(), [])

    def test_only_the_pools_prefix(self):
        mine = self.prepare('mine')
        other_pool = self.prepare('other pool', pool_name='invoices')
        foreign = self.prepare('foreign', gid='someone-else:%s'
                               % secrets.token_hex(4))
        status, out, err = run('recover', '--dsn', self.dsn, '--pool-name',
                               'orders', '--older-than', '0', '--commit')
        self.assertEqual(status, 0)
        self.assertIn('committed %s' % mine, out)
        self.assertNotIn(other_pool, out)
        self.assertNotIn(foreign, out)
        self.assertEqual(self.pending(), sorted([other_pool, foreign]))
        self.assertEqual(self.values(), ['mine'])

    def test_every_pool_of_a_site(self):
        orders = self.prepare('o')
        invoices = self.prepare('i', pool_name='invoices')
        path = self.write_site(('orders', self.dsn), ('invoices', self.dsn))
        status, out, err = run('recover', '--zcml', path, '--older-than', '0',
                               '--commit')
        self.assertEqual(status, 0)
        self.assertIn("pool invoices (", out)
        self.assertIn("pool orders (", out)
        self.assertIn('committed %s' % orders, out)
        self.assertIn('committed %s' % invoices, out)
        self.assertEqual(self.values(), ['i', 'o'])

    def test_decide_from_zodb(self):
        # A ZODB transaction that committed with the gid in its extended
        # info (as a two-phase transaction records it), and one that never
        # reached ZODB: recovery makes PostgreSQL agree with ZODB.
        committed = self.prepare('zodb committed it')
        abandoned = self.prepare('zodb did not')
        path = os.path.join(self.tmp, 'Data.fs')
        db = ZODB.DB(FileStorage(path))
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()['x'] = 1
            tm.get().setExtendedInfo('zpgpool:orders:gid', committed)
            tm.commit()
            conn.close()
        finally:
            db.close()
        status, out, err = run('recover', '--dsn', self.dsn, '--pool-name',
                               'orders', '--older-than', '0', '--zodb', path)
        self.assertEqual((status, err), (0, ''))
        self.assertIn('  committed %s (ZODB committed it)\n' % committed, out)
        self.assertIn('  rolled back %s (ZODB did not commit it)\n'
                      % abandoned, out)
        self.assertNotIn('Nothing was changed', out)
        self.assertEqual(self.pending(), [])
        self.assertEqual(self.values(), ['zodb committed it'])

    def test_resolved_meanwhile(self):
        pool = ConnectionPool(self.dsn, name='orders')
        self.addCleanup(pool.close)
        gid = gid_prefix(pool) + 'gone'
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.resolve(pool, [gid], commit=True)
        self.assertEqual(out.getvalue(), '  %s was gone already (resolved by '
                                         'someone else)\n' % gid)

    def test_server_down(self):
        dsn = with_params(self.dsn, port=closed_port())
        status, out, err = run('recover', '--dsn', dsn, '--pool-name',
                               'orders', '--older-than', '0')
        self.assertEqual(status, 1)
        self.assertIn("zpgpool recover: pool orders: zpgpool pool 'orders': "
                      "cannot connect to", err)
        self.assertIn('Connection refused', err)
        self.assertNotIn('Nothing was changed', out)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
