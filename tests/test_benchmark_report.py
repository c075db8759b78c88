"""Tests for the benchmark report's verdicts (benchmarks/run.py): what the
README says the report tells about each target, from given ratios."""
import argparse
import importlib
import os
import sys
import unittest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks")


def _load_run():
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module("run")
    finally:
        sys.path.remove(BENCHMARKS)


class TargetVerdictTests(unittest.TestCase):

    def setUp(self):
        self.run = _load_run()
        args = argparse.Namespace(quick=False, reps=3, threads=[1, 4],
                                  duration=None)
        self.report = self.run.Report(self.run.Settings(args), [])

    def measure(self, key, workload, threads, ratios):
        """Record ``ratios`` to the raw floor (which took 100 µs)."""
        self.report.ratios[(workload, threads, key)] = list(ratios)
        self.report.times[(workload, threads, key)] = [100.0 * r
                                                       for r in ratios]

    def given(self, key, floor, one, four):
        """The same ratios for both workloads: ``one`` and ``four`` are
        (zpgpool's, its floor's) at 1 and at 4 threads."""
        for workload in ("select1", "readwrite"):
            for threads, (mine, floors) in ((1, one), (4, four)):
                self.measure(key, workload, threads, mine)
                self.measure(floor, workload, threads, floors)

    def line(self, name):
        found = [line for line in self.report.targets() if name in line]
        self.assertEqual(len(found), 1, found)
        return found[0]

    def test_a_missed_bound_below_the_floor_says_so(self):
        floor = self.run.BUNDLED_FLOOR
        # At 4 threads both miss 1.15; the floor by itself too.
        self.given("zpgpool-zope", floor,
                   ([0.95, 0.97, 0.99], [0.90, 0.92, 0.94]),
                   ([1.40, 1.44, 1.48], [1.28, 1.30, 1.32]))
        line = self.line("Zope path, one-phase, SELECT 1")
        self.assertTrue(line.startswith("**MISSED** at 4 threads"), line)
        self.assertIn("1: 0.97×, 4: 1.44×", line)
        # Paired by repetition: 1.44 / 1.30.
        self.assertIn("over its own floor (%s): 1: 1.05×, 4: 1.11×"
                      % self.run.C.BY_KEY[floor].label, line)
        self.assertIn("is itself above the bound at 4 threads (4: 1.30×)",
                      line)

    def test_no_such_line_when_the_floor_meets_the_bound(self):
        self.given("zpgpool-zope", self.run.BUNDLED_FLOOR,
                   ([0.98], [0.90]), ([1.25], [1.10]))
        line = self.line("Zope path, one-phase, SELECT 1")
        self.assertTrue(line.startswith("**MISSED** at 4 threads"), line)
        self.assertNotIn("itself above the bound", line)

    def test_a_met_target(self):
        self.given("zpgpool-zope", self.run.BUNDLED_FLOOR,
                   ([0.96], [0.93]), ([1.10], [1.30]))
        line = self.line("Zope path, one-phase, read-write")
        self.assertTrue(line.startswith("**met**"), line)
        self.assertNotIn("itself above the bound", line)

    def test_the_two_phase_path_is_held_to_its_own_floor(self):
        self.given("zpgpool-zope-2pc", self.run.TWOPHASE_FLOOR,
                   ([1.50], [1.70]), ([1.30], [1.35]))
        line = self.line("Zope path, two-phase, read-write")
        self.assertTrue(line.startswith("**MISSED** at 1 thread"), line)
        self.assertIn("is itself above the bound at 1 thread (1: 1.70×)",
                      line)


class PinningTests(unittest.TestCase):
    """The single-thread loops run on one CPU, and every thread of the
    process gets its CPUs back after (benchmarks/affinity.py)."""

    def test_this_process_on_one_cpu_and_back(self):
        sys.path.insert(0, BENCHMARKS)
        try:
            affinity = importlib.import_module("affinity")
        finally:
            sys.path.remove(BENCHMARKS)
        before = os.sched_getaffinity(0)
        with affinity.this_process_on_one_cpu() as said:
            inside = os.sched_getaffinity(0)
        self.assertEqual(inside, {max(before)})
        self.assertEqual(said, "this process pinned to CPU %d" % max(before))
        self.assertEqual(os.sched_getaffinity(0), before)
