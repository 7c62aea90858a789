"""The live progress display of ``million run`` (rich), shown only on a terminal."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from million.compute.runner import RunState
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
