"""A plugin's hook that raises is a failed attempt, not a crash: the worker reports it and
goes on, the partition or step goes to another worker, and only ``max_failures``
attempts fail the run, with one traceback; resuming the run retries it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import million_testplugin
import pytest
import trio

import million
from helpers import TESTS, Process, million_command, ordered_spec, start_reflector, start_worker
from million.compute.bots import run_bots
from million.compute.computation import RETRY_AFTER, Computation
from million.compute.runner import open_run
from million.compute.tree import Spec
from million.compute.worker import RunFailed
from million.replica.model import Replica
from million.wire.protocol import VIEW_JOIN, Event

# --- the model ------------------------------------------------------------------------------


class Leaf:
    """One replica of a leaf session of ``count`` partitions, fed events at chosen times."""

    def __init__(self, count: int, **checks: Any) -> None:
        spec = Spec("p", "1", 0, count, 100, start=1000, parent="R-2", index=3, **checks)
        self.replica = Replica.create(Computation, "R-2-3", spec.to_options())
        self.seq = self.time = 0
        self.asked = 0

    @property
    def model(self) -> Computation:
        model: Computation = self.replica.model
        return model

    def send(self, view: str, topic: str, data: Any = None, *, after: int = 1) -> None:
        self.seq, self.time = self.seq + 1, self.time + after
        identity = f"worker:{view[0]}"  # "a1" and "a2" are views of one identity
        assert self.replica.apply(Event("R-2-3", self.seq, self.time, view, topic, data, identity))

    def join(self, *views: str) -> None:
        for view in views:
            self.send(view, VIEW_JOIN, view)

    def ask(self, view: str, want: int = 1) -> list[int]:
        self.asked += 1
        self.send(view, "request", {"id": self.asked, "want": want})
        given: list[int] = self.model.answers[view][1]
        return given

    def fail(self, view: str, index: int, error: str = "Traceback …\nValueError: no") -> None:
        self.send(view, "failed", {"index": index, "error": error})


def prepared(count: int, *views: str, **checks: Any) -> Leaf:
    leaf = Leaf(count, **checks)
    leaf.join(*views)
    firsts = {view[0]: view for view in reversed(views)}  # the first view of each identity
    for view in reversed(firsts.values()):
        if leaf.model.inputs is None:
            leaf.send(view, "inputs", {"inputs": list(range(count))})
    assert leaf.model.inputs is not None
    return leaf


def test_a_failed_partition_goes_to_another_worker_first():
    leaf = prepared(3, "a1", "b1")
    assert leaf.ask("a1") == [0]
    leaf.fail("a1", 0)
    assert leaf.model.workers.get("a1") is None and leaf.model.assignees[0] == []
    assert leaf.ask("a1") == [1]  # not 0 again: b has not tried it
    assert leaf.ask("b1") == [0]
    leaf.send("b1", "end", {"results": [{"index": 0, "output": "fine"}]})
    assert leaf.model.completed[0] and leaf.model.failed is None


def test_a_lone_worker_tries_again_once_it_has_rested():
    leaf = prepared(1, "a1")
    assert leaf.ask("a1") == [0]
    leaf.fail("a1", 0)
    assert leaf.ask("a1") == []
    epoch = leaf.model.epoch
    leaf.send("a1", "ping", after=RETRY_AFTER)  # session time passes: the rest is over
    assert leaf.model.epoch > epoch  # waiting workers ask again
    assert leaf.ask("a1") == [0]


def test_max_failures_fail_the_session_saying_where_and_a_retry_starts_over():
    leaf = prepared(2, "a1", "b1", "c1")
    assert leaf.ask("a1", 2) == [0, 1]
    for view in ("a1", "b1", "c1"):
        if view != "a1":
            assert leaf.ask(view) == [0]
        leaf.fail(view, 0, error=f"Traceback (most recent call last):\nValueError: {view}")
        assert (leaf.model.failed is None) == (view != "c1")
    failed = leaf.model.failed
    assert failed is not None and leaf.model.retryable and leaf.model.ended
    assert failed.startswith("partition 1000 (index 0 of R-2-3) failed in compute 3 times on 3 workers")
    assert failed.endswith("ValueError: c1")
    leaf.send("a1", "end", {"results": [{"index": 1, "output": "late"}]})
    assert not leaf.model.completed[1]  # a failed session takes nothing more
    leaf.send("b1", "retry")
    assert leaf.model.failed is None and leaf.model.attempts == {} and not leaf.model.retryable
    assert leaf.ask("b1", 2) == [0]  # 1 is still a1's
    leaf.send("b1", "end", {"results": [{"index": 0, "output": "at last"}]})
    assert leaf.model.outputs[0] == "at last"


def test_under_verification_one_identity_cannot_fail_a_partition_alone():
    leaf = prepared(1, "a1", "a2", "a3", "b1", verify=2)
    for view in ("a1", "a2", "a3"):
        assert leaf.ask(view) == [0]
        leaf.fail(view, 0)
    assert leaf.model.failed is None  # three attempts, one identity: not enough
    assert leaf.ask("b1") == [0]
    leaf.fail("b1", 0)
    assert leaf.model.failed is not None and "4 times on 4 workers" in leaf.model.failed


def test_a_copy_worked_alone_under_verification_fails_on_its_one_identity():
    leaf = prepared(1, "a1", verify=2, alone="worker:a")  # a child's copy, as --verify 2 makes
    for _ in range(3):
        assert leaf.ask("a1") == [0]
        leaf.fail("a1", 0)
        leaf.send("a1", "ping", after=RETRY_AFTER)
    assert leaf.model.failed is not None and "failed in compute 3 times" in leaf.model.failed


def test_a_failed_step_passes_to_another_view_and_fails_the_session_in_the_end():
    leaf = Leaf(2, max_failures=2)
    leaf.join("a1", "b1")  # the first to join a child prepares it
    assert leaf.model.doing("prepare", "a1")
    leaf.send("a1", "failed", {"step": "prepare", "error": "RuntimeError: no"})
    assert not leaf.model.doing("prepare", "a1")
    leaf.send("a1", "claim", "prepare")
    assert not leaf.model.doing("prepare", "a1")  # resting: b first
    leaf.send("b1", "claim", "prepare")
    assert leaf.model.doing("prepare", "b1")
    leaf.send("b1", "failed", {"step": "prepare", "error": "RuntimeError: no"})
    assert leaf.model.failed == (
        "the prepare step of R-2-3 failed in prepare_inputs 2 times on 2 workers; the last time:\n"
        "RuntimeError: no"
    )


@pytest.mark.parametrize(
    "data",
    [
        {"index": 1, "error": "held by nobody"},
        {"index": 0, "error": "x" * 3001},
        {"index": 0, "error": 5},
        {"index": 0},
        {"index": 0, "error": "x", "more": 1},
        {"step": "divide", "error": "x"},
        {"step": "collect", "error": "not held"},
    ],
)
def test_a_failed_attempt_at_what_the_sender_does_not_hold_is_ignored(data):
    leaf = prepared(2, "a1")
    assert leaf.ask("a1", 2) == [0, 1]
    leaf.send("a1", "end", {"results": [{"index": 1, "output": "done"}]})
    before = (leaf.model.attempts, leaf.model.step_attempts, leaf.model.workers)
    leaf.send("a1", "failed", data)
    assert (leaf.model.attempts, leaf.model.step_attempts, leaf.model.workers) == before


# --- real runs ------------------------------------------------------------------------------


async def test_a_partition_that_always_fails_fails_the_run_and_the_bots_go_on(reflector):
    spec = ordered_spec("f", 300, 10, fail=[123])
    async with million.open_client(reflector.url) as client, open_run(client, "F", spec) as (root, _):
        with pytest.raises(RunFailed) as failed:
            await run_bots(reflector.url, "F", 8)
        assert root.model.failed is not None and root.model.retryable
    message = str(failed.value)
    assert "partition 123 (index 3 of F-1-2) failed in compute 3 times" in message
    assert message.count("Traceback (most recent call last)") == 1
    assert message.rstrip().endswith("ValueError: partition 123 cannot be computed")
    assert "million_testplugin.py" in message and "/million/compute/" not in message


async def test_a_flaky_partition_is_computed_by_the_next_try(reflector, tmp_path):
    spec = ordered_spec("k", 250, 10, flaky=[0, 77, 249], marker_dir=str(tmp_path))
    async with million.open_client(reflector.url) as client, open_run(client, "K", spec) as (root, _):
        await run_bots(reflector.url, "K", 4)
        assert root.model.output == million_testplugin.expected("k", 250, 10)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["flaky-0", "flaky-249", "flaky-77"]


@pytest.mark.parametrize(("step", "where"), [("prepare", "the root"), ("collect", "S-[01]")])
async def test_a_step_that_always_fails_fails_the_run(reflector, step, where):
    spec = ordered_spec("s", 20, 10, fail_step=step)
    async with million.open_client(reflector.url) as client, open_run(client, "S", spec):
        with pytest.raises(RunFailed) as failed:
            await run_bots(reflector.url, "S", 4)
    hook = {"prepare": "prepare_inputs", "collect": "collect_results"}[step]
    message = str(failed.value)
    assert re.search(f"the {step} step of {where} failed in {hook} 3 times", message)
    if step == "prepare":  # each time, another of the four bots of the process tried it
        assert f"failed in {hook} 3 times on 3 workers" in message
    assert message.rstrip().endswith(f"RuntimeError: {step} refuses")


def run_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "million", "run", "--plugin", "ordered", "--input", '"r"', *args]


def test_million_run_prints_one_traceback_exits_1_and_no_worker_process_dies():
    done = million_command(
        "run", "--plugin", "ordered", "--input", '"x"', "--partitions", "300", "--fanout", "10",
        "--option", "fail=[150]", "--processes", "2", "--bots", "4", "--name", "boom",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(
        "million run: run boom failed: partition 150 (index 0 of boom-1-5) failed in compute 3 times"
    )
    assert done.stderr.count("Traceback (most recent call last)") == 1
    assert "ValueError: partition 150 cannot be computed" in done.stderr
    assert "exited with" not in done.stderr and "every worker process ended" not in done.stderr


def test_resuming_a_failed_run_retries_it(tmp_path):
    options = ["--option", "broken=[42]", "--option", f"marker_dir={tmp_path}"]
    args = ["--partitions", "100", "--fanout", "10", "--name", "again", "--store", str(tmp_path / "r.db")]
    first = subprocess.run(run_command(*args, *options), capture_output=True, text=True, timeout=120)
    assert first.returncode == 1 and "partition 42 (index 2 of again-4)" in first.stderr
    (tmp_path / "fixed").touch()
    second = subprocess.run(
        run_command(*args, *options, "--json"), capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["answer"] == million_testplugin.expected("r", 100, 10) and result["resumed"]
    assert 0 < result["computed"] < 100  # what the failed run had done stays done


async def test_a_lobby_worker_process_outlives_a_failed_run_and_computes_the_next(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"))
    worker = start_worker(url, None, 4)
    try:
        failing = run_command("--reflector", url, "--no-work", "--partitions", "40", "--fanout", "10",
                              "--option", "fail=[7]", "--name", "first")  # fmt: skip
        done = await trio.to_thread.run_sync(lambda: subprocess.run(failing, capture_output=True, text=True))
        assert done.returncode == 1 and "partition 7 (index 7 of first-0)" in done.stderr
        good = Process(run_command("--reflector", url, "--no-work", "--partitions", "40", "--fanout", "10",
                                   "--name", "second", "--json"))  # fmt: skip
        result = json.loads(await good.line(""))
        good.stop()
        assert result["answer"] == million_testplugin.expected("r", 40, 10)
        assert worker.proc.poll() is None  # the same worker process, still at work
    finally:
        worker.stop()
        reflector.stop()
    told = worker.errors
    assert "million work: joined run first" in told and "million work: left run first: " in told
    assert "million work: joined run second" in told
    assert "million work: run second is done; this process computed" in told


# --- refused before anything starts ---------------------------------------------------------


def test_options_a_plugin_refuses_are_one_line_before_any_work():
    done = million_command("run", "--plugin", "demo", "--option", "delay_ms=abc")
    assert done.returncode == 2
    assert done.stderr == (
        "million run: plugin demo refuses the run: delay_ms must be a number of milliseconds"
        " from 0 to 3600000, not 'abc'\n"
    )


QUOTE_IT = """; for the text, quote it: --input '"bad"'"""


@pytest.mark.parametrize(("given", "hint"), [("{bad", ")"), ("bad", QUOTE_IT)])
def test_input_must_be_json(given, hint):
    done = million_command("run", "--plugin", "demo", "--input", given)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("million run: error: argument --input: not JSON (")
    assert done.stderr.splitlines()[-1].endswith(hint)


async def test_a_run_without_workers_says_how_to_start_some(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"))
    lonely = await trio.lowlevel.open_process(
        run_command("--reflector", url, "--no-work", "--name", "lonely"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )
    try:
        assert lonely.stderr is not None
        told = b""
        with trio.fail_after(30):
            while b"\n" not in told:
                told += await lonely.stderr.receive_some()
        line = told.decode().splitlines()[0]
        assert line.startswith("million run: no workers have joined run lonely yet; start some with:")
        assert f"million work --reflector {url} --run lonely" in line
    finally:
        lonely.kill()
        await lonely.wait()
        reflector.stop()
