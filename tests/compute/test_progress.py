"""Progress counts partitions as leaves go: the display's figures, ``million status`` and
the run's summary show partial progress inside a leaf before it completes."""

from __future__ import annotations

import json
import subprocess
import sys

import million_testplugin
import trio

import million
from helpers import Process, start_reflector
from million.compute import runner
from million.compute.plugins import load_plugin
from million.compute.runner import RunConfig, RunResult
from million.compute.worker import Context, work
from million.relay.config import ReflectorConfig
from million.relay.sessions import RATE_WINDOW, RelaySession


async def test_progress_inside_a_held_leaf_shows_before_the_leaf_completes(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"))
    run = Process(
        [sys.executable, "-m", "million", "run", "--reflector", url, "--plugin", "ordered", "--input", '"p"',
         "--partitions", "200", "--fanout", "100", "--name", "held", "--processes", "1", "--bots", "2",
         "--json", "--progress", "--option", "slow=[150]", "--option", f"marker_dir={tmp_path}"]
    )  # fmt: skip
    try:
        figures = {"completed": 0}
        while figures["completed"] <= 100:  # leaf held-1 (100..199) cannot finish while 150 is held
            figures = json.loads(await run.line(""))["progress"]
        assert not (tmp_path / "go").exists() and figures["partitions"] == 200 and figures["bots"] == 2
        status = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "million", "status", "--reflector", url, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
        (held,) = json.loads(status.stdout)["runs"]
        assert held["state"] == "open" and 100 < held["completed"] < 200
        done, size = held["children"][1]  # the first-level children are the leaves here
        assert held["children"][0] == [100, 100] and 0 < done < size == 100
        assert held["processes"] == 1 and held["workers"][0]["done"] >= 100
        (tmp_path / "go").touch()
        while "answer" not in (line := json.loads(await run.line(""))):
            assert "progress" in line
        assert line["answer"] == million_testplugin.expected("p", 200, 100)
        assert line["computed"] == 200
    finally:
        run.stop()
        reflector.stop()


async def test_a_run_ends_as_its_root_does_while_its_progress_is_silent(monkeypatch):
    """The run's answer is taken when the root ends, not at the progress session's next
    change: a worker in this process (no lobby bot) never changes the progress, and the
    reflector does not tick it."""
    monkeypatch.setattr(runner, "FOLLOW_EVERY", 3600)
    posted, results = trio.Event(), list[RunResult]()

    async def run(url: str) -> None:
        config = RunConfig("demo", partitions=300, fanout=10, reflector=url, processes=0, name="quiet")
        results.append(await runner.run(config, watch=lambda state: posted.set()))

    with trio.fail_after(60):
        async with (
            million.open_reflector(ReflectorConfig(port=0, tick_ms=3_600_000)) as reflector,
            trio.open_nursery() as nursery,
            million.open_client(reflector.url) as client,
        ):
            nursery.start_soon(run, reflector.url)
            await posted.wait()
            answer = await work(Context(client, load_plugin("demo")), "quiet")
    assert answer == 300 and [result.answer for result in results] == [300]


def test_a_sessions_event_rate_is_over_a_window_and_unknown_under_a_second():
    session: RelaySession[str] = RelaySession("s", "m", b"null")
    session.enter("conn", "v1", 100.0)
    session.seq = 7  # seven events at once, as a session's start has
    assert session.events_per_s(100.005) is None  # not 1,400 events/s
    assert session.events_per_s(101.0) == 7.0
    session.seq = 27
    assert session.events_per_s(100.0 + RATE_WINDOW) == 2.7  # the window rolls here
    session.seq = 37
    assert session.events_per_s(100.0 + 2 * RATE_WINDOW) == 1.0  # over the last window: 10 events
    assert session.events_per_s(100.0 + 2 * RATE_WINDOW + 5) == round(10 / (RATE_WINDOW + 5), 1)
