"""zpgpool's words added to zope.configuration's errors about a
``<zpgpool:...>`` directive: the attribute meant, the variable missing."""
import difflib
import os
import re

from zpgpool.cli.zopeconf import _missing_variable_hint


def _zpgpool_directives():
    """(namespace, {directive name: its schema}) from zpgpool's meta.zcml:
    read there, so that this stays true when a directive is added."""
    import xml.etree.ElementTree as ElementTree
    from zope.configuration.name import resolve
    import zpgpool

    meta = os.path.join(os.path.dirname(zpgpool.__file__), "meta.zcml")
    tag = "{http://namespaces.zope.org/meta}"
    namespace, directives = None, {}
    for group in ElementTree.parse(meta).getroot().iter(tag + "directives"):
        namespace = group.get("namespace")
        for each in group.iter(tag + "directive"):
            directives[each.get("name")] = resolve(each.get("schema"),
                                                   "zpgpool")
    return namespace, directives


# How zope.configuration's text names where a directive is.
_LOCATION = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)'
                       r'\.(?P<column>\d+)')


def _element_at(text):
    """The (namespace, name, attributes) of the directive that the last
    (innermost) location in the error ``text`` points at, or None."""
    import xml.parsers.expat
    locations = list(_LOCATION.finditer(text))
    if not locations:
        return None
    where = locations[-1]
    wanted = (int(where.group("line")), int(where.group("column")))
    found = []
    # expat reports the positions zope.configuration reports (it reads
    # the file through expat too).
    parser = xml.parsers.expat.ParserCreate(namespace_separator=" ")

    def start(name, attributes):
        if (parser.CurrentLineNumber, parser.CurrentColumnNumber) == wanted:
            namespace, _, local = name.rpartition(" ")
            found.append((namespace, local, attributes))

    parser.StartElementHandler = start
    try:
        with open(where.group("file"), "rb") as f:
            parser.ParseFile(f)
    except (OSError, xml.parsers.expat.ExpatError):
        return None
    return found[0] if found else None


def _explain_zcml_error(exc, text, args):
    """Advice on a ZCML error whose raw text leaves a newcomer guessing,
    or None."""
    namespace, directives = _zpgpool_directives()
    reason = exc.args[0] if exc.args else None

    if reason == "Unknown directive" and len(exc.args) == 3 \
            and exc.args[1] == namespace:
        name = exc.args[2]
        where = _LOCATION.findall(text)
        in_file = " in %s" % where[-1][0] if where else ""
        if name in directives:
            return ("<zpgpool:%s> is unknown because zpgpool's ZCML is not"
                    " included: put <include package=\"zpgpool\" /> (or"
                    " <include package=\"zpgpool\" file=\"meta.zcml\" />"
                    " for the directives alone) inside <configure>, before"
                    " the first <zpgpool:...> directive%s."
                    % (name, in_file))
        return ("zpgpool has no directive <zpgpool:%s>; it has %s.%s" % (
            name, ", ".join("<zpgpool:%s>" % d for d in sorted(directives)),
            _did_you_mean(name, directives)))

    element = _element_at(text)
    if element is None or element[0] != namespace \
            or element[1] not in directives:
        return None
    name, attributes = element[1], element[2]
    if reason == "Unrecognized parameters:":
        fields = _field_names(directives[name])
        lines = ["<zpgpool:%s> has no attribute %r.%s" % (
            name, unknown, _did_you_mean(unknown, fields))
            for unknown in exc.args[1:]]
        lines.append("Its attributes are: %s." % ", ".join(fields))
        return "\n".join(lines)
    dsn = attributes.get("dsn", "").strip()
    if dsn.startswith("env:"):
        variable = dsn[4:].strip()
        if variable and variable not in os.environ:
            return _missing_variable_hint(variable, args)
    return None


def _field_names(schema):
    from zope.schema import getFieldNamesInOrder
    return getFieldNamesInOrder(schema)


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(word, list(choices), n=1)
    return " Did you mean %r?" % close[0] if close else ""
