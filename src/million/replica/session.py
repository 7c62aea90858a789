"""Joining a session: ``async with million.join(client, name, Model, View, options)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from million.replica.model import Model, Replica
from million.replica.view import View
from million.wire import tasks

if TYPE_CHECKING:
    from million.replica.client import Client, Group

__all__ = ["JoinError", "Session", "join"]

V = TypeVar("V", bound=View)


class JoinError(Exception):
    """The reflector refused a join; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Session:
    """One participant's membership of a session: its view id, the model, its view."""

    def __init__(
        self, client: Client, group: Group, model_cls: type[Model], options: Any, create: bool = True
    ) -> None:
        self.client = client
        self.group = group
        self.name = group.name
        self.model_cls = model_cls
        self.options = options
        self.create = create
        self.view_id = ""
        self.view: View | None = None
        self.nursery: trio.Nursery | None = None
        self.synced = False
        self.resyncs = 0
        self.handlers: dict[str, list[Callable[[Any], None]]] = {}
        self._joined = trio.Event()
        self._error: JoinError | None = None

    @property
    def replica(self) -> Replica:
        replica = self.group.replica
        if replica is None:
            raise RuntimeError(f"session {self.name} has no model yet")
        return replica

    @property
    def model(self) -> Model:
        return self.replica.model

    def publish(self, topic: str, data: Any = None) -> bool:
        """Send an event to the model; False (dropped) while the connection is down."""
        if not self.synced:
            return False
        self.client.publish(self.name, self.view_id, topic, data)
        return True

    def summarize(self, data: Any, seq: int | None = None) -> None:
        """Tell the reflector what this session is at, in a few words; ``million status``
        and the web page show it. ``seq`` is the event it describes (default: the last
        one applied); the reflector keeps the summary of the latest event."""
        if self.synced and self.group.replica is not None:
            self.client.summarize(self.name, self.view_id, seq or self.group.replica.seq, data)

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None:
        self.handlers.setdefault(topic, []).append(handler)

    async def wait_seen(self) -> None:
        """Wait until the replica has applied this membership's own ``view-join``."""
        seq = int(self.view_id[1:])  # view ids are ``v<seq of their view-join>``
        await self.wait_for(lambda _: self.replica.seq >= seq)

    async def wait_for(self, predicate: Callable[[Any], bool]) -> None:
        """Wait until ``predicate(model)`` holds after an applied event or timer."""
        while not (self.group.replica is not None and predicate(self.model)):
            await self.group.wait_changed()

    def deliver(self, topic: str, data: Any) -> None:
        for handler in self.handlers.get(topic, ()):
            handler(data)

    # --- called by the client ----------------------------------------------------------

    def joined(self, view_id: str) -> None:
        again = self._joined.is_set()
        self.view_id = view_id
        self.synced = True
        self._joined.set()
        if again:
            self.resyncs += 1
            if self.view is not None:
                self.view.resynced()

    def failed(self, error: JoinError) -> None:
        self._error = error
        self._joined.set()

    async def wait_joined(self) -> None:
        await self._joined.wait()
        if self._error is not None:
            raise self._error


@asynccontextmanager
async def join(
    client: Client,
    name: str,
    model_cls: type[Model],
    view_cls: Callable[[Session], View] = View,
    options: Any = None,
    *,
    create: bool = True,
) -> AsyncIterator[Session]:
    """Join session ``name``, replay it to the present, build the view and run it.

    The first join of a session creates its model with ``options``; later joins must
    name the same model class and options. With ``create=False`` the session must
    exist and its options are taken as they are (``session.options``). On exit the
    view's tasks are cancelled and the session is left; the session itself lives on.
    """
    session = await client.join(name, model_cls, options, create=create)
    try:
        async with tasks.open_nursery() as nursery:
            session.nursery = nursery
            session.view = view_cls(session)
            nursery.start_soon(session.view.run)
            yield session
            nursery.cancel_scope.cancel()
    finally:
        client.leave(session)
