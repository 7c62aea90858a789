"""Workers at scale: the lobby, churn, crashes, late joiners and crowds, with real processes."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import attrs
import million_testplugin
import pytest
import trio
import trio.testing

import million
from helpers import finish, ordered_spec, start_reflector, start_worker, wait_for_markers
from million.compute import plugins
from million.compute.bots import run_bots, run_lobby_bots
from million.compute.computation import Computation
from million.compute.lobby import LOBBY, Lobby, post_event
from million.compute.progress import Progress
from million.compute.runner import open_run
from million.compute.tree import Spec
from million.replica import state
from million.replica.session import JoinError

pytestmark = pytest.mark.one_engine  # the transport is tested elsewhere


async def post_run(client: million.Client, name: str, spec: Spec) -> None:
    async with million.join(client, LOBBY, Lobby) as lobby:
        lobby.publish("post", post_event(name, spec))
        await lobby.wait_for(lambda model: name in model.runs)


async def finished_everywhere(
    client: million.Client, name: str, options: dict[str, Any] | None = None
) -> int:
    """Check that session ``name`` and every session below it are done and hold one output
    per partition; returns how many parts of the tree were checked: sessions, and leaves
    computed whole without one (their parent holds their output)."""
    try:
        children = await _finished(client, name, options)
    except million.JoinError as exc:
        assert exc.code == "not-found" and options and Spec.from_options(options).leaf, f"{name}: {exc}"
        return 1
    checked = 1
    for child, child_options in children:
        checked += await finished_everywhere(client, child, child_options)
    return checked


async def _finished(
    client: million.Client, name: str, options: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """Check that session ``name`` is done and holds one output per partition; its children."""
    async with million.join(client, name, Computation, options=options, create=False) as session:
        model = session.model
        spec = Spec.from_options(session.options)
        assert model.done, f"{name} is not finished"
        assert all(model.completed) and len(model.outputs) == spec.count
        if not spec.leaf:
            return [spec.child(name, i, model.inputs[i]) for i in range(spec.count)]
        inputs = model.inputs
        assert model.outputs == [f"{inputs[i]}@{spec.start + i}" for i in range(spec.count)]
        return []


async def test_lobby_workers_share_themselves_among_runs_and_pick_up_new_ones(reflector, tmp_path):
    gated = ordered_spec("slow", 40, 10, slow=[0], marker_dir=str(tmp_path))
    quick = ordered_spec("quick", 60, 7)
    async with million.open_client(reflector.url) as client:
        async with open_run(client, "gated", gated) as (gated_root, _):
            await post_run(client, "gated", gated)
            worker = start_worker(reflector.url, None, 4)
            try:
                await wait_for_markers(gated_root, tmp_path, name="0", seconds=30)
                async with open_run(client, "quick", quick) as (quick_root, _):
                    await post_run(client, "quick", quick)
                    with trio.fail_after(30):
                        await quick_root.wait_for(lambda model: model.done)
                    assert not gated_root.model.done  # picked up while the workers were busy
                    (tmp_path / "go").touch()
                    with trio.fail_after(30):
                        await gated_root.wait_for(lambda model: model.done)
                async with million.join(client, LOBBY, Lobby) as lobby:
                    with trio.fail_after(10):  # the workers tell the lobby
                        await lobby.wait_for(lambda model: not model.open_runs())
                    assert lobby.model.runs["quick"]["answer"] == quick_root.model.output
            finally:
                worker.stop()
        assert quick_root.model.output == million_testplugin.expected("quick", 60, 7)
        assert gated_root.model.output == million_testplugin.expected("slow", 40, 10)


async def finish_beside(client: million.Client, url: str, skipped: str, spec: Spec) -> str:
    """Post run ``skipped`` (which the caller holds open) and a run of the test plugin,
    let two lobby bots finish the latter, and return what their process logged."""
    mine = ordered_spec("mine", 12, 5)
    async with open_run(client, "mine", mine) as (root, _):
        await post_run(client, skipped, spec)
        await post_run(client, "mine", mine)
        worker = start_worker(url, None, 2)
        await finish(root, [worker], 30)
    assert root.model.output == million_testplugin.expected("mine", 12, 5)
    return worker.errors


async def test_lobby_workers_skip_a_run_whose_plugin_they_lack(reflector):
    foreign = Spec("nosuch", "9", 1, 10, 5)
    async with (
        million.open_client(reflector.url) as client,
        open_run(client, "foreign", foreign) as (root, _),
    ):
        errors = await finish_beside(client, reflector.url, "foreign", foreign)
        assert root.model.inputs is None
    assert "skipping run foreign: no plugin named 'nosuch' is installed" in errors


async def test_lobby_workers_skip_a_run_whose_root_is_no_computation(reflector):
    posted = ordered_spec("hollow", 10, 5)
    async with (
        million.open_client(reflector.url) as client,
        million.join(client, "hollow", Computation, options={}),  # an inert root
    ):
        errors = await finish_beside(client, reflector.url, "hollow", posted)
    assert "skipping run hollow: session hollow holds no valid computation: options must have" in errors
    assert "Traceback" not in errors


@attrs.define
class OlderComputation(million.Model, name="million.computation"):
    """What another version of million would have made a run's root with."""

    def init(self, options: Any) -> None:
        pass


async def test_lobby_workers_skip_a_run_made_by_another_version_of_million(reflector):
    older = ordered_spec("older", 10, 5)
    async with (
        million.open_client(reflector.url) as client,
        million.join(client, "older", OlderComputation, options=older.to_options(), create=True),
    ):
        errors = await finish_beside(client, reflector.url, "older", older)
    assert "skipping run older: session 'older' runs model 'million.computation', not" in errors


async def test_chaos_random_workers_killed_and_replaced(reflector, tmp_path):
    # Partitions spread over the second half hold their workers until three kills have
    # happened, so that the kills fall in the middle of the run however fast it is.
    held = list(range(10_000, 20_000, 997))
    spec = ordered_spec("chaos", 20_000, 30, slow=held, marker_dir=str(tmp_path))
    rng = random.Random(20261128)
    async with million.open_client(reflector.url) as client, open_run(client, "chaos", spec) as (root, _):
        workers = [start_worker(reflector.url, "chaos", 2) for _ in range(8)]
        kills = 0
        try:
            with trio.fail_after(240):
                while not root.model.done:
                    with trio.move_on_after(rng.uniform(0.5, 2.0)):
                        await root.wait_for(lambda model: model.done)
                    if root.model.done:
                        break
                    victim = rng.randrange(len(workers))
                    workers[victim].kill()
                    workers[victim] = start_worker(reflector.url, "chaos", 2)
                    kills += 1
                    if kills == 3:
                        (tmp_path / "go").touch()
        finally:
            for worker in workers:
                worker.stop()
        assert kills >= 3
        assert root.model.output == million_testplugin.expected("chaos", 20_000, 30)
        assert await finished_everywhere(client, "chaos") == 1 + 23 + 23 * 29  # children of 870, leaves of 30


async def test_drain_every_worker_stops_and_new_ones_finish(reflector, tmp_path):
    spec = ordered_spec("drain", 2_000, 10, slow=list(range(1000, 2000)), marker_dir=str(tmp_path))
    async with (
        million.open_client(reflector.url) as client,
        open_run(client, "drain", spec) as (root, progress),
    ):
        workers = [start_worker(reflector.url, "drain", 3) for _ in range(2)]
        await wait_for_markers(progress, tmp_path, count=3)
        for worker in workers:
            worker.stop()
        assert not root.model.done and progress.model.done < 2_000
        (tmp_path / "go").touch()
        await finish(root, [start_worker(reflector.url, "drain", 3) for _ in range(2)], 60)
        assert root.model.output == million_testplugin.expected("drain", 2_000, 10)


async def test_a_killed_reflector_restarted_on_its_store_finishes_the_run(tmp_path):
    store = str(tmp_path / "store.db")
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = ordered_spec("crash", 3_000, 20, slow=list(range(1500, 3000)), marker_dir=str(markers))
    reflector, url = await start_reflector(store)
    port = int(url.rsplit(":", 1)[1])
    workers = [start_worker(url, "crash", 4) for _ in range(2)]
    try:
        async with million.open_client(url) as client, open_run(client, "crash", spec) as (root, progress):
            await wait_for_markers(progress, markers, count=2)
            reflector.kill()
            (markers / "go").touch()
            reflector, _ = await start_reflector(store, port)
            with trio.fail_after(120):
                await root.wait_for(lambda model: model.done)
            assert root.model.output == million_testplugin.expected("crash", 3_000, 20)
            assert await finished_everywhere(client, "crash") == 1 + 8 + 8 * 19  # leaves of 20
    finally:
        for worker in workers:
            worker.stop()
        reflector.stop()


async def test_a_late_joiner_of_a_big_leaf_takes_work_at_once(reflector, tmp_path):
    spec = ordered_spec("late", 1_000, 1_000, slow=list(range(500, 1000)), marker_dir=str(tmp_path))
    async with million.open_client(reflector.url) as client, open_run(client, "late", spec) as (root, _):
        early = start_worker(reflector.url, "late", 1)
        late = None
        try:
            await wait_for_markers(root, tmp_path, name="500")
            members = set(root.model.workers)
            late = start_worker(reflector.url, "late", 1)
            with trio.fail_after(30):
                await root.wait_for(lambda model: set(model.workers) - members)
            newcomer = root.model.views[(set(root.model.workers) - members).pop()]
            (tmp_path / "go").touch()
            with trio.fail_after(60):
                await root.wait_for(lambda model: model.done)
        finally:
            early.stop()
            if late is not None:
                late.stop()
        assert root.model.tally[newcomer]["validated"] >= 1  # its results were taken
        assert root.model.output == million_testplugin.expected("late", 1_000, 1_000)


async def test_a_herd_of_200_bots_all_get_work_and_the_reflector_stays_responsive(reflector, tmp_path):
    # The last partition of every leaf waits for a go, so that the run lasts until the
    # whole herd has found its way into the run and been handed a leaf (once a leaf is
    # done, a bot that asks gets only one overdue), however fast or slow the machine.
    held = [leaf * 100 + 99 for leaf in range(100)]
    spec = ordered_spec("herd", 10_000, 100, slow=held, marker_dir=str(tmp_path))
    async with (
        million.open_client(reflector.url) as client,
        open_run(client, "herd", spec) as (root, _),
        million.open_client(reflector.url) as watcher,
    ):
        herd = [start_worker(reflector.url, "herd", 100) for _ in range(2)]
        bots, working = 0, 0
        try:
            with trio.fail_after(180):
                while not root.model.done:
                    with trio.fail_after(1):
                        status = await watcher.status()  # the reflector answers at once
                    (listed,) = [s for s in status["sessions"] if s["name"] == "herd"]
                    bots = max(bots, listed["participants"] - 1)  # all but this test's client
                    working = max(working, len(root.model.workers))
                    if bots >= 200 and working == 200:
                        (tmp_path / "go").touch()
                    with trio.move_on_after(0.1):
                        await root.wait_for(lambda model: model.done)
        finally:
            for worker in herd:
                worker.stop()
        assert bots >= 200  # every bot joined the run
        assert working == 200  # every bot was handed a leaf (those second to one wait on its first)
        assert root.model.output == million_testplugin.expected("herd", 10_000, 100)
        assert await finished_everywhere(client, "herd") == 101
        for worker in herd:
            assert "Traceback" not in worker.errors and "refused" not in worker.errors


@pytest.mark.parametrize(
    "start",
    [lambda url: run_lobby_bots(url, 1), lambda url: run_bots(url, "nosuch", 1)],
    ids=["lobby bots", "bots of a run"],
)
async def test_bots_are_ready_before_their_first_run_starts(reflector, monkeypatch, start) -> None:
    """What a process's first run would otherwise wait for at its start (the hooks that
    snapshot the models, the plugins' entry points) is done as its bots start, lobby bots
    before any run is posted."""
    monkeypatch.setattr(state, "_primed", set())
    monkeypatch.setattr(plugins, "_found", {})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quietly, start, reflector.url)
        await trio.testing.wait_all_tasks_blocked()
        assert {Computation, Progress} <= state._primed
        monkeypatch.setattr(plugins, "entry_points", lambda **_: pytest.fail("the metadata was read again"))
        assert plugins.load_plugin("demo").name == "demo"
        nursery.cancel_scope.cancel()


async def _quietly(start: Any, url: str) -> None:
    """Lobby bots waiting for runs, or bots of a run that does not exist (they stop)."""
    with contextlib.suppress(JoinError):
        await start(url)
