"""The lobby: a well-known replicated session listing the runs that want workers.

``million run`` posts its run there and marks it done with its answer; workers
started with ``million work`` and no ``--run`` watch it and share their bots among
the open runs.
"""

from __future__ import annotations

from typing import Any

import attrs

from million.compute.tree import Spec
from million.replica.model import Model

__all__ = ["LOBBY", "Lobby", "bots_per_run", "post_event"]

LOBBY = "million-lobby"
KEEP_FINISHED = 200  # finished runs the lobby remembers


@attrs.define
class Lobby(Model, name="million.lobby"):
    """Runs by name, in the order they were posted: plugin, size, state and answer."""

    runs: dict[str, dict[str, Any]] = attrs.Factory(dict)

    def init(self, options: Any) -> None:
        self.subscribe("post", self.post)
        self.subscribe("done", self.done)

    def post(self, data: Any) -> None:
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or name in self.runs:
            return
        self.runs[name] = {
            "plugin": data.get("plugin"),
            "version": data.get("version"),
            "partitions": data.get("partitions"),
            "fanout": data.get("fanout"),
            "state": "open",
            "answer": None,
            "posted": self.now,
        }

    def done(self, data: Any) -> None:
        name = data.get("name") if isinstance(data, dict) else None
        entry = self.runs.get(name) if isinstance(name, str) else None
        if entry is None or entry["state"] != "open":
            return
        entry["state"], entry["answer"] = "done", data.get("answer")
        finished = [name for name, run in self.runs.items() if run["state"] == "done"]
        for name in finished[:-KEEP_FINISHED]:
            del self.runs[name]

    def open_runs(self) -> list[str]:
        return [name for name, run in self.runs.items() if run["state"] == "open"]


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
