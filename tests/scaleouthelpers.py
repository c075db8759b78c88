"""Helpers of the scale-out tests (PgBouncer, fail-over, partitions).

Everything runs against real servers started by zpgpool.testing; the
figures the tests measure are printed with ``report()`` so that they show
in the test output (``-vv``) and in the documentation that quotes them.
"""
import sys
import threading

import transaction

from tests.poolhelpers import WAIT
from tests.poolhelpers import query


def report(module, message):
    """Show a measured figure in the test output."""
    print("\n    [%s] %s" % (module, message), file=sys.stderr)


#: What a transaction reads first, to see whether an earlier client's
#: session state reached it: the custom setting, the user, advisory locks
#: held by this backend, prepared statements, the temporary table, the
#: backend's pid.
PROBE = (
    "SELECT current_setting('zp.test', true), current_user, "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    " AND pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_prepared_statements), "
    "to_regclass('pg_temp.zp_tmp') IS NOT NULL, "
    "pg_backend_pid()")

#: The session changes a client may make, by name; each takes the
#: client's mark (a small integer).
SESSION_CHANGES = {
    "set": lambda mark: "SET zp.test = 'client-%d'" % mark,
    "role": lambda mark: "SET ROLE zp_scaleout_role",
    "temp": lambda mark: "CREATE TEMP TABLE zp_tmp (n int)",
    "lock": lambda mark: "SELECT pg_advisory_lock(%d)" % (7000 + mark),
    "prepare": lambda mark: "PREPARE zp_s AS SELECT %d" % mark,
}

ROLE = "zp_scaleout_role"


def ensure_role(dsn):
    """Create the role the tests SET ROLE to (once per cluster)."""
    query(dsn, "DO $$ BEGIN CREATE ROLE %s NOLOGIN; "
               "EXCEPTION WHEN duplicate_object THEN NULL; END $$" % ROLE)


def leaked(row, login_user="postgres"):
    """Say what earlier session state the PROBE row shows, or None."""
    setting, user, locks, prepared, temp, _pid = row
    found = []
    if setting not in ("", None):
        found.append("setting zp.test=%r" % setting)
    if user != login_user:
        found.append("current_user %r" % user)
    if locks:
        found.append("%d advisory lock(s)" % locks)
    if prepared:
        found.append("%d prepared statement(s)" % prepared)
    if temp:
        found.append("temporary table zp_tmp")
    return ", ".join(found) or None


def run_threads(targets, timeout=WAIT * 4):
    """Run each callable in a thread of its own; return their results,
    raising the first error (a hang fails too)."""
    results = [None] * len(targets)
    errors = []

    def run(i, target):
        try:
            results[i] = target()
        except BaseException as exc:   # reported below
            errors.append(exc)
        finally:
            transaction.abort()

    threads = [threading.Thread(target=run, args=(i, t), daemon=True)
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise AssertionError("threads hang: %s" % ", ".join(stuck))
    if errors:
        raise errors[0]
    return results
