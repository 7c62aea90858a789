"""Leaves computed whole by their coordinator, without a session of their own; and the
session a leaf gets when it cannot be (a slow pace, a hook that fails), which takes over
what was computed of it instead of computing it again."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import million_testplugin

import million
from million.compute.plugins import plugin_from_object
from million.compute.runner import open_run
from million.compute.tree import Spec
from million.compute.worker import Context, work

HOLD = 0.2  # s: a leaf computed whole takes no longer (the default is a second)


class Counting:
    """The test plugin's hooks, counting their calls: partition ``slow`` takes longer than
    a leaf computed whole may (``HOLD``), partition ``flaky`` raises the first time."""

    def __init__(self, slow: int = -1, flaky: int = -1) -> None:
        self.slow, self.flaky = slow, flaky
        self.prepared: Counter[str] = Counter()
        self.computed: Counter[int] = Counter()

    @million.hookimpl
    def prepare_inputs(self, input: Any, count: int, options: Any) -> list[Any]:
        self.prepared[input] += 1
        return million_testplugin.prepare_inputs(input, count, options)

    @million.hookimpl
    def compute(self, input: Any, index: int, options: Any) -> Any:
        self.computed[index] += 1
        if index == self.flaky and self.computed[index] == 1:
            raise ConnectionError("lost, once")
        if index == self.slow:
            time.sleep(HOLD * 1.5)
        return million_testplugin.compute(input, index, options)

    @million.hookimpl
    def collect_results(self, outputs: list[Any], options: Any) -> Any:
        return million_testplugin.collect_results(outputs, options)


async def run_alone(
    reflector: Any, hooks: Counting, partitions: int, fanout: int, hold: float = HOLD
) -> tuple[Any, Any, set[str]]:
    """Run ``R`` with one worker in this process, computing leaves whole in up to ``hold``
    s: its answer, the root's model, and the sessions made."""
    spec = Spec("counting", "0", "in", partitions, fanout)
    plugin = plugin_from_object("counting", hooks)
    async with million.open_client(reflector.url) as client, open_run(client, "R", spec) as (root, _):
        answer = await work(Context(client, plugin, hold=hold), "R")
        names = {name for name in await reflector.store.names() if ":" not in name}
        return answer, root.model, names


async def test_quick_leaves_are_computed_whole_without_sessions_and_tallied_as_in_them(reflector):
    hooks = Counting()
    answer, root, names = await run_alone(reflector, hooks, 1000, 10, hold=600)  # however slow the machine
    assert answer == million_testplugin.expected("in", 1000, 10)
    assert names == {"R", *(f"R-{i}" for i in range(10))}  # 100 leaves, no session
    assert hooks.computed == Counter(range(1000)) and sum(hooks.prepared.values()) == 1 + 10 + 100
    (counts,) = root.tally.values()
    # Each partition, and each session's prepare, children and collect, as leaf sessions count them.
    assert counts["validated"] == 1000 + 100 * 2 + 10 * (10 + 2) + (10 + 2)
    assert counts["rejected"] == counts["pending"] == 0


async def test_a_leaf_slower_than_a_leaf_computed_whole_may_be_goes_on_in_a_session(reflector):
    hooks = Counting(slow=3)
    answer, _, names = await run_alone(reflector, hooks, 20, 10)
    assert answer == million_testplugin.expected("in", 20, 10)
    # Leaf 0 went to a session after partition 3; leaf 1, at the quick pace of partitions
    # 4 to 9 in that session, was computed whole.
    assert names == {"R", "R-0"}
    assert hooks.computed == Counter(range(20)), "a partition was computed twice"
    assert sum(hooks.prepared.values()) == 3, "a leaf was prepared twice"


async def test_a_hook_failing_in_a_leaf_computed_whole_is_retried_in_its_session(reflector):
    hooks = Counting(flaky=5)
    answer, _, names = await run_alone(reflector, hooks, 20, 10)
    assert answer == million_testplugin.expected("in", 20, 10)
    assert names == {"R", "R-0"}  # leaf 1 was computed whole
    assert hooks.computed == Counter(range(20)) + Counter([5])  # 5 failed once, then in the session
    assert sum(hooks.prepared.values()) == 3
