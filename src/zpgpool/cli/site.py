"""What a command is told about a site: a DSN on the command line, the
site's ZCML and the pools it registers."""
import contextlib
import logging
import os

import psycopg2
import psycopg2.extensions

from zpgpool.conninfo import hide_passwords
from zpgpool.cli.common import PROG
from zpgpool.cli.common import CommandError
from zpgpool.cli.common import _TARGET_KEYS
from zpgpool.cli.common import _warn
from zpgpool.cli.zcmlerrors import _explain_zcml_error
from zpgpool.cli.zopeconf import _missing_variable_hint


def resolve_dsn(option, value, args):
    """Turn the command-line ``value`` of ``option`` into a DSN, as the
    ``dsn`` attribute of ``<zpgpool:pool>`` does: ``env:NAME`` reads the
    environment variable NAME, ``file:PATH`` the file PATH (relative to
    the current directory); anything else is the DSN itself.  Raises
    CommandError saying what was wrong (never with the DSN's secret)."""
    from zope.schema import ValidationError
    # The field of the ZCML directive, so that both accept the same forms
    # and explain a bad one alike.  Unbound, a relative file: path is taken
    # relative to the current directory.
    from zpgpool.zcml import IPoolDirective
    try:
        return IPoolDirective["dsn"].fromUnicode(value)
    except ValidationError as exc:
        message = str(exc)
        # The field speaks of its attribute, "dsn"; here it is the option.
        if message.startswith("dsn"):
            message = option + message[len("dsn"):]
        else:  # pragma: no cover - every message of the field starts so
            message = "%s: %s" % (option, message)
        text = value.strip()
        variable = text[4:].strip() if text.startswith("env:") else ""
        if variable and variable not in os.environ:
            message += "\n" + _missing_variable_hint(variable, args)
        raise CommandError(hide_passwords(message)) from None


# -- loading a site's ZCML ----------------------------------------------------

def load_zcml(path, args=None):
    """Load the ZCML file ``path``; raise CommandError saying where it failed.

    Its registrations go into the global component registry, where
    ``getUtility`` finds them (a command is a process of its own).
    ``args`` (the command line) only improves the errors' advice.
    """
    from zope.configuration import xmlconfig
    from zope.configuration.exceptions import ConfigurationError

    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CommandError("cannot load %s: %s" % (
            path, exc.strerror or exc)) from None
    try:
        xmlconfig.file(os.path.abspath(path))
    except ConfigurationError as exc:
        # zope.configuration's text names the file and line of the
        # directive, and what was wrong with it; some of its errors need
        # zpgpool's words added to be understood.
        text = str(exc).strip()
        advice = _explain_zcml_error(exc, text, args)
        if advice:
            text += "\n" + advice
        raise CommandError("cannot load %s:\n%s" % (
            path, hide_passwords(text))) from None


def _close_pools(pools):
    for _name, pool in pools:
        try:
            pool.close(timeout=1.0)
        except Exception as exc:  # pragma: no cover - close() must not fail
            _warn("%s: closing pool %r failed: %s" % (PROG, pool.name, exc))


def short_dsn(pool):
    """The pool's masked DSN, reduced to where it connects."""
    params = psycopg2.extensions.parse_dsn(pool.dsn)
    shown = ["%s=%s" % (k, params[k]) for k in _TARGET_KEYS if k in params]
    return " ".join(shown) or "(libpq defaults)"


def _label(name):
    return name if name else '""'


@contextlib.contextmanager
def _quiet_pool_log():
    """Keep the pool's own warnings off the terminal: the commands report
    the same failures themselves, once."""
    logger = logging.getLogger("zpgpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
