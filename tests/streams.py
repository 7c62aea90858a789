"""A session's replica fed events as a reflector would stamp them, no sockets."""

from __future__ import annotations

from typing import Any

from million.compute.computation import Computation
from million.compute.tree import Spec
from million.replica.model import Replica
from million.wire.protocol import VIEW_JOIN, Event


class Stream:
    """A ``Computation`` replica of a session of ``partitions`` (a leaf, unless ``fanout``
    is smaller; ``spec`` sets other Spec fields) fed events of views, a millisecond of
    session time apart unless ``wait`` says; view ``v`` is identity ``admin:v`` unless told."""

    def __init__(self, partitions: int, fanout: int | None = None, **spec: Any) -> None:
        self.options = Spec("p", "1", 0, partitions, fanout or partitions, **spec).to_options()
        self.replica = Replica.create(Computation, "L", self.options)
        self.seq = 0
        self.time = 0

    def wait(self, ms: int) -> None:
        """Let ``ms`` of session time pass before the next event."""
        self.time += ms

    @property
    def model(self) -> Computation:
        model: Computation = self.replica.model
        return model

    def send(self, view: str, topic: str, data: Any = None, identity: str | None = None) -> Computation:
        """Apply an event of ``view``, joining it first if it has not joined."""
        identity = identity or f"admin:{view}"
        if topic != VIEW_JOIN and view not in self.model.views:
            self._apply(view, VIEW_JOIN, view, identity)
        self._apply(view, topic, data, identity)
        return self.model

    def _apply(self, view: str, topic: str, data: Any, identity: str) -> None:
        self.seq += 1
        self.time += 1
        self.replica.apply(Event("L", self.seq, self.time, view, topic, data, identity=identity))

    def prepare(
        self, view: str, inputs: list[Any], want: int | None = None, identity: str | None = None
    ) -> None:
        """``view`` claims preparing and reports ``inputs``, asking for ``want`` partitions."""
        self.send(view, "claim", "prepare", identity)
        data: dict[str, Any] = {"inputs": inputs}
        if want is not None:
            data["next"] = {"id": 1, "want": want}
        self.send(view, "inputs", data, identity)

    def given(self, view: str) -> list[int]:
        given: list[int] = self.model.answers[view][1]
        return given
