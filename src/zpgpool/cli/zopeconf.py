"""A Zope ``zope.conf``'s ``<environment>`` section, read as Zope reads it,
so that ``check`` and ``recover`` see the variables a site's DSNs name."""
import contextlib
import os
import re

from zpgpool.cli.common import CommandError


class ZopeConfError(CommandError):
    """A zope.conf that cannot be read as far as ``--zope-conf`` needs."""


# ZConfig's substitutions: $name and ${name} (from %define, any case),
# $(NAME) (the process environment) and $$ (a dollar sign).
_SUBSTITUTION = re.compile(
    r"\$(?:(?P<dollar>\$)|\{(?P<braced>[A-Za-z_][\w.-]*)\}"
    r"|\((?P<env>[A-Za-z_][\w.-]*)\)|(?P<plain>[A-Za-z_][\w.-]*))")


def read_zope_environment(path, _defines=None, _seen=()):
    """Return the variables a Zope ``zope.conf`` sets in its
    ``<environment>`` section, as a dict in the order of the file.

    Reads what ``zpgpool`` needs and no more, the way ZConfig reads it: a
    line is ``NAME value`` (the value is the rest of the line); a line
    whose first character is ``#`` is a comment; ``%define`` names are
    substituted (``$name``, ``${name}``), as are ``$(NAME)`` from the
    environment and ``$$``; ``%include`` files are read too.  Everything
    else in the file is skipped.  Raises ZopeConfError, naming the file and
    line, for what it cannot make sense of.
    """
    defines = {} if _defines is None else _defines
    path = os.path.abspath(path)
    if path in _seen:
        raise ZopeConfError("--zope-conf %s: it includes itself" % path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeError) as exc:
        raise ZopeConfError("--zope-conf %s: cannot read it: %s" % (
            path, getattr(exc, "strerror", None) or exc)) from None
    environment = {}
    section_line = None         # where the open <environment> began

    def fail(number, what):
        raise ZopeConfError("--zope-conf %s, line %d: %s"
                            % (path, number, what))

    def substitute(number, text):
        def replace(match):
            if match.group("dollar"):
                return "$"
            if match.group("env"):
                value = os.environ.get(match.group("env"))
                if value is None:
                    fail(number, "$(%s): the environment variable %s is not"
                                 " set" % (match.group("env"),
                                           match.group("env")))
                return value
            name = match.group("braced") or match.group("plain")
            if name.lower() not in defines:
                fail(number, "$%s is not defined by a %%define above it"
                     % name)
            return defines[name.lower()]
        result = _SUBSTITUTION.sub(replace, text)
        if "$" in _SUBSTITUTION.sub("", text):
            fail(number, "a lone '$' (write $$ for a dollar sign)")
        return result

    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        lowered = line.lower()
        if line.startswith("%"):
            # ZConfig reads its directives in any section, <environment>
            # too.
            directive, argument = (line[1:].split(None, 1) + [""])[:2]
            if directive.lower() == "define":
                name, value = (argument.split(None, 1) + [""])[:2]
                defines[name.lower()] = substitute(number, value.strip())
            elif directive.lower() == "include":
                if section_line is not None:
                    # Its lines would be the section's: rare enough to
                    # refuse rather than read differently from Zope.
                    fail(number, "%%include inside <environment> (line %d)"
                                 " is not read by --zope-conf; move the"
                                 " variables into this file"
                         % section_line)
                included = os.path.join(os.path.dirname(path),
                                        substitute(number, argument))
                environment.update(read_zope_environment(
                    included, defines, _seen + (path,)))
            continue
        if re.match(r"<environment\s*>$", lowered):
            if section_line is not None:
                fail(number, "<environment> inside <environment> (line %d)"
                     % section_line)
            section_line = number
        elif section_line is not None:
            if re.match(r"</environment\s*>$", lowered):
                section_line = None
            elif line.startswith("<"):
                fail(number, "%s inside <environment> (line %d), which"
                             " holds only NAME value lines"
                     % (line, section_line))
            else:
                name, value = (line.split(None, 1) + [""])[:2]
                environment[name] = substitute(number, value.strip())
    if section_line is not None:
        fail(section_line, "<environment> is never closed by"
                           " </environment>")
    return environment


@contextlib.contextmanager
def _environment(variables):
    """Set ``variables`` in os.environ (as Zope does with its
    <environment> section: they win over what is set already); put back
    what was there on the way out."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _zope_environment(stack, args):
    """Apply the <environment> of ``--zope-conf`` for the command's
    duration; return the variables it set (empty without the option)."""
    if getattr(args, "zope_conf", None) is None:
        return {}
    variables = read_zope_environment(args.zope_conf)
    stack.enter_context(_environment(variables))
    return variables


def _missing_variable_hint(variable, args):
    """What to say when the ``env:`` DSN ``variable`` is not set."""
    zope_conf = getattr(args, "zope_conf", None)
    if zope_conf is None:
        return ("%s is not set in this shell. When Zope gets it from the"
                " <environment> section of its zope.conf, pass that file:"
                " --zope-conf /path/to/instance/etc/zope.conf; or set it:"
                " export %s=..." % (variable, variable))
    named = sorted(read_zope_environment(zope_conf))
    return ("--zope-conf %s does not set %s either (its <environment>"
            " section sets %s); add a line '%s <dsn>' there, or set it in"
            " this shell" % (zope_conf, variable,
                             ", ".join(named) if named else "nothing",
                             variable))


def add_zope_conf(command):
    """Give ``command`` (an argparse parser) the --zope-conf option."""
    command.add_argument(
        "--zope-conf", metavar="PATH",
        help="a Zope zope.conf whose <environment> section to apply first, "
             "as Zope does (for env:NAME DSNs set there)")
