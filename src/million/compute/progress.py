"""A run's progress: finished leaves counted in their own session, and summaries of
sessions for ``million status`` and the web page.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import attrs
import trio

from million.compute.computation import Computation
from million.compute.plugins import Result
from million.compute.tree import MAX_FANOUT, MAX_PARTITIONS
from million.replica.model import Model
from million.replica.session import Session
from million.wire.protocol import SESSION_NAME, VIEW_EXIT

__all__ = ["Progress", "is_run_summary", "progress_session", "report_progress", "short", "summary"]

SUMMARY_EVERY = 0.5  # seconds between a view's summaries of its session
SUMMARY_WORKERS = 200  # sessions with more partitions leave out who works on which
MAX_BOTS = 1_000_000  # bots one process may say it runs
#: What follows the root's name in the name of a session below it: ``-i`` per level, each
#: ``i`` an index below ``MAX_FANOUT`` written as ``str`` writes it.
_BELOW_ROOT = re.compile(rf"(-(0|[1-9][0-9]{{0,{len(str(MAX_FANOUT - 1)) - 1}}}))+")


def summary(model: Computation, *, done: bool = False, output: Result | None = None) -> dict[str, Any]:
    """What a session of the tree is doing, for ``million status`` and the web page."""
    done = done or model.done
    if done:
        state = "done"
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
        "completed": model.count if done else model.count - model.remaining,
        "working": len(model.workers),
    }
    if model.count <= SUMMARY_WORKERS:
        data["completed_at"] = [i for i, completed in enumerate(model.completed) if completed or done]
        load: dict[int, int] = {}
        for held in model.workers.values():
            for index in held:
                load[index] = load.get(index, 0) + 1
        data["workers"] = load
    if done:
        data["output"] = short(model.output if model.done else output)
    return data


def short(value: Any, limit: int = 512) -> Any:
    """``value`` (a JSON value or a ``Result``) if it is short enough for a summary, else a
    note of its size."""
    result = value if isinstance(value, Result) else Result.of(value)
    size = len(result.raw)
    return result.embed() if size <= limit else f"<{size} bytes>"


def is_run_summary(summary: Any) -> bool:
    """Whether ``summary`` has the fields ``report_progress`` writes (anyone may write any)."""
    fields = {"run": str, "state": str, "partitions": int, "completed": int, "rate": int, "workers": int}
    return isinstance(summary, dict) and all(type(summary.get(key)) is kind for key, kind in fields.items())


async def report_progress(run: str, progress: Session[Any], root: Session[Any]) -> None:
    """Summarize a run on its progress session, and its root, every ``SUMMARY_EVERY`` s
    until it is done or has failed."""
    seen: deque[tuple[float, int]] = deque()
    while True:
        now, model, finished = trio.current_time(), progress.model, root.model.done
        failed = root.model.failed is not None
        seen.append((now, model.done))
        while now - seen[0][0] > 5:
            seen.popleft()
        since, before = seen[0]
        progress.summarize(
            {
                "run": run,
                "state": "done" if finished else "failed" if failed else "open",
                "partitions": model.partitions,
                "completed": model.partitions if finished else model.done,
                "rate": round((model.done - before) / (now - since)) if now > since else 0,
                "workers": sum(model.bots.values()),
                "answer": short(root.model.output) if finished else None,
            }
        )
        root.summarize(summary(root.model))
        if finished or failed:
            return
        with trio.move_on_after(SUMMARY_EVERY):
            await root.wait_for(lambda m: m.ended)


def progress_session(run: str) -> str:
    """The name of the session that counts a run's finished partitions."""
    return f"{run}:progress"


@attrs.define
class Progress(Model, name="million.progress"):
    """Finished leaf sessions of a run, counted once each, and who is working.

    Events that are malformed or out of range are ignored, the same way everywhere: a
    leaf counts at least one partition and ``done`` never exceeds ``partitions``.
    Options other than ``{"root": session name, "partitions": 1..MAX_PARTITIONS}``
    leave a model that counts nothing.
    """

    root: str = ""
    partitions: int = 0
    done: int = 0
    leaves: dict[str, int] = attrs.Factory(dict)  # leaf session -> partitions
    by_child: dict[int, int] = attrs.Factory(dict)  # first-level child -> partitions done
    bots: dict[str, int] = attrs.Factory(dict)  # a process's view -> bots it runs

    def init(self, options: Any) -> None:
        if not _is_progress_options(options):
            return
        self.root, self.partitions = options["root"], options["partitions"]
        self.subscribe("leaf", self.leaf)
        self.subscribe("bots", self.count_bots)
        self.subscribe(VIEW_EXIT, self.exit)

    def leaf(self, data: Any) -> None:
        """``{"name": leaf session, "count": its partitions}``, counted once per leaf."""
        if type(data) is not dict:
            return
        name: Any = data.get("name")
        count: Any = data.get("count")
        if type(name) is not str or name in self.leaves or not self._counts(count):
            return
        first = self._first_level(name)
        if first is None:
            return
        self.leaves[name] = count
        self.done += count
        if first >= 0:
            self.by_child[first] = self.by_child.get(first, 0) + count

    def _counts(self, count: Any) -> bool:
        """Whether ``count`` partitions may be done yet: at least one, and no more than remain."""
        return type(count) is int and 1 <= count <= self.partitions - self.done

    def _first_level(self, name: str) -> int | None:
        """The first-level child that session ``name`` is in (-1: the root itself); None
        unless ``name`` is the root's or one below it."""
        if not SESSION_NAME.fullmatch(name):
            return None
        if name == self.root:
            return -1
        rest = name[len(self.root) :]
        if not (name.startswith(self.root) and _BELOW_ROOT.fullmatch(rest)):
            return None
        return int(rest.split("-")[1])  # at most six digits: no setting of Python matters

    def count_bots(self, bots: Any) -> None:
        if type(bots) is int and 0 <= bots <= MAX_BOTS:
            self.bots[self.sender or ""] = bots

    def exit(self, view: Any) -> None:
        if type(view) is str:
            self.bots.pop(view, None)


def _is_progress_options(options: Any) -> bool:
    if type(options) is not dict:
        return False
    root, partitions = options.get("root"), options.get("partitions")
    return (
        type(root) is str
        and SESSION_NAME.fullmatch(root) is not None
        and type(partitions) is int
        and 1 <= partitions <= MAX_PARTITIONS
    )
