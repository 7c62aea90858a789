"""Models and views the tests share, importable from test subprocesses too."""

from __future__ import annotations

from typing import Any

import attrs
import trio

import million


@attrs.define
class Ledger(million.Model, name="test-ledger"):
    """Records every addition with its sender, a random draw and the time: rich state to compare."""

    total: int = 0
    entries: list[list[Any]] = attrs.Factory(list)
    by_sender: dict[str, int] = attrs.Factory(dict)
    presence: list[list[Any]] = attrs.Factory(list)
    present: list[str] = attrs.Factory(list)
    rang_at: int | None = None
    target: int = 0

    def init(self, options: Any) -> None:
        options = options or {}
        self.target = options.get("target", 0)
        self.subscribe("add", self.add)
        self.subscribe(million.wire.protocol.VIEW_JOIN, self.joined)
        self.subscribe(million.wire.protocol.VIEW_EXIT, self.exited)
        if "ring_ms" in options:
            self.future(options["ring_ms"], self.ring)

    def add(self, value: Any) -> None:
        self.total += 1
        self.entries.append([value, self.sender, self.random.randbelow(1000), self.now])
        self.by_sender[self.sender] = self.by_sender.get(self.sender, 0) + 1
        if self.total == self.target:
            self.publish("reached", self.total)

    def joined(self, view: str) -> None:
        self.presence.append(["join", view, self.now])
        self.present.append(view)

    def exited(self, view: str) -> None:
        self.presence.append(["exit", view, self.now])
        self.present.remove(view)

    def ring(self) -> None:
        self.rang_at = self.now


@attrs.define
class Tagged(million.Model, name="test-tagged"):
    """Remembers the session index it was created with and every value published to it."""

    index: int = -1
    values: list[int] = attrs.Factory(list)

    def init(self, options: Any) -> None:
        self.index = options["index"]
        self.subscribe("value", self.value)

    def value(self, value: int) -> None:
        self.values.append(value)


class Publisher(million.View):
    """Publishes ``count`` additions, all at once, then rests."""

    count = 0

    async def run(self) -> None:
        for i in range(self.count):
            self.publish("add", i)


class DigestOnTarget(million.View):
    """Records the replica digest at the moment the model reaches its target."""

    def __init__(self, session: million.Session) -> None:
        super().__init__(session)
        self.digest: tuple[int, str] | None = None
        self.reached = trio.Event()
        self.subscribe("reached", self.on_reached)

    def on_reached(self, _: Any) -> None:
        replica = self.session.replica
        self.digest = (replica.seq, replica.digest())
        self.reached.set()


@attrs.define
class Tally(million.Model, name="test-tally"):
    """Counts events and keeps none of their data."""

    count: int = 0

    def init(self, options: Any) -> None:
        self.subscribe("blob", self.blob)

    def blob(self, _: Any) -> None:
        self.count += 1
