"""Counts of durations in fixed buckets: what the pool records of its
waits (always) and of how long connections are held (when metrics are
on), for ``stats()``, the dashboard and Prometheus.

Recording is one bisection and two additions; the pool does it under its
own lock, so a histogram needs no lock of its own.
"""
import bisect

#: Upper bounds, in seconds, of the buckets: fine below a millisecond,
#: where a healthy pool lives, coarse up to a minute, where time-outs are.
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class Histogram:
    """Observations counted per bucket, with their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds=BOUNDS):
        if not bounds or bounds[-1] != float("inf"):
            bounds = tuple(bounds) + (float("inf"),)
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def record(self, seconds):
        # bisect_left: a value equal to a bound belongs to that bucket
        # (Prometheus buckets are "less than or equal").
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self):
        """A copy that later records do not change."""
        copy = Histogram.__new__(Histogram)
        copy.bounds = self.bounds
        copy.counts = list(self.counts)
        copy.sum = self.sum
        return copy

    @property
    def count(self):
        return sum(self.counts)

    def cumulative(self):
        """(upper bound, observations at or below it) pairs, as
        Prometheus exposes them."""
        total = 0
        pairs = []
        for bound, count in zip(self.bounds, self.counts):
            total += count
            pairs.append((bound, total))
        return pairs

    def quantile(self, q):
        """Estimate the ``q`` quantile (0 < q <= 1) in seconds, or None
        without observations.

        Linear within the bucket that holds it, as Prometheus's
        ``histogram_quantile`` does; in the last, unbounded bucket the
        estimate is that bucket's lower bound.
        """
        if not 0 < q <= 1:
            raise ValueError("a quantile is above 0 and at most 1, got %r"
                             % (q,))
        total = self.count
        if not total:
            return None
        rank = q * total
        seen = 0
        lower = 0.0
        for bound, count in zip(self.bounds, self.counts):
            if count and seen + count >= rank:
                if bound == float("inf"):
                    return lower
                return lower + (bound - lower) * (rank - seen) / count
            seen += count
            lower = bound
        return lower  # pragma: no cover - rank <= total always stops above

    def as_dict(self):
        """The histogram for JSON: bounds (``"+Inf"`` last), per-bucket
        counts, count, sum, median and p99."""
        return {
            "bounds": [b if b != float("inf") else "+Inf"
                       for b in self.bounds],
            "counts": list(self.counts),
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }
