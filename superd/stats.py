"""Per-service counters the loop keeps, and the duration histogram.

Kept free of prometheus-client, which is imported only when a ``metrics:``
endpoint is configured (it costs ~10 MB of memory and 50 ms at start-up).
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)


@dataclass
class Durations:
    """A cumulative histogram of connection durations (seconds)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, int]]:
        result, running = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return result


@dataclass
class ServiceStats:
    accepted: int = 0
    active: int = 0
    spawn_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    durations: Durations = field(default_factory=Durations)
    health_checks: int = 0
