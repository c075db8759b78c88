"""A pool's connection string, parsed once, and keeping passwords out of
text.

``ConnInfo`` merges the DSN, the extra libpq parameters and zpgpool's safe
defaults while the pool is built, and keeps what later needs it: the libpq
string to connect with, the masked form for a repr, the target for an
error, and how long one connect may take.  Nothing here connects.

``scrub_password``, ``hide_passwords`` and ``mask_dsn`` keep a password out
of an error, a log line or a repr; zcml.py and cli.py use them too.
"""
import re
import urllib.parse

import psycopg2
import psycopg2.extensions as _ext

from zpgpool.errors import InvalidOption


# Where a password can sit in a connection string that libpq may have
# refused: the userinfo of a URI, or a password=... or sslpassword=... pair
# (quoted or not, or in a URI's query).
_URI_PASSWORD = re.compile(r"^\s*postgres(?:ql)?://[^:@/?#]*:([^@/?#]+)@")
_KEYWORD_PASSWORD = re.compile(
    r"\b(?:ssl)?password\s*=\s*(?:'((?:[^'\\]|\\.)*)'?|(\S+))")

# Passwords in free text (ZCML source, an error quoting a DSN), where a
# value may also end at a quote.
_SOURCE_PASSWORDS = (
    (re.compile(r"(postgres(?:ql)?://[^:@/?#\s\"']*:)[^@/?#\s\"']+@"),
     r"\1***@"),
    (re.compile(r"(\b(?:ssl)?password\s*=\s*)"
                r"(?:'(?:[^'\\]|\\.)*'?|[^\s\"'&]+)"),
     r"\1***"),
)

_SECRET_KEYS = ("password", "sslpassword")


def scrub_password(message, dsn):
    """Return *message* with every password found in *dsn* replaced by
    ``***``, for a *dsn* libpq may not be able to parse."""
    secrets = []
    match = _URI_PASSWORD.match(dsn)
    if match:
        secrets.append(match.group(1))
        secrets.append(urllib.parse.unquote(match.group(1)))
    for match in _KEYWORD_PASSWORD.finditer(dsn):
        secret = match.group(1) or match.group(2) or ""
        # In a URI's query (?password=...) the value ends at the next '&'.
        secrets.extend((secret, secret.split("&")[0]))
        secrets.append(urllib.parse.unquote(secret.split("&")[0]))
    # Longest first, so that a password containing another is hidden whole.
    for secret in sorted(filter(None, set(secrets)), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def hide_passwords(text):
    """Return ``text`` with every password it shows replaced by ``***``."""
    for pattern, replacement in _SOURCE_PASSWORDS:
        text = pattern.sub(replacement, text)
    return text


def _masked(params):
    params = dict(params)
    for key in _SECRET_KEYS:
        if key in params:
            params[key] = "***"
    # make_dsn quotes values with spaces, so the result parses back.
    return _ext.make_dsn(**dict(sorted(params.items())))


def mask_dsn(dsn):
    """Return ``dsn`` as ``key=value`` pairs with the password hidden."""
    try:
        return _masked(_ext.parse_dsn(dsn))
    except psycopg2.Error:
        return "<unparsable dsn>"


def default_application_name(name):
    """``zpgpool:NAME``, cut to the 63 bytes the server keeps.

    A longer one makes the server send a NOTICE, which libpq prints, at
    every connect.
    """
    text = "zpgpool:%s" % name if name else "zpgpool"
    return text.encode("utf-8")[:63].decode("utf-8", "ignore")


class ConnInfo:
    """A DSN merged with extra parameters and zpgpool's defaults.

    ``conninfo``
        the libpq string to connect with (holds the password);
    ``masked``
        the same with the password shown as ``***``;
    ``target``
        host, port, database and user, for an error that says where the
        pool could not connect;
    ``target_session_attrs``
        the kind of server asked for (``any`` unless the DSN says);
    ``connect_limit``
        seconds one connect may take: libpq's ``connect_timeout`` (which
        libpq counts as 2 at least) and a second more, or 30 without one.

    ``label`` names the pool in the error a bad DSN raises.
    """

    def __init__(self, label, dsn, params, connect_timeout,
                 application_name):
        if not isinstance(dsn, str):
            raise InvalidOption("%s: dsn must be a string, got %s"
                                % (label, type(dsn).__name__))
        try:
            merged = _ext.parse_dsn(dsn)
            merged.update((k, str(v)) for k, v in (params or {}).items()
                          if v is not None)
            # Parsed again to let libpq reject unknown parameter names.
            _ext.parse_dsn(_ext.make_dsn(**merged))
        except psycopg2.Error as exc:
            # libpq's message names the bad part, which can be the password.
            raise InvalidOption("%s: invalid connection string: %s" % (
                label, scrub_password(str(exc).strip(), dsn))) from None
        defaults = {
            "connect_timeout": str(connect_timeout),
            "application_name": application_name,
            # Notice a peer that vanished (a failover, a dropped NAT
            # entry) in about a minute rather than the system's hours.
            "keepalives": "1",
            "keepalives_idle": "30",
            "keepalives_interval": "10",
            "keepalives_count": "3",
        }
        if _ext.libpq_version() >= 120000:
            defaults["tcp_user_timeout"] = "30000"
        for key, value in defaults.items():
            merged.setdefault(key, value)
        if merged.get("connect_timeout") == "0":
            del merged["connect_timeout"]
        self.conninfo = _ext.make_dsn(**merged)
        self.masked = _masked(merged)
        # The kind of server the pool asks libpq for (any, read-write,
        # read-only, primary, standby, prefer-standby).
        self.target_session_attrs = merged.get("target_session_attrs",
                                               "any")
        self.target = "host=%s port=%s dbname=%s user=%s" % tuple(
            merged.get(key, "(default)")
            for key in ("host", "port", "dbname", "user"))
        try:
            limit = int(merged.get("connect_timeout") or 0)
        except ValueError:   # libpq will say so at the first connect
            limit = 0
        self.connect_limit = max(limit, 2) + 1.0 if limit > 0 else 30.0
