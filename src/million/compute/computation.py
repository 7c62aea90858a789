"""The ``Computation`` model: the replicated state of one session of the partition tree.

A session computes ``partitions`` partitions. If they fit in one session (at most
``fanout``) it is a leaf and its workers compute them with the plugin's ``compute``.
Otherwise it has ``fanout`` children, named ``<session>-<i>``, which split the
partitions evenly (``million.compute.tree``) and are computed the same way, recursively.
Each session prepares its inputs once (``prepare_inputs``) and, when every partition
or child has an output, collects them (``collect_results``); that output is the
partition's output in the parent.

Everything a session knows is its replicated model, so any worker can join any
session at any time, and every worker may leave: the work resumes where it stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from million.compute.tree import Spec, SpecError
from million.replica.model import Model
from million.replica.state import INT64_MAX, is_json
from million.wire.protocol import VIEW_EXIT, VIEW_JOIN

__all__ = ["CLAIMS", "Computation"]

log = logging.getLogger(__name__)

CLAIMS = ("prepare", "collect")  # the tasks a worker claims before doing them


@attrs.define
class Computation(Model, name="million.computation.2"):
    """The replicated state of one session of the tree.

    The number in its name changes whenever its events change meaning, so that a worker
    of another version is refused at the join (``model-mismatch``) instead of diverging.

    Every handler checks every field of its event before it changes anything, and
    ignores a malformed event whole: the same decision on every replica. Options that
    are not a valid ``Spec`` leave an inert model that subscribes to nothing.
    """

    leaf: bool = True
    root: bool = True
    count: int = 0
    inputs: list[Any] | None = None
    outputs: list[Any] = attrs.Factory(list)
    completed: list[bool] = attrs.Factory(list)
    started: list[bool] = attrs.Factory(list)
    done_by: list[str | None] = attrs.Factory(list)
    remaining: int = 0
    workers: dict[str, list[int]] = attrs.Factory(dict)  # view -> partitions it holds, oldest first
    answers: dict[str, list[Any]] = attrs.Factory(dict)  # view -> [request id, partitions given]
    claims: dict[str, str] = attrs.Factory(dict)  # "prepare" / "collect" -> view doing it
    output: Any = None
    done: bool = False

    def init(self, options: Any) -> None:
        try:
            spec = Spec.from_options(options)
        except SpecError as exc:
            log.warning("a computation with invalid options ignores every event: %s", exc)
            return
        self.leaf, self.root, self.count = spec.leaf, spec.parent is None, spec.count
        self.outputs = [None] * self.count
        self.completed = [False] * self.count
        self.started = [False] * self.count
        self.done_by = [None] * self.count
        self.remaining = self.count
        self.subscribe("request", self.request)
        self.subscribe("end", self.end)
        self.subscribe("claim", self.claim)
        self.subscribe("inputs", self.set_inputs)
        self.subscribe("output", self.set_output)
        self.subscribe(VIEW_JOIN, self.join)
        self.subscribe(VIEW_EXIT, self.exit)

    def join(self, view: str) -> None:
        """Whoever joins a child session that nobody prepares prepares it, without asking.

        Only workers open child sessions; a run's root is opened by whoever posts the
        run, so there the preparer asks (``claim``).
        """
        if type(view) is str and not self.root and self.inputs is None and "prepare" not in self.claims:
            self.claims["prepare"] = view

    def request(self, data: Any) -> None:
        """A worker asks for up to ``want`` more partitions (``{"id": n, "want": k}``; a
        ``want`` below one asks for one); the answer is recorded under its view."""
        if not _is_request(data):
            return
        view, want = self.sender or "", max(1, min(data["want"], self.count))
        given = [] if self.done or self.inputs is None else self._assign(view, want)
        if given:
            self.workers.setdefault(view, []).extend(given)
            for index in given:
                self.started[index] = True
        self.answers[view] = [data["id"], given]

    def _assign(self, view: str, want: int) -> list[int]:
        """Up to ``want`` partitions nobody has started, within this view's fair share of
        them; when none is left, the least-worked incomplete one it lacks, from the last.

        A partition whose holder left waits behind the unstarted ones: the holder is
        usually a coordinator still working below (``detach``).
        """
        fresh = [i for i in range(self.count) if not self.started[i] and not self.completed[i]]
        if fresh:
            askers = len(self.answers) + (view not in self.answers)
            held = sum(len(indexes) for indexes in self.workers.values())
            quota = -(-(len(fresh) + held) // askers) - len(self.workers.get(view, ()))
            return fresh[: max(1, min(want, quota))]
        load = [0] * self.count
        for indexes in self.workers.values():
            for index in indexes:
                load[index] += 1
        mine = self.workers.get(view, ())
        incomplete = [i for i in range(self.count) if not self.completed[i] and i not in mine]
        steal = min(incomplete, key=lambda index: (load[index], -index), default=None)
        return [] if steal is None else [steal]

    def end(self, data: Any) -> None:
        """A partition's output, and with ``next`` the reporter's next request.

        The first output reported wins; later ones are ignored. Whoever completes the
        last partition collects, without asking.
        """
        if not self._is_report(data):
            return
        index, output = data["index"], data["output"]
        if not self.completed[index]:
            self.completed[index] = True
            self.outputs[index] = output
            self.done_by[index] = self.sender
            self.remaining -= 1
            for view, held in list(self.workers.items()):
                if index in held:
                    held.remove(index)
                    if not held:
                        del self.workers[view]
            if self.remaining == 0 and "collect" not in self.claims:
                self.claims["collect"] = self.sender or ""
        if "next" in data:
            self.request(data["next"])

    def _is_report(self, data: Any) -> bool:
        """Whether ``data`` is ``{"index": i, "output": o, "next"?: request}`` with ``i`` a
        partition of this session and ``o`` a value a model may keep."""
        if not (type(data) is dict and ("next" not in data or _is_request(data["next"]))):
            return False
        index = data.get("index")
        return type(index) is int and 0 <= index < self.count and "output" in data and is_json(data["output"])

    def claim(self, task: Any) -> None:
        if type(task) is str and task in CLAIMS and task not in self.claims:
            self.claims[task] = self.sender or ""

    def set_inputs(self, data: Any) -> None:
        """The prepared inputs, and with ``next`` the preparer's first request."""
        if not self._is_inputs(data):
            return
        if self.inputs is None:
            self.inputs = data["inputs"]
            self.claims.pop("prepare", None)
        if "next" in data:
            self.request(data["next"])

    def _is_inputs(self, data: Any) -> bool:
        """Whether ``data`` is ``{"inputs": [one per partition], "next"?: request}``."""
        if not (type(data) is dict and ("next" not in data or _is_request(data["next"]))):
            return False
        inputs = data.get("inputs")
        return type(inputs) is list and len(inputs) == self.count and all(is_json(item) for item in inputs)

    def set_output(self, output: Any) -> None:
        if not self.done and self.remaining == 0 and is_json(output):
            self.output, self.done = output, True
            self.claims.pop("collect", None)

    def exit(self, view: str) -> None:
        if type(view) is not str:
            return
        self.workers.pop(view, None)
        self.answers.pop(view, None)
        for task in [task for task, holder in self.claims.items() if holder == view]:
            del self.claims[task]


def _is_request(data: Any) -> bool:
    """Whether ``data`` is ``{"id": n, "want": k}`` with whole numbers, ``n`` from 0 to
    2**63 - 1 (it is kept in the state)."""
    if type(data) is not dict:
        return False
    ident, want = data.get("id"), data.get("want")
    return type(ident) is int and 0 <= ident <= INT64_MAX and type(want) is int
