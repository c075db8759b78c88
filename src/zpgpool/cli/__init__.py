"""The ``zpgpool`` command: ``demo``, ``check`` and ``recover``.

``zpgpool demo``
    Serve the demo application (``zpgpool.demo``) with waitress, on a
    throwaway PostgreSQL server unless ``--dsn`` names one; ``--check``
    runs a scripted session against it instead of serving until Ctrl-C.
``zpgpool check site.zcml``
    Load a site's ZCML, connect each registered pool once and print a
    table; exit with 1 when a pool cannot serve.  ``--zope-conf`` first
    sets the variables of a Zope ``zope.conf``'s ``<environment>``
    section, as Zope does when it starts.
``zpgpool recover``
    List the in-doubt prepared transactions of a pool, and commit or roll
    them back.

``main(argv)`` returns the exit status instead of exiting, so that tests
can run the commands in-process. An error is a message on standard error
(``zpgpool CMD: error: ...``) and exit status 1; a wrong command line is
argparse's usage message and exit status 2. No pool logic lives here: the
commands only call the pool's public API.

The package: common.py (the name, errors, output), zopeconf.py (a
``zope.conf``'s environment), zcmlerrors.py and site.py (a site's ZCML,
DSN and pools), and one module a command (demo.py, check.py,
recover.py), each with its ``NAME``, ``HELP``, ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args)``.
"""
import argparse
import importlib.metadata
import sys

from zpgpool.cli import check
from zpgpool.cli import demo
from zpgpool.cli import recover
from zpgpool.cli.common import PROG
from zpgpool.cli.common import CommandError
from zpgpool.cli.common import _warn

# The names of zpgpool.cli before it became a package.
from zpgpool.cli.common import DEMO_DSN_ENV  # noqa: F401
from zpgpool.cli.check import cmd_check  # noqa: F401
from zpgpool.cli.check import probe  # noqa: F401
from zpgpool.cli.demo import STOP_SIGNALS  # noqa: F401
from zpgpool.cli.demo import _Stop  # noqa: F401
from zpgpool.cli.demo import _WebServer  # noqa: F401
from zpgpool.cli.demo import _configure_logging
from zpgpool.cli.demo import _stop_on_signals  # noqa: F401
from zpgpool.cli.demo import cmd_demo  # noqa: F401
from zpgpool.cli.recover import _age  # noqa: F401
from zpgpool.cli.recover import cmd_recover  # noqa: F401
from zpgpool.cli.recover import resolve  # noqa: F401
from zpgpool.cli.site import load_zcml  # noqa: F401
from zpgpool.cli.site import resolve_dsn  # noqa: F401
from zpgpool.cli.site import short_dsn  # noqa: F401
from zpgpool.cli.zopeconf import ZopeConfError  # noqa: F401
from zpgpool.cli.zopeconf import read_zope_environment  # noqa: F401
from zpgpool.stats import registered_pools  # noqa: F401


COMMANDS = (demo, check, recover)


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A transaction-aware PostgreSQL connection pool for the "
                    "Zope Component Architecture: the demo and the "
                    "operator's tools.")
    parser.add_argument("--version", action="version",
                        version="%s %s" % (PROG, _version()))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP,
                                  description=command.DESCRIPTION)
        command.add_arguments(sub)
        sub.set_defaults(func=command.run)
    return parser


def _version():
    """zpgpool's version, from the installed distribution."""
    try:
        return importlib.metadata.version("zpgpool")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "(unknown: zpgpool is not installed)"


def main(argv=None):
    """Run the ``zpgpool`` command with ``argv`` (default: sys.argv[1:]);
    return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # --help, or a wrong command line (argparse printed the usage).
        return exc.code if isinstance(exc.code, int) else 0
    if argv is None:
        # From the command line, not a test calling main(argv).
        _configure_logging()
    if args.command is None:
        parser.print_usage(sys.stderr)
        _warn("%s: error: a command is required (demo, check or recover)"
              % PROG)
        return 2
    try:
        return args.func(args)
    except CommandError as exc:
        _warn("%s %s: error: %s" % (PROG, args.command, exc))
        return 1
    except KeyboardInterrupt:  # pragma: no cover (Ctrl-C in check, recover)
        _warn("%s %s: interrupted" % (PROG, args.command))
        return 130
