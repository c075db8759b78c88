"""Helpers for the fault scenarios (tests/test_faults.py).

They live in ``zpgpool.testing.faults``, which stress/run.py uses too
without depending on this tests package; this module keeps the names the
tests import.
"""
from zpgpool.testing.faults import CLEAR_ERRORS  # noqa: F401
from zpgpool.testing.faults import COMMITTED  # noqa: F401
from zpgpool.testing.faults import FAILED_BEFORE_COMMIT  # noqa: F401
from zpgpool.testing.faults import FAILED_IN_COMMIT  # noqa: F401
from zpgpool.testing.faults import Load  # noqa: F401
from zpgpool.testing.faults import TcpProxy  # noqa: F401
from zpgpool.testing.faults import check_invariants  # noqa: F401
from zpgpool.testing.faults import check_no_leaks  # noqa: F401
from zpgpool.testing.faults import make_table  # noqa: F401
from zpgpool.testing.faults import one_request  # noqa: F401
from zpgpool.testing.faults import wait_until_all_succeed  # noqa: F401
