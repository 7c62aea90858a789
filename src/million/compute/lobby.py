"""The lobby: a well-known replicated session listing the runs that want workers.

``million run`` posts its run there and marks it done with its answer; workers
started with ``million work`` and no ``--run`` watch it and share their bots among
the open runs.
"""

from __future__ import annotations

from typing import Any

import attrs

from million.compute.tree import MAX_FANOUT, MAX_PARTITIONS, MAX_TEXT, Spec
from million.replica.model import Model
from million.replica.state import is_json
from million.wire.protocol import SESSION_NAME

__all__ = ["LOBBY", "Lobby", "bots_per_run", "failed_event", "post_event"]

LOBBY = "million-lobby"
KEEP_FINISHED = 200  # finished runs the lobby remembers
MAX_OPEN = 1000  # open runs the lobby lists; beyond, a post is ignored
MAX_RUN_NAME = 190  # characters: the run's progress session (``<run>:progress``) needs a few more
MAX_FAILURE = 500  # characters of why a run failed, as the lobby keeps it


@attrs.define
class Lobby(Model, name="million.lobby"):
    """Runs by name, in the order they were posted: plugin, size, state (open, done or
    failed) and answer or failure."""

    runs: dict[str, dict[str, Any]] = attrs.Factory(dict)

    def init(self, options: Any) -> None:
        self.subscribe("post", self.post)
        self.subscribe("done", self.done)
        self.subscribe("failed", self.failed)

    def post(self, data: Any) -> None:
        """``post_event``'s fields; ignored unless each is of its type and in range, for a
        run not listed yet or listed as failed (it is being resumed), while fewer than
        ``MAX_OPEN`` runs are open."""
        if not _is_post(data) or len(self.open_runs()) >= MAX_OPEN:
            return
        listed = self.runs.get(data["name"])
        if listed is not None and listed["state"] != "failed":
            return
        self.runs.pop(data["name"], None)
        self.runs[data["name"]] = {
            "plugin": data["plugin"],
            "version": data["version"],
            "partitions": data["partitions"],
            "fanout": data["fanout"],
            "state": "open",
            "answer": None,
            "posted": self.now,
        }

    def done(self, data: Any) -> None:
        """``{"name": run, "answer": its answer}`` closes an open run (anyone may close any)."""
        if not (type(data) is dict and type(data.get("name")) is str and is_json(data.get("answer"))):
            return
        entry = self.runs.get(data["name"])
        if entry is None or entry["state"] != "open":
            return
        entry["state"], entry["answer"] = "done", data.get("answer")
        self._prune()

    def failed(self, data: Any) -> None:
        """``{"name": run, "failure": why}`` marks an open run failed (anyone may)."""
        if not (type(data) is dict and type(data.get("name")) is str and type(data.get("failure")) is str):
            return
        entry = self.runs.get(data["name"])
        if entry is None or entry["state"] != "open":
            return
        entry["state"], entry["failure"] = "failed", data["failure"][:MAX_FAILURE]
        self._prune()

    def _prune(self) -> None:
        """Forget the oldest finished runs beyond ``KEEP_FINISHED``."""
        finished = [name for name, run in self.runs.items() if run["state"] != "open"]
        for name in finished[:-KEEP_FINISHED]:
            del self.runs[name]

    def open_runs(self) -> list[str]:
        return [name for name, run in self.runs.items() if run["state"] == "open"]


def _is_post(data: Any) -> bool:
    if type(data) is not dict:
        return False
    name, plugin, version = data.get("name"), data.get("plugin"), data.get("version")
    partitions, fanout = data.get("partitions"), data.get("fanout")
    return (
        type(name) is str
        and len(name) <= MAX_RUN_NAME
        and SESSION_NAME.fullmatch(name) is not None
        and all(type(text) is str and len(text) <= MAX_TEXT for text in (plugin, version))
        and type(partitions) is int
        and 1 <= partitions <= MAX_PARTITIONS
        and type(fanout) is int
        and 2 <= fanout <= MAX_FANOUT
    )


def post_event(name: str, spec: Spec) -> dict[str, Any]:
    """The ``post`` event for a run."""
    return {
        "name": name,
        "plugin": spec.plugin,
        "version": spec.version,
        "partitions": spec.partitions,
        "fanout": spec.fanout,
    }


def bots_per_run(bots: int, runs: list[str]) -> dict[str, int]:
    """Bots per run: as even as it gets, earlier runs first; runs beyond ``bots`` wait."""
    if not runs:
        return {}
    runs = runs[:bots]
    base, extra = divmod(bots, len(runs))
    return {run: base + (1 if i < extra else 0) for i, run in enumerate(runs)}


def failed_event(name: str, why: str) -> dict[str, Any]:
    """The ``failed`` event that marks run ``name`` failed, saying ``why`` (cut to what the
    lobby keeps)."""
    return {"name": name, "failure": why[:MAX_FAILURE]}
