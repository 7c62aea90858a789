"""Joining a session: ``async with million.join(client, name, Model, View, options)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Generic, TypeVar

import attrs

from million.replica.client import Client
from million.replica.core import JoinError, Membership
from million.replica.model import Model, Replica
from million.replica.view import View
from million.wire import tasks

__all__ = ["JoinError", "Session", "SyncInfo", "join"]

V = TypeVar("V", bound=View)


@attrs.frozen
class SyncInfo:
    """How the replica reached the present: from which snapshot, with how many events."""

    synced_from: int  # seq of the snapshot it was last rebuilt from (0: from the start)
    replayed: int  # events replayed on top of it


class Session(Generic[V]):
    """One participant's membership of a session: its view id, the model, its view."""

    def __init__(self, client: Client, member: Membership) -> None:
        self.client = client
        self.member = member
        self.view_id = member.view_id  # ``v<seq of its view-join>``; a new one after a resync
        self._view: V | None = None

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def options(self) -> Any:
        """The options the session was created with."""
        return self.member.options

    @property
    def synced(self) -> bool:
        """Whether the replica follows the stream now (False while reconnecting)."""
        return self.member.synced

    @property
    def resyncs(self) -> int:
        """How often a dropped connection made this membership join again."""
        return self.member.resyncs

    @property
    def view(self) -> V:
        if self._view is None:
            raise RuntimeError(f"session {self.name} has no view yet")
        return self._view

    @property
    def replica(self) -> Replica:
        replica = self.member.group.replica
        if replica is None:
            raise RuntimeError(f"session {self.name} has no model yet")
        return replica

    @property
    def model(self) -> Any:
        replica = self.member.group.replica
        if replica is None:
            raise RuntimeError(f"session {self.name} has no model yet")
        return replica.model

    def sync_info(self) -> SyncInfo:
        group = self.member.group
        return SyncInfo(group.synced_from, group.replayed)

    def publish(self, topic: str, data: Any = None) -> bool:
        """Send an event to the model; False (dropped) while the connection is down."""
        return self.client.core.publish(self.member, topic, data)

    def summarize(self, data: Any, seq: int | None = None) -> None:
        """Tell the reflector what this session is at, in a few words; ``million status``
        and the web page show it. ``seq`` is the event it describes (default: the last
        one applied); the reflector keeps the summary of the latest event."""
        self.client.core.summarize(self.member, data, seq)

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None:
        """Call ``handler(data)`` after each event that made the model publish ``topic``."""
        self.member.handlers.setdefault(topic, []).append(handler)

    async def wait_changed(self) -> None:
        """Wait until the replica has applied an event or a tick."""
        await self.client.wait_changed(self.name)

    async def wait_for(self, predicate: Callable[[Any], bool]) -> None:
        """Wait until ``predicate(model)`` holds after an applied event or timer (checked
        as each is applied: the task is woken once it holds)."""

        def ready() -> bool:
            replica = self.member.group.replica
            return replica is not None and predicate(replica.model)

        while not ready():  # once woken, it may no longer hold
            await self.client.wait_until(self.name, ready)

    def _resynced(self, view: View) -> None:
        self.view_id = self.member.view_id
        view.resynced()

    async def wait_seen(self) -> None:
        """Wait until the replica has applied this membership's own ``view-join``."""
        seq = int(self.view_id[1:])  # view ids are ``v<seq of their view-join>``
        await self.wait_for(lambda _: self.replica.seq >= seq)


@asynccontextmanager
async def join(
    client: Client,
    name: str,
    model_cls: type[Model],
    view_cls: Callable[[Session[Any]], V] = View,  # type: ignore[assignment]
    options: Any = None,
    *,
    create: bool = True,
) -> AsyncIterator[Session[V]]:
    """Join session ``name``, replay it to the present, build the view and run it.

    The first join of a session creates its model with ``options``; later joins must
    name the same model class and options. With ``create=False`` the session must
    exist and its options are taken as they are (``session.options``). On exit the
    view's tasks are cancelled and the session is left; the session itself lives on.
    """
    member = await client.join(name, model_cls, options, create=create)
    session: Session[V] = Session(client, member)
    try:
        async with tasks.open_nursery() as nursery:
            view = session._view = view_cls(session)
            member.on_resync = partial(session._resynced, view)
            nursery.start_soon(view.run)
            yield session
            nursery.cancel_scope.cancel()
    finally:
        client.leave(member)
