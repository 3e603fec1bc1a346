"""A heap of monotonic deadlines; the loop sleeps until the next one.

A cancelled timer lets go of its callback at once (the closure holds a
child or a session), and the heap is compacted when more than half of
its entries are cancelled (asyncio's rule): 200,000 connections that end
long before their ``timeout:`` leave nothing behind, even while one long
timer sits at the head of the heap.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Compact only past this many cancelled entries (asyncio's
# _MIN_SCHEDULED_TIMER_HANDLES), so a small heap is never rebuilt for one.
MIN_CANCELLED_TO_COMPACT = 100


def _nothing() -> None:
    """The callback of a timer that was cancelled or has run."""


class Timer:
    __slots__ = ("deadline", "callback", "cancelled", "_timers")

    def __init__(self, deadline: float, callback: Callable[[], None],
                 timers: Timers | None = None) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False
        self._timers = timers  # while in that heap and not cancelled

    def cancel(self) -> None:
        """Never run; the callback, and all it holds, is let go now."""
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = _nothing
        timers, self._timers = self._timers, None
        if timers is not None:
            timers._one_cancelled()


class Timers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0  # cancelled entries still in the heap

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock() + delay, callback, self)
        heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
        return timer

    def timeout(self) -> float | None:
        """Seconds until the next live deadline (None: no timer)."""
        while self._heap and self._heap[0][2].cancelled:
            self._pop()
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self.clock())

    def run_due(self) -> None:
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            timer = self._pop()
            if timer.cancelled:
                continue
            timer.cancelled = True
            timer._timers = None
            callback, timer.callback = timer.callback, _nothing
            try:
                callback()
            except Exception:  # a bug must not take every service down
                log.exception("internal error in timer %r; continuing", callback)

    def _pop(self) -> Timer:
        timer = heapq.heappop(self._heap)[2]
        if timer.cancelled:
            self._cancelled -= 1
        return timer

    def _one_cancelled(self) -> None:
        self._cancelled += 1
        if (self._cancelled > MIN_CANCELLED_TO_COMPACT
                and 2 * self._cancelled > len(self._heap)):
            # in place: run_due may be iterating over this very list
            self._heap[:] = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0
