"""The clock the commands run trio with: sleeps that end on time.

trio waits for its next deadline in ``epoll``, whose timeout CPython rounds up to whole
milliseconds, so that a ``trio.sleep`` ends up to a millisecond late (0.8 ms on average
here), and timers due within one millisecond wake together. A plugin step that waits
75 ms a hundred times in a row loses a tenth of a second so. This clock lets the poll
wait the whole milliseconds, and sleeps the rest (under a millisecond, and only while
the loop has nothing else to do) in slices of ``SLICE`` s, between which the loop polls
for I/O without waiting: spinning through it instead would cost a bot process a fifth
of its CPU in a run whose every step waits.
"""

from __future__ import annotations

import math
import time

import trio

__all__ = ["PreciseClock"]

SLICE = 0.0002  # s: the longest the loop sleeps without polling, in its last millisecond before a timer


class PreciseClock(trio.abc.Clock):
    """trio's system clock, with the poll's timeout cut to whole milliseconds."""

    def __init__(self) -> None:
        self._offset = 0.0

    def start_clock(self) -> None:
        self._offset = 10_000.0 - time.perf_counter()  # trio's clocks start far from 0

    def current_time(self) -> float:
        return self._offset + time.perf_counter()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        left = deadline - self.current_time()
        if not left < 3600:  # no deadline (infinity), or a far one
            return left
        if 0 < left < 0.001:  # the poll would wait a whole millisecond: sleep a slice, then poll
            time.sleep(min(left, SLICE))
            return 0.0
        return max(0.0, math.floor(left * 1000) / 1000 - 1e-6)  # a hair less, lest it be rounded up
