"""The commands' trio clock: the poll waits whole milliseconds, and the rest is slept in
slices with a poll between them."""

from __future__ import annotations

import math
import time

import pytest
import trio

from million.cli import clock as clocks
from million.cli.clock import PreciseClock


def started() -> PreciseClock:
    clock = PreciseClock()
    clock.start_clock()
    return clock


def test_the_poll_waits_the_whole_milliseconds_left_and_never_more():
    clock = started()
    for left in [0.0743, 0.075, 1.0009, 0.0015]:
        wait = clock.deadline_to_sleep_time(clock.current_time() + left)
        ms = (wait + 1e-6) * 1000  # CPython rounds a poll's timeout up to whole ms
        assert abs(ms - round(ms)) < 1e-6 and round(ms) >= 1
        assert 0 < left - wait < 0.0011  # a millisecond short at most, slept in slices


def test_under_a_millisecond_left_the_loop_sleeps_a_slice_then_polls(monkeypatch: pytest.MonkeyPatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = started()
    monkeypatch.setattr(clock, "current_time", lambda: 0.0)  # time stands still
    assert clock.deadline_to_sleep_time(0.0009) == 0.0
    assert clock.deadline_to_sleep_time(0.00005) == 0.0
    assert clock.deadline_to_sleep_time(-1.0) == 0.0  # past: no sleep
    assert slept[0] == clocks.SLICE and 0 < slept[1] <= 0.00005 and len(slept) == 2  # never past it


def test_no_deadline_waits_as_long_as_trio_likes():
    clock = started()
    assert clock.deadline_to_sleep_time(math.inf) == math.inf


def test_sleeps_end_no_earlier_than_asked():
    async def sleep() -> float:
        start = trio.current_time()
        await trio.sleep(0.0123)
        return trio.current_time() - start

    assert trio.run(sleep, clock=PreciseClock()) >= 0.0123
