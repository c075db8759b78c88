"""What every command shares: the program's name, its errors and how
it speaks to the terminal."""
import sys


PROG = "zpgpool"

#: The environment variable the demo's ZCML reads its DSN from.
DEMO_DSN_ENV = "ZPGPOOL_DEMO_DSN"

# The parts of a DSN that say where a pool connects; the table of
# ``check`` shows these and leaves out the defaults the pool adds
# (application_name, keepalives, time-outs).
_TARGET_KEYS = ("service", "host", "hostaddr", "port", "dbname", "user",
                "password", "sslmode")


class CommandError(Exception):
    """What went wrong, in the user's terms; exit status 1."""


def _say(*parts):
    print(*parts, flush=True)


def _warn(line):
    print(line, file=sys.stderr, flush=True)
