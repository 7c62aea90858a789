"""What the commands show: the live progress of ``million run`` (rich, only on a
terminal), its result, and the text of ``million status`` and ``million credit``."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from million.compute.runner import RunConfig, RunResult, RunState
from million.compute.tree import split

MAX_CHILD_BARS = 16
COUNTS = ("submitted", "validated", "rejected", "pending")  # of an identity, as the ledger's table shows


class ProgressDisplay:
    """Partitions done of total (inside leaves too), their rate since this command
    started, the time left, the bots and processes present, and a bar per first-level
    child when there are few enough of them to show."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
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
        figures = state.figures()
        rate = "" if figures["rate"] is None else f"{figures['rate']:,}/s"
        workers = bots_in(figures["bots"], figures["processes"])
        self._progress.update(self._total, completed=state.done, rate=rate, workers=workers)
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


def progress_line(figures: dict[str, Any]) -> str:
    """``RunState.figures`` as a sentence, for a log without the live display."""
    line = f"{figures['run']}: {figures['completed']:,} of {figures['partitions']:,} partitions done"
    if figures["rate"] is not None:
        line += f", {figures['rate']:,}/s"
    if figures["eta_s"] is not None:
        line += f", {_duration(figures['eta_s'])} left"
    return f"{line}; {bots_in(figures['bots'], figures['processes'])}"


def bots_in(bots: Any, processes: Any) -> str:
    """``N bots in P processes``, of counts that may come from anyone's summary."""
    return f"{_count(bots)} bots in {_count(processes)} process" + ("" if processes == 1 else "es")


def _count(value: Any) -> str:
    """A count from anyone's summary: with thousands separators if it is an integer."""
    return f"{value:,}" if type(value) is int else str(value)


def result_lines(result: RunResult) -> list[str]:
    """The answer of ``million run`` and how fast it came: the rate of what this command
    computed, none for an answer that was stored already."""
    run = f"{result.partitions:,} partitions (fanout {result.fanout})"
    if result.stored:
        figures = f"{run}: the answer stored by an earlier run of {result.name}; nothing computed now"
    elif result.partitions_per_s is None:
        figures = f"{run} in {result.elapsed_s:.2f} s"
    else:
        figures = f"{run} in {result.elapsed_s:.2f} s: {result.partitions_per_s:,.0f} partitions/s"
        if result.computed < result.partitions:
            earlier = result.partitions - result.computed
            figures += f" over the {result.computed:,} computed now ({earlier:,} were done before: resumed)"
    lines = [f"answer: {json.dumps(result.answer)}", figures]
    if result.credit:
        validated, rejected = (sum(c.get(key, 0) for c in result.credit.values()) for key in COUNTS[1:3])
        who = f"{len(result.credit):,} identit{'y' if len(result.credit) == 1 else 'ies'}"
        lines.append(f"results of {who}: {validated:,} validated, {rejected:,} rejected")
    return lines


def resume_args(config: RunConfig, state: RunState) -> str:
    """The flags of a ``million run`` that resumes an interrupted one."""
    parts = [f"--plugin {config.plugin}", f"--name {state.name}", f"--store {state.store}"]
    parts += [f"--partitions {config.partitions}", f"--fanout {config.fanout}"]
    parts += [f"--input {json.dumps(config.input)!r}"]
    parts += [f"--option {key}={json.dumps(value)!r}" for key, value in config.options.items()]
    parts += [f"--verify {config.verify}", f"--max-rejections {config.max_rejections}"]
    parts += [f"--max-failures {config.max_failures}"]
    parts += [f"--max-copies {config.max_copies}"] if config.max_copies is not None else []
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
    lines += [_run_line(run) for run in info["runs"]]
    if info.get("ledger"):
        lines += ["credit in the ledger:", *credit_lines(info["ledger"], indent="  ")]
    return lines


def credit_lines(identities: dict[str, dict[str, Any]], indent: str = "") -> list[str]:
    """The ledger as a table: an identity a line, in the order given, flagged ones marked."""
    if not identities:
        return [f"{indent}no run has recorded credit on this reflector yet"]
    width = max(len("identity"), *(len(name) for name in identities))
    lines = [_row(indent, "identity", width, [*COUNTS, "credit", "consecutive"], "last seen in")]
    for name, entry in identities.items():
        cells = [f"{entry[key]:,}" for key in COUNTS]
        cells += [f"{entry['credit_ms'] / 1000:,.1f} s", f"{entry['consecutive']:,}"]
        lines.append(_row(indent, name, width, cells, entry["last_run"], flagged=entry["flagged"]))
    return lines


def _row(indent: str, name: str, width: int, cells: list[str], last: str, *, flagged: bool = False) -> str:
    line = f"{indent}{name:{width}}" + "".join(f"  {cell:>11}" for cell in cells) + f"  {last}"
    return line + ("  FLAGGED" if flagged else "")


def _session_line(session: dict[str, Any]) -> str:
    return (
        f"  {session['name']:30} {session['model']:22} participants {session['participants']:4}"
        f"  seq {session['seq']:8}  {_rate(session['events_per_s']):>8} events/s"
        f"  {session['events_since_snapshot']:6} since snapshot  divergences {session['divergences']}"
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _run_line(run: dict[str, Any]) -> str:
    """One run of the lobby; its fields come from participants, so nothing is assumed."""

    plugin = f"{run.get('plugin', '?')} {run.get('version', '')}".strip()
    state = run.get("state")
    line = f"  {run['name']:20} {plugin}  {state!s:6}"
    line += f"  {_count(run.get('completed', 0))} of {_count(run.get('partitions', 0))} partitions"
    if state == "done":
        return line + f"  answer {json.dumps(run.get('answer'))}"
    if state == "failed":
        failure = run.get("failure")
        return line + (f"  {failure.splitlines()[0]}" if type(failure) is str and failure else "")
    eta = run.get("eta_s")
    left = f"  {_duration(eta)} left" if type(eta) is int else ""
    return (
        line
        + f"  {_count(run.get('rate', 0))}/s{left}  {bots_in(run.get('bots', 0), run.get('processes', 0))}"
    )


def _duration(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"
