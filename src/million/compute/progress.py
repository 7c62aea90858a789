"""A run's progress: finished leaves counted in their own session, and summaries of
sessions for ``million status`` and the web page.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from typing import Any

import attrs
import trio

from million.compute.computation import Computation
from million.compute.plugins import Result
from million.compute.tree import MAX_FANOUT, MAX_PARTITIONS, branches, share_among
from million.replica.model import Model
from million.replica.session import Session
from million.wire.protocol import SESSION_NAME, VIEW_EXIT

__all__ = [
    "Progress",
    "is_run_summary",
    "progress_options",
    "progress_session",
    "report_progress",
    "run_summary",
    "short",
    "summary",
]

SUMMARY_EVERY = 0.5  # seconds between a view's summaries of its session
SUMMARY_WORKERS = 200  # sessions with more partitions leave out who works on which
MAX_BOTS = 1_000_000  # bots one process may say it runs
MAX_PROCESSES = 10_000  # processes a run's progress remembers, present or gone
KEEP_GONE = 100  # processes gone that it remembers, the latest
MAX_LEAVES = 1000  # leaves in one progress event
MAX_PARTIAL = 10_000  # unfinished leaves counted at once
MAX_SPANS = 10_000  # spans of finished leaves apart: leaves finish roughly in order
HISTORY = 60  # points of a run's progress over time
HISTORY_EVERY = 1000  # ms between them at first
RATE_WINDOW = 5.0  # s over which a run's rate is measured
SUMMARY_CHILDREN = 100  # first-level children whose progress a run's summary gives
SUMMARY_PROCESSES = 40  # processes a run's summary lists, present ones first
MAX_SUMMARY_FAILURE = 2000  # characters of a run's failure in its summary
#: What follows the root's name in the name of a session below it: ``-i`` per level, each
#: ``i`` an index below ``MAX_FANOUT`` written as ``str`` writes it, and a copy's ``c<k>``.
_NUMBER = rf"(0|[1-9][0-9]{{0,{len(str(MAX_FANOUT - 1)) - 1}}})"
_BELOW_ROOT = re.compile(rf"(-{_NUMBER}(c[1-9][0-9]{{0,3}})?)+")
_INDEX = re.compile(r"-([0-9]+)")


def summary(model: Computation) -> dict[str, Any]:
    """What a session of the tree is doing, for ``million status`` and the web page."""
    done = model.done
    if done:
        state = "done"
    elif model.failed is not None:
        state = "failed"
    elif model.inputs is None:
        state = "preparing"
    elif model.remaining == 0:
        state = "collecting"
    else:
        state = "working"
    data: dict[str, Any] = {
        "state": state,
        "leaf": model.leaf,
        "count": model.count,
        "completed": model.count - model.remaining,
        "working": _working(model),
        "failures": sum(map(len, model.attempts.values())) + sum(map(len, model.step_attempts.values())),
        "failed": None if model.failed is None else model.failed[:MAX_SUMMARY_FAILURE],
    }
    if model.count <= SUMMARY_WORKERS:
        data["completed_at"] = [i for i, completed in enumerate(model.completed) if completed]
        load: dict[int, int] = {}
        for held in model.workers.values():
            for index in held:
                load[index] = load.get(index, 0) + 1
        data["workers"] = load
    if done:
        data["output"] = short(model.output)
    return data


def _working(model: Computation) -> int:
    """Bots at work in a session: those holding its partitions (a leaf), or one per child
    handed out and not complete (coordinators of the root's children leave it)."""
    if model.leaf:
        return len(model.workers)
    return sum(1 for index in range(model.count) if model.assignees[index] and not model.completed[index])


def short(value: Any, limit: int = 512) -> Any:
    """``value`` (a JSON value or a ``Result``) if it is short enough for a summary, else a
    note of its size."""
    result = value if isinstance(value, Result) else Result.of(value)
    size = len(result.raw)
    return result.embed() if size <= limit else f"<{size} bytes>"


def is_run_summary(summary: Any) -> bool:
    """Whether ``summary`` has the fields ``run_summary`` writes (anyone may write any)."""
    fields = {"run": str, "state": str, "partitions": int, "completed": int, "rate": int, "bots": int}
    return isinstance(summary, dict) and all(type(summary.get(key)) is kind for key, kind in fields.items())


async def report_progress(run: str, progress: Session[Any], root: Session[Any]) -> None:
    """Summarize a run on its progress session, and its root, every ``SUMMARY_EVERY`` s
    until it is done or has failed."""
    seen: deque[tuple[float, int]] = deque()
    while True:
        now, done = trio.current_time(), progress.model.done
        seen.append((now, done))
        while now - seen[0][0] > RATE_WINDOW:
            seen.popleft()
        since, before = seen[0]
        rate = round((done - before) / (now - since)) if now - since >= 1 else None
        progress.summarize(run_summary(run, progress.model, root.model, rate))
        root.summarize(summary(root.model))
        if root.model.ended:
            return
        with trio.move_on_after(SUMMARY_EVERY):
            await root.wait_for(lambda m: m.ended)


def run_summary(run: str, progress: Progress, root: Computation, rate: int | None) -> dict[str, Any]:
    """What ``million status`` and the web pages show of a run: its state, partitions done
    (inside leaves too), ``rate`` (partitions/s lately; None: not known yet) and ETA, its
    progress over time, its first-level children, and its processes. Live figures (rate,
    bots, processes) only while the run is open. Within a reflector's default summary limit."""
    state = "done" if root.done else "failed" if root.failed is not None else "open"
    open_ = state == "open"
    completed = progress.partitions if root.done else progress.done
    left = progress.partitions - completed
    now = progress.now
    start = progress.history[0][0] if progress.history else now
    data: dict[str, Any] = {
        "run": run,
        "state": state,
        "partitions": progress.partitions,
        "completed": completed,
        "rate": (rate or 0) if open_ else 0,
        "eta_s": round(left / rate) if open_ and rate else None,
        "elapsed_s": round((now - start) / 1000, 1),
        "bots": progress.bots if open_ else 0,
        "processes": progress.present if open_ else 0,
        "answer": short(root.output) if root.done else None,
        "failure": None if root.failed is None else root.failed[:MAX_SUMMARY_FAILURE],
        "history": [[round((t - start) / 1000, 1), done] for t, done in progress.history]
        + [[round((now - start) / 1000, 1), completed]],
        "workers": _processes(progress, now),
    }
    first_level = branches(progress.partitions, progress.fanout)
    children = min(first_level, SUMMARY_CHILDREN)
    if children:
        sizes = [share_among(progress.partitions, first_level, i)[1] for i in range(children)]
        done = [size if root.done else progress.by_child.get(i, 0) for i, size in enumerate(sizes)]
        data["children"] = [list(pair) for pair in zip(done, sizes, strict=True)]
    return data


def _processes(progress: Progress, now: int) -> list[dict[str, Any]]:
    """The run's processes for a summary: present ones first, then the latest gone."""
    entries = sorted(progress.processes.values(), key=lambda entry: not entry["present"])
    return [
        {
            "identity": entry["identity"],
            "bots": entry["bots"],
            "done": entry["done"],
            "rate": round(entry["done"] * 1000 / max(entry["seen"] - entry["since"], 1000)),
            "seen_s": round((now - entry["seen"]) / 1000, 1),
            "present": entry["present"],
        }
        for entry in entries[:SUMMARY_PROCESSES]
    ]


def progress_session(run: str) -> str:
    """The name of the session that counts a run's partitions done."""
    return f"{run}:progress"


def progress_options(run: str, partitions: int, fanout: int) -> dict[str, Any]:
    """The options of run ``run``'s progress session."""
    return {"root": run, "partitions": partitions, "fanout": fanout}


@attrs.define
class Progress(Model, name="million.progress.2"):
    """A run's partitions done, counted per partition as leaves go, and who computes them.

    Worker processes publish ``progress``: how far each leaf they work in is (its name
    and its partitions done) and how many partitions they computed since they last said.
    A leaf's range comes from its name and the tree, never from the event, so that a
    partition is counted once however often, and by whomever, it is reported. Finished
    leaves are kept as merged spans of partitions, and unfinished ones by their start:
    the state stays small however many leaves a run has. Events that are malformed or
    out of range are ignored, the same way everywhere. Options other than ``{"root":
    session name, "partitions": 1..MAX_PARTITIONS, "fanout": 2..MAX_FANOUT}`` leave a
    model that counts nothing.
    """

    root: str = ""
    partitions: int = 0
    fanout: int = 2
    done: int = 0
    spans: list[list[int]] = attrs.Factory(list)  # finished leaves: merged [start, end), in order
    partial: dict[int, list[int]] = attrs.Factory(dict)  # unfinished leaf's start -> [size, done, child]
    by_child: dict[int, int] = attrs.Factory(dict)  # first-level child -> partitions done
    processes: dict[str, dict[str, Any]] = attrs.Factory(dict)  # view -> identity, bots, done, seen, present
    history: list[list[int]] = attrs.Factory(list)  # [session time in ms, done], one per ``every`` ms
    every: int = HISTORY_EVERY

    def init(self, options: Any) -> None:
        if not _is_progress_options(options):
            return
        self.root, self.partitions, self.fanout = options["root"], options["partitions"], options["fanout"]
        self.subscribe("progress", self.progress)
        self.subscribe("bots", self.count_bots)
        self.subscribe(VIEW_EXIT, self.exit)

    @property
    def bots(self) -> int:
        """Bots of the processes present."""
        return sum(entry["bots"] for entry in self.processes.values() if entry["present"])

    @property
    def present(self) -> int:
        """Processes present that run bots."""
        return sum(1 for entry in self.processes.values() if entry["present"] and entry["bots"])

    def progress(self, data: Any) -> None:
        """``{"leaves": {leaf session: partitions done in it}, "computed": n, "bots": b}``
        from a process of ``b`` bots: ``n`` partitions computed since its last. Each says
        its bots, so that a process that came back (a new view) is counted again."""
        if not _is_progress(data):
            return
        self.count_bots(data["bots"])
        entry = self.processes.get(self.sender or "")
        if entry is None:
            return
        entry["done"] = min(entry["done"] + data["computed"], MAX_PARTITIONS)
        entry["seen"] = self.now
        for name, done in data["leaves"].items():
            leaf = self._leaf(name)
            if leaf is not None and done <= leaf[1]:
                self._advance(*leaf, done)
        self._remember()

    def _remember(self) -> None:
        """Keep ``[now, done]`` in ``history``: as a new point once ``every`` ms have passed
        since the one before the last, else in place of the last (which is always the
        latest). With ``HISTORY`` points, keep every other one and add them half as often."""
        point = [self.now, self.done]
        if len(self.history) >= 2 and self.now - self.history[-2][0] < self.every:
            self.history[-1] = point
            return
        self.history.append(point)
        if len(self.history) > HISTORY:
            self.history = self.history[::2]
            self.every *= 2

    def _advance(self, start: int, size: int, child: int, done: int) -> None:
        """Leaf ``[start, start + size)`` of first-level ``child`` has ``done`` partitions done."""
        if self._finished(start):
            return
        entry = self.partial.get(start)
        before = entry[1] if entry is not None else 0
        if done <= before:
            return
        if done < size:
            if entry is None and len(self.partial) >= MAX_PARTIAL:
                return
            self.partial[start] = [size, done, child]
        else:
            if not self._merge(start, start + size):
                return
            self.partial.pop(start, None)
        self.done += done - before
        if child >= 0:
            self.by_child[child] = self.by_child.get(child, 0) + done - before

    def _finished(self, start: int) -> bool:
        at = bisect.bisect_right(self.spans, [start, MAX_PARTITIONS + 1]) - 1
        return at >= 0 and self.spans[at][0] <= start < self.spans[at][1]

    def _merge(self, start: int, end: int) -> bool:
        """Add span ``[start, end)`` (not overlapping any) to ``spans``, merged with its
        neighbours; False if there is no room for a span apart (``MAX_SPANS``)."""
        at = bisect.bisect_left(self.spans, [start, end])
        before = at > 0 and self.spans[at - 1][1] == start
        after = at < len(self.spans) and self.spans[at][0] == end
        if before and after:
            self.spans[at - 1][1] = self.spans.pop(at)[1]
        elif before:
            self.spans[at - 1][1] = end
        elif after:
            self.spans[at][0] = start
        elif len(self.spans) < MAX_SPANS:
            self.spans.insert(at, [start, end])
        else:
            return False
        return True

    def _leaf(self, name: str) -> tuple[int, int, int] | None:
        """``(start, size, first-level child or -1)`` of leaf session ``name`` of this run,
        from the tree; None unless it names one (a copy's name, ``-<i>c<k>``, names its
        original's range)."""
        if not (name.startswith(self.root) and SESSION_NAME.fullmatch(name)):
            return None
        rest = name[len(self.root) :]
        if rest and not _BELOW_ROOT.fullmatch(rest):
            return None
        start, size, child = 0, self.partitions, -1
        for level, index in enumerate(_INDEX.findall(rest)):
            children = branches(size, self.fanout)
            position = int(index)  # at most six digits: no setting of Python matters
            if position >= children:
                return None
            offset, size = share_among(size, children, position)
            start += offset
            child = position if level == 0 else child
        return (start, size, child) if size <= self.fanout else None

    def count_bots(self, bots: Any) -> None:
        """A process says how many bots it runs."""
        if type(bots) is not int or not 0 <= bots <= MAX_BOTS:
            return
        view = self.sender or ""
        entry = self.processes.get(view)
        if entry is None:
            if len(self.processes) >= MAX_PROCESSES:
                self._forget_one()
            if len(self.processes) >= MAX_PROCESSES:
                return
            entry = self.processes[view] = {"identity": self.identity, "bots": 0, "done": 0, "present": True}
            entry["since"] = self.now
        entry["bots"], entry["seen"] = bots, self.now
        if not self.history:
            self._remember()

    def _forget_one(self) -> None:
        """Make room: forget the process gone longest ago, if one is gone."""
        gone = [view for view, entry in self.processes.items() if not entry["present"]]
        if gone:
            del self.processes[gone[0]]

    def exit(self, view: Any) -> None:
        entry = self.processes.get(view) if type(view) is str else None
        if entry is not None:
            entry["present"], entry["seen"] = False, self.now
            self.processes[view] = self.processes.pop(view)  # the gone in the order they went
            while sum(1 for e in self.processes.values() if not e["present"]) > KEEP_GONE:
                self._forget_one()


def _is_progress(data: Any) -> bool:
    if type(data) is not dict or len(data) != 3:
        return False
    leaves, computed, bots = data.get("leaves"), data.get("computed"), data.get("bots")
    if not (type(computed) is int and 0 <= computed <= MAX_PARTITIONS and type(leaves) is dict):
        return False
    if not (type(bots) is int and 0 <= bots <= MAX_BOTS):
        return False
    return len(leaves) <= MAX_LEAVES and all(type(done) is int and done >= 0 for done in leaves.values())


def _is_progress_options(options: Any) -> bool:
    if type(options) is not dict:
        return False
    root, partitions, fanout = options.get("root"), options.get("partitions"), options.get("fanout")
    return (
        type(root) is str
        and SESSION_NAME.fullmatch(root) is not None
        and type(partitions) is int
        and 1 <= partitions <= MAX_PARTITIONS
        and type(fanout) is int
        and 2 <= fanout <= MAX_FANOUT
    )
