"""What the commands show: the live progress of ``million run`` (rich, only on a
terminal), its result, and the text of ``million status``."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from million.compute.runner import RunConfig, RunResult, RunState
from million.compute.tree import split

MAX_CHILD_BARS = 16


class ProgressDisplay:
    """Partitions done of total, their rate, the workers present, and a bar per
    first-level child when there are few enough of them to show."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[workers]}"),
            console=console,
        )
        self._total: TaskID | None = None
        self._children: dict[int, TaskID] = {}

    def __enter__(self) -> ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._progress.stop()

    def update(self, state: RunState) -> None:
        if self._total is None:
            self._start(state)
        assert self._total is not None
        task = self._progress.tasks[self._total]
        elapsed = task.elapsed or 0.0
        rate = f"{state.done / elapsed:,.0f}/s" if elapsed > 0.5 else ""
        self._progress.update(
            self._total, completed=state.done, rate=rate, workers=f"{state.workers} workers"
        )
        for index, done in state.by_child().items():
            if index in self._children:
                self._progress.update(self._children[index], completed=done)

    def _start(self, state: RunState) -> None:
        self._total = self._progress.add_task(state.name, total=state.partitions, rate="", workers="")
        if state.partitions > state.fanout and state.fanout <= MAX_CHILD_BARS:
            for index, (_, size) in enumerate(split(state.partitions, state.fanout)):
                self._children[index] = self._progress.add_task(
                    f"  {state.name}-{index}", total=size, rate="", workers=""
                )


def result_lines(result: RunResult) -> list[str]:
    """The answer of ``million run`` and how fast it came."""
    speed = f"{result.partitions_per_s:,.0f} partitions/s" + (" (resumed)" if result.resumed else "")
    return [
        f"answer: {json.dumps(result.answer)}",
        f"{result.partitions:,} partitions (fanout {result.fanout}) in {result.elapsed_s:.2f} s: {speed}",
    ]


def resume_args(config: RunConfig, state: RunState) -> str:
    """The flags of a ``million run`` that resumes an interrupted one."""
    parts = [f"--plugin {config.plugin}", f"--name {state.name}", f"--store {state.store}"]
    parts += [f"--partitions {config.partitions}", f"--fanout {config.fanout}"]
    parts += [f"--input {json.dumps(config.input)!r}"]
    parts += [f"--option {key}={json.dumps(value)!r}" for key, value in config.options.items()]
    return " ".join(parts)


def status_lines(info: dict[str, Any]) -> list[str]:
    """``million status``: the reflector, its occupied sessions and the lobby's runs."""
    stats = info["statistics"]
    lines = [
        f"million {info['version']} up {info['uptime_s']:.0f} s, store {info['store']}",
        f"{stats['connections']} connections, {stats['sessions']} live sessions, {stats['events']} events,"
        f" {stats['divergences']} divergences",
    ]
    lines += [_session_line(session) for session in info["sessions"]]
    unlisted = info.get("sessions_total", 0) - len(info["sessions"])
    if unlisted > 0:
        lines.append(f"  and {unlisted:,} more sessions with participants")
    if info["runs"]:
        lines.append("runs in the lobby:")
    return lines + [_run_line(run) for run in info["runs"]]


def _session_line(session: dict[str, Any]) -> str:
    return (
        f"  {session['name']:30} {session['model']:22} participants {session['participants']:4}"
        f"  seq {session['seq']:8}  {session['events_per_s']:8,.0f} events/s"
        f"  {session['events_since_snapshot']:6} since snapshot  divergences {session['divergences']}"
    )


def _run_line(run: dict[str, Any]) -> str:
    """One run of the lobby; its fields come from participants, so nothing is assumed."""

    def count(key: str) -> str:
        value = run.get(key, 0)
        return f"{value:,}" if type(value) is int else str(value)

    plugin = f"{run.get('plugin', '?')} {run.get('version', '')}".strip()
    line = f"  {run['name']:20} {plugin}  {run.get('state')!s:5}"
    line += f"  {count('completed')} of {count('partitions')} partitions"
    if run.get("state") == "done":
        return line + f"  answer {json.dumps(run.get('answer'))}"
    return line + f"  {count('rate')}/s  {count('workers')} workers"
