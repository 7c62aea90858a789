"""Leaves computed whole by their coordinator, without a session of their own; and the
session a leaf gets when it cannot be (a slow pace, a hook that fails), which takes over
what was computed of it instead of computing it again."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import million_testplugin
import pytest
import trio

import million
from million.compute.computation import Computation
from million.compute.plugins import plugin_from_object
from million.compute.runner import open_run
from million.compute.tree import Spec
from million.compute.worker import Context, RunFailed, work

HOLD = 0.2  # s: a leaf computed whole takes no longer (the default is a second)


class Counting:
    """The test plugin's hooks, counting their calls: partition ``slow`` takes longer than
    a leaf computed whole may (``HOLD``), partition ``flaky`` raises the first time,
    partition ``held`` waits for ``go``, partition ``fail`` always raises."""

    def __init__(self, slow: int = -1, flaky: int = -1, held: int = -1, fail: int = -1) -> None:
        self.slow, self.flaky, self.held, self.fail = slow, flaky, held, fail
        self.go = threading.Event()  # partition ``held`` waits for it
        self.entered = threading.Semaphore(0)  # released each time partition ``held`` begins
        self.prepared: Counter[str] = Counter()
        self.computed: Counter[int] = Counter()
        self.collected = 0

    @million.hookimpl
    def prepare_inputs(self, input: Any, count: int, options: Any) -> list[Any]:
        self.prepared[input] += 1
        return million_testplugin.prepare_inputs(input, count, options)

    @million.hookimpl
    def compute(self, input: Any, index: int, options: Any) -> Any:
        self.computed[index] += 1
        if index == self.flaky and self.computed[index] == 1:
            raise ConnectionError("lost, once")
        if index == self.fail:
            raise ValueError("never")
        if index == self.slow:
            time.sleep(HOLD * 1.5)
        if index == self.held:
            self.entered.release()
            self.go.wait(60)
        return million_testplugin.compute(input, index, options)

    @million.hookimpl
    def collect_results(self, outputs: list[Any], options: Any) -> Any:
        self.collected += 1
        return million_testplugin.collect_results(outputs, options)


async def run_alone(
    reflector: Any, hooks: Counting, partitions: int, fanout: int, hold: float = HOLD, **settings: Any
) -> tuple[Any, Any, set[str]]:
    """Run ``R`` with one worker in this process, computing leaves whole in up to ``hold``
    s: its answer, the root's model, and the sessions made."""
    spec = Spec("counting", "0", "in", partitions, fanout, **settings)
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


async def test_each_leaf_and_the_root_are_collected_once_from_outputs_as_their_model_holds_them(reflector):
    # Leaf 0 goes on in a session. Its last reporter, and the root's, collect while their
    # last report goes round, from the outputs as the model will hold them (a child's
    # output is sent as encoded JSON, and held decoded).
    hooks = Counting(slow=3)
    answer, _, names = await run_alone(reflector, hooks, 20, 10)
    assert answer == million_testplugin.expected("in", 20, 10)
    assert names == {"R", "R-0"}
    assert hooks.collected == 3, "a collect was done again"


async def test_a_first_partition_too_slow_for_a_leaf_computed_whole_is_taken_on_by_its_session(reflector):
    hooks = Counting(held=0)  # the first partition, computed to learn the pace, waits for go
    spec = Spec("counting", "0", "in", 20, 10)
    async with million.open_client(reflector.url) as client, open_run(client, "R", spec) as (root, _):
        ctx = Context(client, plugin_from_object("counting", hooks), hold=HOLD)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, ctx, "R")
            assert await trio.to_thread.run_sync(lambda: hooks.entered.acquire(timeout=30))
            with trio.fail_after(30):  # begun while the partition is still being computed
                while not await _begun(client, "R-0"):  # noqa: ASYNC110 (another's session: no event)
                    await trio.sleep(0.01)
            hooks.go.set()
        names = {name for name in await reflector.store.names() if ":" not in name}
    assert root.model.output == million_testplugin.expected("in", 20, 10)
    assert names == {"R", "R-0"}  # leaf 1, at the pace of leaf 0's session, was computed whole
    assert hooks.computed == Counter(range(20)), "a partition was computed twice"
    assert sum(hooks.prepared.values()) == 3, "a leaf was prepared twice"


async def _begun(client: million.Client, name: str) -> bool:
    """Whether session ``name`` exists and has its inputs."""
    try:
        async with million.join(client, name, Computation, create=False) as session:
            return session.model.inputs is not None
    except million.JoinError:
        return False


async def test_a_hook_failing_in_a_leaf_computed_whole_is_retried_in_its_session(reflector):
    hooks = Counting(flaky=5)
    answer, _, names = await run_alone(reflector, hooks, 20, 10)
    assert answer == million_testplugin.expected("in", 20, 10)
    assert names == {"R", "R-0"}  # leaf 1 was computed whole
    assert hooks.computed == Counter(range(20)) + Counter([5])  # 5 failed once, then in the session
    assert sum(hooks.prepared.values()) == 3
    async with (
        million.open_client(reflector.url) as client,
        million.join(client, "R-0", Computation, create=False) as leaf,
    ):
        assert list(leaf.model.attempts) == [5]  # the failure counts as the session's first attempt


async def test_a_hook_failing_in_a_leaf_computed_whole_counts_against_max_failures(reflector):
    hooks = Counting(fail=5)
    with pytest.raises(RunFailed, match=r"partition 5 \(index 5 of R-0\) failed in compute 1 times"):
        await run_alone(reflector, hooks, 20, 10, max_failures=1)
    assert hooks.computed[5] == 1  # no attempt beyond the one allowed


async def test_a_bot_handed_a_leaf_another_computes_whole_waits_for_it_and_begins_no_session(reflector):
    hooks = Counting(held=15)
    spec = Spec("counting", "0", "in", 20, 10)
    async with million.open_client(reflector.url) as client, open_run(client, "R", spec) as (root, _):
        ctx = Context(client, plugin_from_object("counting", hooks), hold=600)
        async with trio.open_nursery() as nursery:
            for _ in range(2):  # two bots of one process
                nursery.start_soon(work, ctx, "R")
            with trio.fail_after(30):  # leaf 0 is done, and both bots hold leaf 1
                await root.wait_for(lambda model: model.completed[0] and len(model.workers) == 2)
            hooks.go.set()
        names = {name for name in await reflector.store.names() if ":" not in name}
    assert root.model.output == million_testplugin.expected("in", 20, 10)
    assert names == {"R"}  # the second bot neither began leaf 1's session nor computed it
    assert hooks.computed == Counter(range(20)) and sum(hooks.prepared.values()) == 3


async def test_a_leaf_whose_holder_stalls_computing_it_whole_gets_a_session_from_the_others(reflector):
    hooks = Counting(held=15)
    spec = Spec("counting", "0", "in", 20, 10)
    async with million.open_client(reflector.url) as client, open_run(client, "R", spec) as (root, _):
        # The pace known: both bots compute their first leaves whole, however slow a first partition.
        ctx = Context(client, plugin_from_object("counting", hooks), hold=HOLD, pace=0.001)
        async with trio.open_nursery() as nursery:
            for _ in range(2):  # two bots of one process
                nursery.start_soon(work, ctx, "R")
            for _ in range(2):  # the stalled bot, then the other in the session it began
                assert await trio.to_thread.run_sync(lambda: hooks.entered.acquire(timeout=30))
            hooks.go.set()
        names = {name for name in await reflector.store.names() if ":" not in name}
    assert root.model.output == million_testplugin.expected("in", 20, 10)
    assert names == {"R", "R-1"} and hooks.computed[15] == 2
