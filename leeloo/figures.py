"""
Figures the relay's parts keep for its metrics, in plain numbers: a part
counts what it does with an integer addition, and L{leeloo.metrics} reads
the figures only when Prometheus scrapes.  Nothing here imports
C{prometheus_client}, so the core stays free of it.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterable

# Upper bounds (seconds) of the latency histograms: from half a millisecond
# (a fan-out to a small crew on an idle relay) to ten seconds (a store
# that stalls).
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class HistogramFigures:
    """
    A histogram as it stood: the count of observations at most each bound
    (not cumulative; the last one counts those above every bound), their
    sum and their count.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    def cumulative(self) -> list[tuple[str, int]]:
        """
        The buckets as Prometheus writes them: C{(le, count at most le)},
        ending with C{("+Inf", count)}.
        """
        buckets, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            buckets.append((repr(float(bound)), total))
        buckets.append(("+Inf", self.count))
        return buckets


class Histogram:
    """
    Observations counted by the smallest of C{bounds} they do not exceed:
    L{observe} is a bisection and three additions, no allocation.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Iterable[float] = LATENCY_BOUNDS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def figures(self) -> HistogramFigures:
        return HistogramFigures(self.bounds, tuple(self.counts), self.sum, self.count)
