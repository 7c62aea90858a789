"""The ``million`` command: its flags build the configs the library runs (in this
process, the run functions replaced), and real processes get exit codes and messages
without tracebacks."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shlex
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import million_testplugin
import psutil
import pytest
import trio

import million
from helpers import Process, million_command, start_reflector
from million.cli import commands, main
from million.cli.parser import STORE, build_parser
from million.compute import bots, ledger, runner
from million.compute.computation import Computation
from million.compute.runner import RunConfig, RunResult, RunState
from million.compute.status import ledger_identities
from million.compute.tree import Spec
from million.relay.config import ReflectorConfig
from million.wire import codec, protocol, transport
from models import Ledger

Main = Callable[[list[str]], int]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Main]:
    """``million.cli.main`` in this process, with no token or CA from the environment and
    the garbage collector left as it was."""
    monkeypatch.delenv("MILLION_TOKEN", raising=False)
    monkeypatch.delenv("MILLION_CAFILE", raising=False)
    threshold = gc.get_threshold()
    yield main
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ReflectorConfig]:
    """The configs ``million reflector`` would have served."""
    configs: list[ReflectorConfig] = []

    async def serve(config: ReflectorConfig) -> None:
        configs.append(config)

    monkeypatch.setattr(commands, "serve", serve)
    return configs


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """The configs ``million run`` would have computed; each run's answer is 42."""
    configs: list[RunConfig] = []

    async def run(config: RunConfig, **_: Any) -> RunResult:
        configs.append(config)
        p = config.partitions
        return RunResult("done", 42, p, config.fanout, 2.0, p, p / 2, False, False, None)

    monkeypatch.setattr(runner, "run", run)
    return configs


def test_reflector_flags_build_its_config(cli, served):
    assert cli(["reflector", "--port", "1", "--max-frame", "5"]) == 0
    assert served == [attrs.evolve(ReflectorConfig(), port=1, max_frame=5, store=STORE)]


def test_reflector_defaults_are_the_configs_but_the_store_is_a_file(cli, served, monkeypatch):
    monkeypatch.setenv("MILLION_TOKEN", "from-env")
    assert cli(["reflector"]) == 0
    assert served == [attrs.evolve(ReflectorConfig(), store=STORE, token="from-env")]


def test_every_reflector_flag_reaches_its_config(cli, served, tmp_path):
    (tmp_path / "token").write_text("secret\n")
    assert cli(
        ["reflector", "--host", "0.0.0.0", "--port", "9", "--store", ":memory:", "--tick-ms", "7",
         "--snapshot-every", "8", "--max-frame", "9", "--max-queue", "10", "--max-sessions", "11",
         "--max-rate", "12", "--max-summary", "13", "--transport", "trio-websocket",
         "--token-file", str(tmp_path / "token"), "--insecure", "--http", "0"]
    ) == 0  # fmt: skip
    assert served == [
        ReflectorConfig(
            host="0.0.0.0", port=9, store=":memory:", tick_ms=7, snapshot_every=8, max_frame=9,
            max_queue_bytes=10, max_sessions_per_connection=11, max_messages_per_s=12, max_summary=13,
            transport="trio-websocket", token="secret", insecure=True, http_port=0,
        )
    ]  # fmt: skip


def test_a_config_the_reflector_refuses_is_one_line_and_exit_2(cli, capsys):
    assert cli(["reflector", "--host", "0.0.0.0", "--store", ":memory:"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("million reflector: refusing to listen on 0.0.0.0 without a token")
    assert len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["reflector", "run"])
def test_help_shows_the_defaults_of_the_configs(cli, capsys, command):
    with pytest.raises(SystemExit):
        cli([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    reflector, run = ReflectorConfig(), RunConfig(plugin="")
    shown = {
        "reflector": [reflector.host, reflector.port, reflector.tick_ms, reflector.snapshot_every,
                      reflector.max_sessions_per_connection, reflector.max_messages_per_s,
                      reflector.max_summary, reflector.transport, "1 MiB", "64 MiB"],
        "run": [run.input, run.partitions, run.fanout, run.bots, run.verify, run.max_rejections],
    }  # fmt: skip
    for value in shown[command]:
        assert f"(default: {value})" in text


def test_run_defaults_are_the_configs(cli, computed, capsys):
    assert cli(["run", "--plugin", "demo"]) == 0
    assert computed == [RunConfig(plugin="demo")]
    assert capsys.readouterr().out.splitlines() == [
        "answer: 42",
        "10,000 partitions (fanout 100) in 2.00 s: 5,000 partitions/s",
    ]


def test_every_run_flag_reaches_its_config(cli, computed, capsys):
    assert cli(
        ["run", "--plugin", "p", "--input", '"x"', "--partitions", "7", "--fanout", "3", "--option", "a=1",
         "--option", "b=two", "--name", "n", "--store", "s.db", "--reflector", "ws://h:1", "--processes", "2",
         "--bots", "5", "--no-detach", "--token", "t", "--json"]
    ) == 0  # fmt: skip
    assert computed == [
        RunConfig(
            plugin="p", input="x", partitions=7, fanout=3, options={"a": 1, "b": "two"}, name="n",
            store="s.db", reflector="ws://h:1", processes=2, bots=5, detach=False, token="t",
        )
    ]  # fmt: skip
    assert json.loads(capsys.readouterr().out)["answer"] == 42
    assert cli(["run", "--plugin", "p", "--no-work"]) == 0
    assert computed[-1].processes == 0


def test_an_interrupted_run_prints_the_flags_that_resume_it(cli, monkeypatch, capsys):
    async def interrupted(config: RunConfig, *, watch: Any = None, **_: Any) -> RunResult:
        watch(RunState("held", config.partitions, config.fanout, "held.db"))
        os.kill(os.getpid(), signal.SIGINT)
        await trio.sleep_forever()
        raise AssertionError("not stopped")

    monkeypatch.setattr(runner, "run", interrupted)
    args = ["run", "--plugin", "demo", "--partitions", "30", "--fanout", "4", "--input", "[1, 2]"]
    verification = ["--verify", "adaptive", "--max-copies", "4", "--max-rejections", "0"]
    assert cli([*args, "--option", "k=v", "--option", "n=3", *verification]) == 130
    stopped, resume = capsys.readouterr().err.splitlines()
    assert stopped == "million run: interrupted, 0 of 30 partitions done"
    assert resume.startswith("resume with: million run ")
    again = build_parser().parse_args(shlex.split(resume.removeprefix("resume with: million ")))
    assert (again.name, again.store, again.input, dict(again.option)) == (
        "held",
        "held.db",
        [1, 2],
        {"k": "v", "n": 3},
    )
    assert (again.plugin, again.partitions, again.fanout) == ("demo", 30, 4)
    assert (again.verify, again.max_copies, again.max_rejections) == ("adaptive", 4, 0)


def test_verification_flags_reach_the_run_config(cli, computed):
    assert cli(["run", "--plugin", "p", "--verify", "3", "--max-copies", "5", "--max-rejections", "0"]) == 0
    assert cli(["run", "--plugin", "p", "--verify", "adaptive"]) == 0
    assert computed == [
        RunConfig(plugin="p", verify=3, max_copies=5, max_rejections=0),
        RunConfig(plugin="p", verify="adaptive"),
    ]
    assert (computed[1].max_copies, computed[1].max_rejections) == (None, 3)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--verify", "0", "must be a positive integer or adaptive"),
        ("--verify", "Adaptive", "must be a positive integer or adaptive"),
        ("--verify", "1.5", "must be a positive integer or adaptive"),
        ("--max-copies", "0", "must be a positive integer"),
        ("--max-rejections", "-1", "must be 0 or more"),
    ],
)
def test_verification_flags_out_of_range_are_refused(cli, computed, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exited:
        cli(["run", "--plugin", "p", f"{flag}={value}"])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert computed == []


def test_a_runs_credit_is_in_its_json_and_summed_in_its_text(cli, monkeypatch, capsys):
    credit = {"worker:a": {**COUNTS, "submitted": 3, "validated": 2, "rejected": 1}, "worker:b": COUNTS}

    async def run(config: RunConfig, **_: Any) -> RunResult:
        return RunResult("done", 42, 10, 5, 2.0, 10, 5.0, False, False, None, credit)

    monkeypatch.setattr(runner, "run", run)
    assert cli(["run", "--plugin", "p", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["credit"] == credit
    assert cli(["run", "--plugin", "p"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "results of 2 identities: 2 validated, 1 rejected"
    del credit["worker:b"]
    assert cli(["run", "--plugin", "p"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "results of 1 identity: 2 validated, 1 rejected"


def test_work_processes_run_the_one_worker_command_line(cli, monkeypatch):
    started: list[tuple[list[list[str]], dict[str, str] | None]] = []

    async def run_worker_processes(commands: list[list[str]], *, env: dict[str, str] | None = None) -> None:
        started.append((commands, env))

    monkeypatch.setattr(bots, "run_worker_processes", run_worker_processes)
    args = ["--reflector", "ws://h:1", "--run", "r", "--processes", "2", "--bots", "3", "--no-detach"]
    assert cli(["--log-level", "info", "work", *args, "--token", "t"]) == 0
    command = bots.worker_command("ws://h:1", "r", 3, detach=False, exit_with_parent=False, log_level="info")
    assert started == [([command, command], {"MILLION_TOKEN": "t"})]
    assert command[:3] == [sys.executable, "-m", "million"]
    parsed = build_parser().parse_args(command[3:])
    assert (parsed.log_level, parsed.command, parsed.reflector, parsed.run) == (
        "info",
        "work",
        "ws://h:1",
        "r",
    )
    assert (parsed.bots, parsed.processes, parsed.detach, parsed.exit_with_parent) == (3, 1, False, False)


def test_the_workers_of_a_run_exit_with_it_and_lobby_workers_take_no_run():
    parsed = build_parser().parse_args(bots.worker_command("ws://h:1", "r", 2)[3:])
    assert (parsed.run, parsed.bots, parsed.detach, parsed.exit_with_parent) == ("r", 2, True, True)
    lobby = build_parser().parse_args(bots.worker_command("ws://h:1", None, 2, exit_with_parent=False)[3:])
    assert (lobby.run, lobby.exit_with_parent) == (None, False)


async def test_status_lists_the_sessions_of_a_running_reflector(tmp_path):
    process, url = await start_reflector(str(tmp_path / "store.db"))
    try:
        async with million.open_client(url) as client, million.join(client, "visible", Ledger) as session:
            session.publish("add", 1)
            await session.wait_for(lambda model: model.total == 1)
            result = await trio.to_thread.run_sync(million_command, "status", "--reflector", url, "--json")
            text = await trio.to_thread.run_sync(million_command, "status", "--reflector", url)
    finally:
        process.stop()
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    (visible,) = [s for s in info["sessions"] if s["name"] == "visible"]
    assert (visible["participants"], visible["seq"], visible["model"]) == (1, 2, "test-ledger")
    assert text.returncode == 0
    assert "visible" in text.stdout


async def test_status_shows_the_lobby_runs_with_their_progress_and_answer(tmp_path):
    process, url = await start_reflector(str(tmp_path / "store.db"))
    try:
        run = await trio.to_thread.run_sync(
            million_command, "run", "--reflector", url, "--plugin", "demo", "--partitions", "300",
            "--fanout", "10", "--input", "2", "--name", "shown", "--processes", "1", "--bots", "3",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        result = await trio.to_thread.run_sync(million_command, "status", "--reflector", url, "--json")
        text = await trio.to_thread.run_sync(million_command, "status", "--reflector", url)
    finally:
        process.stop()
    (shown,) = json.loads(result.stdout)["runs"]
    credited = json.loads(result.stdout)["ledger"]
    assert credited and {entry["last_run"] for entry in credited.values()} == {"shown"}
    assert "credit in the ledger:" in text.stdout
    assert shown["name"] == "shown"
    assert (shown["state"], shown["answer"], shown["partitions"]) == ("done", 600, 300)
    assert shown["completed"] == 300
    assert "shown                demo" in text.stdout
    assert "300 of 300 partitions  answer 600" in text.stdout


def test_status_of_an_unreachable_reflector_is_one_line_and_exit_1():
    result = million_command("status", "--reflector", "ws://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("million status: cannot reach the reflector at ws://127.0.0.1:9")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reflector", "--port", "http"], "invalid int value"),
        (["reflector", "--tick-ms", "0"], "must be a positive integer"),
        (["reflector", "--store", "/nonexistent/dir/store.db"], "cannot open store"),
        (["status", "--reflector", "http://127.0.0.1:1"], "not a websocket URL"),
        (["status", "--cafile", "/nonexistent/ca.pem"], "cannot load --cafile"),
        (["run", "--plugin", "demo", "--cafile", "/nonexistent/ca.pem"], "cannot load --cafile"),
        (["launch"], "invalid choice"),
    ],
)
def test_wrong_options_get_a_clear_error_and_no_traceback(args, message):
    result = million_command(*args)
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_flushes_the_store_and_tells_clients(tmp_path):
    store = str(tmp_path / "store.db")
    process, url = await start_reflector(store)
    async with transport.connect(url) as channel:
        await channel.send(codec.encode(protocol.Hello(protocol.PROTOCOL_VERSION)))
        await channel.receive()
        await channel.send(codec.encode(protocol.Join(1, "farewell", Ledger.model_name)))
        sync, _ = codec.decode_reflector(await channel.receive())
        await channel.send(codec.encode(protocol.Publish("farewell", sync.view, "add", "last words")))
        (event,) = codec.decode_reflector(await channel.receive())
        assert event.data == "last words"
        process.proc.send_signal(signal.SIGTERM)
        with pytest.raises(transport.Closed) as closed, trio.fail_after(10):
            await channel.receive()
    assert closed.value.code == transport.GOING_AWAY
    assert "shutdown" in closed.value.reason
    assert await trio.to_thread.run_sync(process.proc.wait) == 0
    stderr = process.proc.stderr.read().decode()
    assert "SIGTERM, stopping" in stderr
    assert "Traceback" not in stderr
    process.stop()
    process, url = await start_reflector(store)
    try:
        async with million.open_client(url) as client, million.join(client, "farewell", Ledger) as session:
            assert [value for value, *_ in session.model.entries] == ["last words"]
    finally:
        process.stop()


def test_run_prints_one_json_object_with_the_answer():
    result = million_command(
        "run", "--plugin", "demo", "--partitions", "2000", "--fanout", "10", "--json", "--processes", "2"
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["answer"] == 2000
    assert (output["partitions"], output["fanout"]) == (2000, 10)
    assert output["name"].startswith("run-")
    assert output["elapsed_s"] > 0 and output["partitions_per_s"] > 0
    assert output["credit"] and all(identity.startswith("admin:") for identity in output["credit"])
    assert sum(counts["validated"] for counts in output["credit"].values()) > 0
    assert "Traceback" not in result.stderr


def test_run_resumes_or_returns_the_stored_answer_by_name(tmp_path):
    store = str(tmp_path / "runs.db")
    args = ["run", "--plugin", "ordered", "--input", '"word"', "--partitions", "30", "--fanout", "4"]
    first = million_command(*args, "--name", "again", "--store", store, "--json")
    second = million_command(*args, "--name", "again", "--store", store, "--json")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["answer"] == two["answer"] == million_testplugin.expected("word", 30, 4)
    assert (one["resumed"], two["resumed"]) == (False, True)
    assert (one["stored"], one["computed"]) == (False, 30) and one["partitions_per_s"] > 0
    assert (two["stored"], two["computed"], two["partitions_per_s"]) == (True, 0, None)  # no rate to claim
    third = million_command(*args, "--name", "again", "--store", store)
    assert third.stdout.splitlines()[1] == (
        "30 partitions (fanout 4): the answer stored by an earlier run of again; nothing computed now"
    )
    other = million_command(*args[:-2], "--fanout", "5", "--name", "again", "--store", store)
    assert other.returncode == 1
    assert "a run named 'again' with other settings exists" in other.stderr


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--plugin", "nosuch"], "no plugin named 'nosuch' is installed", 2),
        (["--plugin", "demo", "--fanout", "1"], "must be at least 2", 2),
        (["--plugin", "demo", "--option", "delay_ms"], "expected KEY=VALUE", 2),
        (["--plugin", "demo", "--reflector", "ws://127.0.0.1:9"], "cannot reach the reflector", 1),
        (["--plugin", "demo", "--store", "/nonexistent/dir/store.db"], "cannot open store", 2),
        (["--plugin", "demo", "--partitions", str(10**16)], "cannot run that: partitions", 1),
        (["--plugin", "demo", "--input", "[" * 40 + "]" * 40], "cannot run that: input", 1),
    ],
)
def test_run_refuses_what_it_cannot_do_in_one_line(args, message, code):
    result = million_command("run", *args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_work_against_an_unreachable_reflector_says_so():
    result = million_command("work", "--reflector", "ws://127.0.0.1:9", "--run", "r")
    assert result.returncode == 1
    assert "cannot reach the reflector" in result.stderr


async def test_ctrl_c_stops_a_run_quietly_and_the_same_name_resumes_it(tmp_path):
    store, markers = str(tmp_path / "runs.db"), tmp_path / "markers"
    markers.mkdir()
    options = ["--option", "slow=[5]", "--option", f"marker_dir={markers}"]
    args = ["run", "--plugin", "ordered", "--partitions", "20", "--fanout", "4", "--name", "stop"]
    args += ["--store", store, "--processes", "1", "--bots", "2", *options]
    first = Process([sys.executable, "-m", "million", *args])
    with trio.fail_after(30):
        while not (markers / "5").exists():  # noqa: ASYNC110 (a file appears: no event to wait on)
            await trio.sleep(0.05)
    first.proc.send_signal(signal.SIGINT)
    assert await trio.to_thread.run_sync(first.proc.wait, 30) == 130
    first.stop()
    assert "interrupted" in first.errors and "resume with: million run" in first.errors
    assert "Traceback" not in first.errors
    (markers / "go").touch()
    again = await trio.to_thread.run_sync(lambda: million_command(*args, "--json"))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["answer"] == million_testplugin.expected(1, 20, 4)
    assert json.loads(again.stdout)["resumed"] is True


@pytest.mark.parametrize("command", [["reflector", "--port", "0"], ["run", "--plugin", "demo"]])
def test_a_store_of_another_format_is_refused_in_one_line(tmp_path, command):
    store = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("CREATE TABLE sessions (name TEXT PRIMARY KEY, present BLOB)")
        db.commit()
    result = million_command(*command, "--store", str(store))
    assert result.returncode in (1, 2)
    assert "it was written by another version of million" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--port", "--http"])
async def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, flag):
    process, url = await start_reflector(":memory:")
    busy = url.rsplit(":", 1)[1]
    try:
        args = ["--port", "0", "--http", busy] if flag == "--http" else ["--port", busy]
        result = await trio.to_thread.run_sync(million_command, "reflector", "--store", ":memory:", *args)
    finally:
        process.stop()
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and busy in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def held_run(markers: Path) -> Process:
    """A ``million run`` with two worker processes, returned once partition 0 is being
    computed; it waits there until ``markers/go`` exists."""
    options = ["--option", "slow=[0]", "--option", f"marker_dir={markers}"]
    run = Process(
        [sys.executable, "-m", "million", "run", "--plugin", "ordered", "--partitions", "50",
         "--fanout", "10", "--processes", "2", "--bots", "2", "--json", *options]
    )  # fmt: skip
    try:
        with trio.fail_after(60):
            while not (markers / "0").exists():  # noqa: ASYNC110
                await trio.sleep(0.05)  # the file is the only sign: poll for it
    except BaseException:
        run.stop()
        raise
    return run


async def test_a_run_whose_worker_processes_all_die_says_so_and_ends(tmp_path):
    run = await held_run(tmp_path)
    try:
        for worker in psutil.Process(run.proc.pid).children():
            worker.kill()
        with trio.fail_after(30):
            code = await trio.to_thread.run_sync(run.proc.wait)
    finally:
        run.stop()
    assert code == 1
    assert "every worker process ended before the run was done" in run.errors


async def test_the_workers_of_a_killed_run_stop_by_themselves(tmp_path):
    run = await held_run(tmp_path)
    try:
        workers = psutil.Process(run.proc.pid).children()
        assert len(workers) == 2
    finally:
        run.kill()  # SIGKILL: no chance to stop its workers
    (tmp_path / "go").touch()
    _, alive = await trio.to_thread.run_sync(lambda: psutil.wait_procs(workers, timeout=30))
    assert alive == []


# --- verification: the ledger ------------------------------------------------------------

COUNTS = dict.fromkeys(ledger.COUNTS, 0)
TALLY = {
    "worker:good": {**COUNTS, "submitted": 12, "validated": 12, "claimed_ms": 2400, "credit_ms": 2400},
    "worker:bad": {
        **COUNTS,
        "submitted": 5,
        "validated": 1,
        "rejected": 4,
        "claimed_ms": 900,
        "credit_ms": 200,
    },
}


def faked_run(monkeypatch: pytest.MonkeyPatch, failed: str | None = None) -> list[Spec]:
    """``open_run`` replaced by a run that has ended (with ``TALLY``, done or ``failed``)
    before anyone worked on it; the specs it was asked to open. Everything else is real."""
    specs: list[Spec] = []
    model = SimpleNamespace(
        done=failed is None,
        failed=failed,
        retryable=False,
        ended=True,
        output=7 if failed is None else None,
        tally=TALLY,
    )
    root = SimpleNamespace(model=model, replica=SimpleNamespace(seq=9))

    @asynccontextmanager
    async def open_run(client: Any, name: str, spec: Spec) -> AsyncIterator[tuple[Any, Any]]:
        specs.append(spec)
        yield root, SimpleNamespace(model=SimpleNamespace(done=0, bots=0, present=0, by_child={}))

    async def tell_lobby(client: Any, topic: str, data: dict[str, Any]) -> None:
        pass  # the run was never posted: the lobby would not take its answer

    monkeypatch.setattr(runner, "open_run", open_run)
    monkeypatch.setattr(runner, "_tell_lobby", tell_lobby)
    return specs


async def test_a_run_records_its_credit_once_and_an_adaptive_run_takes_its_trust(monkeypatch):
    specs = faked_run(monkeypatch)
    async with million.open_reflector(ReflectorConfig(port=0)) as reflector:
        config = RunConfig(
            plugin="demo", reflector=reflector.url, processes=0, name="first", max_rejections=3
        )
        result = await runner.run(config)
        assert (result.answer, result.credit) == (7, TALLY)
        await runner.run(config)  # resumed: recorded once
        adaptive = attrs.evolve(config, name="second", verify="adaptive", max_copies=4)
        await runner.run(adaptive)
        async with million.open_client(reflector.url) as client:
            identities = await ledger_identities(client)
        summary = codec.loads(reflector.summaries([ledger.LEDGER])[ledger.LEDGER])
    assert [(spec.verify, spec.adaptive, spec.max_copies) for spec in specs] == [(1, False, 0)] * 2 + [
        (2, True, 4)
    ]
    assert specs[2].trust == {"worker:good": 12}  # the first run's (the second was the same run)
    assert identities is not None and list(identities) == ["worker:bad", "worker:good"]  # flagged first
    bad = identities["worker:bad"]
    assert (bad["submitted"], bad["rejected"], bad["consecutive"], bad["flagged"]) == (10, 8, 0, True)
    assert identities["worker:good"]["credit_ms"] == 4800
    assert summary["identities"] == 2 and [row[0] for row in summary["rows"]] == list(identities)


def test_a_run_that_fails_for_want_of_agreement_says_why_and_records_its_credit(
    cli, monkeypatch, tmp_path, capsys
):
    why = "no 2 identities agreed on partition 3 (worker:good, worker:bad)"
    faked_run(monkeypatch, failed=why)
    store = str(tmp_path / "runs.db")
    assert cli(["run", "--plugin", "demo", "--processes", "0", "--store", store, "--name", "split"]) == 1
    assert capsys.readouterr().err == f"million run: run split failed: {why}\n"

    async def recorded() -> dict[str, Any] | None:
        async with (
            million.open_reflector(ReflectorConfig(port=0, store=store)) as reflector,
            million.open_client(reflector.url) as client,
        ):
            return await ledger_identities(client)

    identities = trio.run(recorded)
    assert identities is not None and identities["worker:bad"]["last_run"] == "split"


async def test_an_adaptive_run_that_exists_resumes_with_the_trust_it_was_made_with():
    spec = Spec("demo", "1", 1, 10, 5, adaptive=True, verify=2, trust={"worker:x": 99})
    async with (
        million.open_reflector(ReflectorConfig(port=0)) as reflector,
        million.open_client(reflector.url) as client,
    ):
        async with million.join(client, "made", Computation, options=spec.to_options()):
            pass
        assert await runner._trust(client, "made") == {"worker:x": 99}
        assert await runner._trust(client, "new") == {}  # nothing in the ledger yet


TOKENS = {"alice": ("admin", "alice-token-0123456789"), "bob": ("worker", "bob-token-0123456789")}
TOKENS["carol"] = ("viewer", "carol-token-0123456789")


async def publish_run(url: str, token: str, event: dict[str, Any]) -> bool:
    """Publish ``event`` to the ledger as the holder of ``token``; whether it was recorded
    (nobody else publishes there: once the replica has applied one more event, it is ours)."""
    async with (
        million.open_client(url, token=token) as client,
        million.join(client, ledger.LEDGER, ledger.Ledger) as session,
    ):
        seq = session.replica.seq
        session.publish("run", event)
        await session.wait_for(lambda _: session.replica.seq > seq)
        return event["name"] in session.model.runs


async def test_credit_shows_the_ledger_only_admins_write_and_it_survives_a_restart(tmp_path):
    (tmp_path / "tokens").write_text(
        "".join(f"{name} {role} {token}\n" for name, (role, token) in TOKENS.items())
    )
    store, extra = str(tmp_path / "store.db"), ("--tokens", str(tmp_path / "tokens"))
    admin, worker, viewer = (token for _, token in TOKENS.values())
    process, url = await start_reflector(store, 0, *extra)
    try:
        credit = partial(million_command, "credit", "--reflector", url)
        empty = await trio.to_thread.run_sync(credit, "--token", worker)
        event = {"name": "nightly", "tally": TALLY, "max_rejections": 3}
        assert not await publish_run(url, worker, {**event, "name": "forged"})
        assert await publish_run(url, admin, event)
        text = await trio.to_thread.run_sync(credit, "--token", worker)
        shown = await trio.to_thread.run_sync(credit, "--token", worker, "--json")
        refused = await trio.to_thread.run_sync(credit, "--token", viewer)
        status = await trio.to_thread.run_sync(
            million_command, "status", "--reflector", url, "--token", admin
        )
        process.stop()
        process, url = await start_reflector(store, 0, *extra)
        again = await trio.to_thread.run_sync(
            million_command, "credit", "--reflector", url, "--token", admin, "--json"
        )
    finally:
        process.stop()
    assert (empty.returncode, empty.stdout) == (0, "no run has recorded credit on this reflector yet\n")
    assert text.returncode == 0, text.stderr
    header, bad, good = text.stdout.splitlines()
    assert header.split() == [
        "identity", "submitted", "validated", "rejected", "pending", "credit", "consecutive", "last", "seen",
        "in",
    ]  # fmt: skip
    assert bad.split() == ["worker:bad", "5", "1", "4", "0", "0.2", "s", "0", "nightly", "FLAGGED"]
    assert good.split() == ["worker:good", "12", "12", "0", "0", "2.4", "s", "12", "nightly"]
    identities = json.loads(shown.stdout)
    assert identities == json.loads(again.stdout)  # kept in the store
    assert list(identities) == ["worker:bad", "worker:good"]
    assert identities["worker:good"] == {
        **TALLY["worker:good"], "consecutive": 12, "last_seen": identities["worker:good"]["last_seen"],
        "last_run": "nightly", "flagged": False,
    }  # fmt: skip
    assert refused.returncode == 1
    assert (
        refused.stderr
        == "million credit: a view token may not read the ledger: give a token that may join (--token)\n"
    )
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[lines.index("credit in the ledger:") + 2].split()[-1] == "FLAGGED"


async def test_status_with_a_view_token_has_no_ledger(tmp_path):
    (tmp_path / "tokens").write_text(
        "".join(f"{name} {role} {token}\n" for name, (role, token) in TOKENS.items())
    )
    process, url = await start_reflector(":memory:", 0, "--tokens", str(tmp_path / "tokens"))
    try:
        assert await publish_run(url, TOKENS["alice"][1], {"name": "r", "tally": TALLY, "max_rejections": 3})
        args = ("status", "--reflector", url, "--token", TOKENS["carol"][1], "--json")
        result = await trio.to_thread.run_sync(million_command, *args)
    finally:
        process.stop()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ledger"] is None
