"""Verified results over a real reflector with worker processes: liars are outvoted and
flagged, unfounded reports are ignored, colluders are held to the documented limit, and
trusted identities' results are taken alone."""

from __future__ import annotations

from typing import Any

import million_testplugin
import pytest
import trio

import million
from helpers import Process, start_reflector, start_worker
from million.compute.bots import worker_env
from million.compute.computation import Computation
from million.compute.ledger import LEDGER, Ledger
from million.compute.runner import RunConfig, RunError, RunResult, RunState, run
from million.relay.config import Identity, ReflectorConfig
from million.relay.server import open_reflector
from million.replica.session import Session
from million.replica.view import View

pytestmark = pytest.mark.one_engine  # the transport is tested elsewhere

LIAR = {million_testplugin.LIE: "1"}  # every result of the process is wrong, and wrong alike


def identity_of(worker: Process) -> str:
    """A worker process's identity on a reflector without ``--tokens``: its client's label."""
    return f"admin:bots-{worker.proc.pid}-"


def named(model: Computation, worker: Process) -> str:
    """The identity ``worker`` has in ``model``'s tally."""
    (identity,) = [who for who in model.tally if who.startswith(identity_of(worker))]
    return identity


class Run:
    """``million run --no-work`` on a reflector, in the background: its root once it
    exists, and its result (or error) once it ends."""

    def __init__(self, url: str, name: str, partitions: int, fanout: int = 0, **config: Any) -> None:
        fanout = fanout or partitions
        self.config = RunConfig(
            "ordered", name, partitions, fanout, name=name, reflector=url, processes=0, **config
        )
        self.started = trio.Event()
        self.ended = trio.Event()
        self.state: RunState | None = None
        self.result: RunResult | None = None
        self.error: RunError | None = None

    def watch(self, state: RunState) -> None:
        self.state = state
        self.started.set()

    async def go(self) -> None:
        try:
            self.result = await run(self.config, watch=self.watch)
        except RunError as exc:
            self.error = exc
        self.ended.set()

    @property
    def root(self) -> Session[View]:
        assert self.state is not None and self.state.root is not None
        return self.state.root

    async def wait(self, seconds: float = 60) -> None:
        with trio.fail_after(seconds):
            await self.ended.wait()


async def ledger_of(url: str, token: str | None = None) -> Ledger:
    async with (
        million.open_client(url, token=token) as client,
        million.join(client, LEDGER, Ledger) as session,
    ):
        model: Ledger = session.model
        return model


async def test_a_liar_beside_honest_workers_is_outvoted_flagged_and_credited_nothing(reflector):
    job = Run(reflector.url, "liar", 12, verify=2, max_rejections=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(job.go)
        await job.started.wait()
        liar, honest = start_worker(reflector.url, "liar", 1, LIAR), start_worker(reflector.url, "liar", 1)
        with trio.fail_after(30):  # the liar has prepared and computed before the third worker comes
            await job.root.wait_for(lambda model: _submitted(model, liar) >= 2)
        workers = [liar, honest, start_worker(reflector.url, "liar", 1)]
        try:
            await job.wait()
        finally:
            for worker in workers:
                worker.stop()
    assert job.error is None and job.result is not None
    assert job.result.answer == million_testplugin.expected("liar", 12, 12)
    lied = named(job.root.model, liar)
    credit = job.result.credit
    assert credit[lied]["rejected"] >= 1 and credit[lied]["validated"] <= 1  # its inputs: it lies in compute
    honest_ones = [who for who in credit if who != lied and credit[who]["submitted"]]
    assert len(honest_ones) == 2
    assert all(credit[who]["validated"] >= 1 and credit[who]["rejected"] == 0 for who in honest_ones)
    ledger = await ledger_of(reflector.url)
    assert ledger.identities[lied]["flagged"] and ledger.identities[lied]["rejected"] >= 1
    assert all(ledger.identities[who]["credit_ms"] >= 0 for who in honest_ones)
    assert all(ledger.identities[who]["validated"] >= 1 for who in honest_ones)


async def test_reports_for_claims_not_held_are_ignored_and_counted(reflector):
    job = Run(reflector.url, "forged", 6)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(job.go)
        await job.started.wait()
        async with (
            million.open_client(reflector.url, label="forger") as client,
            million.join(client, "forged", Computation, options=job.root.options) as forger,
        ):
            await forger.wait_for(lambda model: forger.view_id in model.views)
            forger.publish("inputs", {"inputs": ["forged"] * 6})
            for index in range(6):
                forger.publish("end", {"results": [{"index": index, "output": "forged"}]})
            forger.publish("output", "forged")
            identity = forger.model.views[forger.view_id]
            await forger.wait_for(lambda model: model.tally.get(identity, {}).get("rejected", 0) >= 7)
            assert forger.model.inputs is None and not any(forger.model.completed)
            worker = start_worker(reflector.url, "forged", 2)
            try:
                await job.wait()
            finally:
                worker.stop()
    assert job.error is None and job.result is not None
    assert job.result.answer == million_testplugin.expected("forged", 6, 6)
    assert job.result.credit[identity]["rejected"] == 8 and job.result.credit[identity]["validated"] == 0


@pytest.mark.parametrize(("verify", "outvoted"), [(3, True), (2, False)])
async def test_two_colluding_liars_are_outvoted_by_three_but_not_by_two(reflector, verify, outvoted):
    name = f"collude{verify}"
    job = Run(reflector.url, name, 8, verify=verify, max_rejections=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(job.go)
        await job.started.wait()
        liars = [start_worker(reflector.url, name, 1, LIAR) for _ in range(2)]
        workers = [*liars, start_worker(reflector.url, name, 1)]  # three identities: they can prepare
        with trio.fail_after(30):  # the two liars report every partition before two more come
            await job.root.wait_for(lambda model: _both_reported(model, liars))
        workers += [start_worker(reflector.url, name, 1) for _ in range(2)]
        try:
            await job.wait()
        finally:
            for worker in workers:
                worker.stop()
    honest = million_testplugin.expected(name, 8, 8)
    if outvoted:
        assert job.error is None and job.result is not None and job.result.answer == honest
    else:  # the documented limit: verify identities agreeing on a value make it the value
        assert job.result is not None and job.result.answer != honest
        assert job.root.model.outputs == [f"lie@{index}" for index in range(8)]


def _submitted(model: Computation, worker: Process) -> int:
    return sum(c["submitted"] for who, c in model.tally.items() if who.startswith(identity_of(worker)))


def _both_reported(model: Computation, liars: list[Process]) -> bool:
    """Whether the two liars have reported every partition of a single-leaf run."""
    who = [name for name in model.tally if any(name.startswith(identity_of(liar)) for liar in liars)]
    ballots = [model.ballots.get(index) for index in range(model.count)]
    return len(who) == 2 and all(ballot and set(who) <= set(ballot.votes) for ballot in ballots)


async def test_trusted_identities_results_are_taken_alone_on_a_second_run(tmp_path):
    token = {name: f"token-of-{name}-0123456789" for name in ("lead", "w1", "w2")}
    people = [
        Identity("lead", "admin", token["lead"]),
        *(Identity(w, "worker", token[w]) for w in ("w1", "w2")),
    ]
    config = ReflectorConfig(port=0, store=str(tmp_path / "store.db"), identities=tuple(people))
    copies = []
    async with open_reflector(config) as reflector:
        for name, fanout in (("first", 30), ("second", 30), ("deep", 3)):
            job = Run(reflector.url, name, 30, fanout, verify="adaptive", token=token["lead"])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(job.go)
                await job.started.wait()
                workers = [
                    start_worker(reflector.url, name, 2, worker_env(token[w], None)) for w in ("w1", "w2")
                ]
                try:
                    await job.wait()
                finally:
                    for worker in workers:
                        worker.stop()
            assert job.error is None and job.result is not None
            assert job.result.answer == million_testplugin.expected(name, 30, fanout)
            model = job.root.model
            copies.append([1 if model.alone[i] else len(model.assignees[i]) for i in range(model.count)])
        ledger = await ledger_of(reflector.url, token["lead"])
    first, second, deep = copies
    assert first == [2] * 30  # nobody is trusted yet: two identities compute each partition
    assert sum(count == 1 for count in second) >= 20  # trusted (32 valid in a row): mostly alone
    assert deep.count(1) >= 2  # children handed alone: worked alone below (the answer is right)
    assert {who: entry["flagged"] for who, entry in ledger.identities.items()} == {
        "worker:w1": False,
        "worker:w2": False,
    }


async def test_chaos_under_verification_keeps_the_answer_and_the_ledger(tmp_path):
    store, markers = str(tmp_path / "store.db"), tmp_path / "markers"
    markers.mkdir()
    options = {"slow": [450], "marker_dir": str(markers)}  # holds the run until the kills are done
    reflector, url = await start_reflector(store)
    port = int(url.rsplit(":", 1)[1])
    job = Run(url, "chaos", 600, 20, verify=2, options=options)
    workers = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.go)
            await job.started.wait()
            workers = [start_worker(url, "chaos", 2) for _ in range(4)]
            with trio.fail_after(60):  # the held partition is being computed
                while not (markers / "450").exists():
                    with trio.move_on_after(0.05):  # files: looked at now and then
                        await job.root.wait_changed()
            workers[0].kill()  # SIGKILL: it held partitions and claims
            workers[0] = start_worker(url, "chaos", 2)
            reflector.kill()
            (markers / "go").touch()
            reflector, _ = await start_reflector(store, port)
            await job.wait(180)
        reflector.kill()
        reflector, _ = await start_reflector(store, port)
        ledger = await ledger_of(url)
    finally:
        for worker in workers:
            worker.stop()
        reflector.stop()
    assert job.error is None and job.result is not None
    assert job.result.answer == million_testplugin.expected("chaos", 600, 20)
    credit = {who: counts for who, counts in job.result.credit.items() if counts["submitted"]}
    assert sum(counts["rejected"] for counts in credit.values()) == 0
    assert sum(counts["validated"] for counts in credit.values()) >= 2 * (600 + 30)  # two of each
    assert "chaos" in ledger.runs
    for who, counts in credit.items():  # this run is the ledger's only one
        assert {key: ledger.identities[who][key] for key in counts} == counts


async def test_an_embedded_run_with_fewer_worker_processes_than_verify_is_refused_at_once():
    with pytest.raises(RunError, match=r"--verify 3 needs 3 identities .* \(--processes 3\)"):
        await run(RunConfig("ordered", processes=2, verify=3))


async def test_two_identities_compute_their_copies_of_quick_leaves_whole_and_agree(reflector):
    # The root's children are leaves: each identity's bots share out its copies, stealing
    # from each other at the end, and compute them whole.
    job = Run(reflector.url, "copies", 2_000, 50, verify=2)
    workers = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.go)
            await job.started.wait()
            workers = [start_worker(reflector.url, "copies", 6) for _ in range(2)]
            await job.wait(60)
    finally:
        for worker in workers:
            worker.stop()
    assert job.error is None and job.result is not None
    assert job.result.answer == million_testplugin.expected("copies", 2_000, 50)
    leaves = [name for name in await reflector.store.names() if name.startswith("copies-")]
    assert len(leaves) < 40  # of the 80 copies, most were computed whole
