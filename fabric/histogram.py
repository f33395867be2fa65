"""Fixed-bucket histograms of durations, cheap enough for the packet path.

The cores (services, the DNS core, the tunnel core) observe latencies where they happen,
on whichever thread owns them; the metrics read a copy. An observation is one bisect over
a tuple of upper bounds and two in-place increments: no list, dict or tuple is made (the
float sum is the only new object, as any arithmetic in Python). A leaf: no project imports,
so every layer may keep one.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple

# Upper bounds in seconds (Prometheus `le`), ascending; +Inf is implicit.
# A wake: a hook that starts a process or VM, a port that comes up, a release.
WAKE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0)
# A DNS answer: microseconds from the zone, milliseconds to seconds from an upstream.
DNS_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0)
# A tunnel handshake: one round trip to the peer and its crypto.
HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HistogramSnapshot(NamedTuple):
    """A copy for the exposition: per-bucket (not cumulative) counts, the last one above
    the largest bound, and the sum of the observed values."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merged(self, other: HistogramSnapshot) -> HistogramSnapshot:
        """Two histograms of the same buckets as one (e.g. one per thread)."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be merged")
        return HistogramSnapshot(self.bounds,
                                 tuple(a + b for a, b in zip(self.counts, other.counts,
                                                             strict=True)),
                                 self.sum + other.sum)


class Histogram:
    """Counts of observed values by bucket (see module docstring)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            raise ValueError("histogram bounds must be non-empty and strictly ascending")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value: the first bucket whose bound is >= it (`le` is inclusive)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)
