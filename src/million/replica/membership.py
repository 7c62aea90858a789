"""This process's memberships of sessions, and the replicas they share.

Part of the client core (sans-IO): a ``Group`` is one session's replica and the
memberships that share it; ``Groups`` finds them by name and keeps the replicas of
sessions left lately, so that joining one again needs only the events since.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from million.replica.model import Model, Replica
from million.replica.state import prime
from million.wire.protocol import Event, Sync

__all__ = ["Group", "Groups", "JoinError", "Membership", "State", "Unusable"]

log = logging.getLogger(__name__)

KEPT_REPLICAS = 64  # replicas of left sessions kept to rejoin with only the events since


class JoinError(Exception):
    """The reflector refused a join; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unusable(Exception):
    """A session's state that this process's model class cannot take."""


class State(enum.Enum):
    """Where a membership is."""

    JOINING = "joining"  # asked to join, not answered yet
    SYNCED = "synced"  # joined, and its replica follows the stream
    RESYNCING = "resyncing"  # joined before the connection dropped; joining again
    FAILED = "failed"  # refused (``error`` says why)
    LEFT = "left"  # left or given up


@attrs.define(eq=False)
class Group:
    """This process's memberships of one session and the replica they share."""

    name: str
    model_cls: type[Model]
    replica: Replica | None = None
    members: list[Membership] = attrs.Factory(list)
    synced_from: int = 0  # seq of the snapshot the replica was last rebuilt from
    replayed: int = 0  # events replayed on top of it
    departing: int = 0  # memberships left but not yet confirmed by the reflector
    connection: int = 0  # the connection the replica was synced over

    def have(self, connection: int) -> int | None:
        """The last event of the replica if it was synced over ``connection`` (a join on it
        then asks only for the events since); None if there is no such replica."""
        return self.replica.seq if self.replica is not None and self.connection == connection else None

    def rebuild(self, sync: Sync) -> None:
        """A new replica from the sync's snapshot (or creation record) and events.
        ``ValueError`` if the snapshot is not one of this model class after its own seq."""
        if sync.snapshot is not None:
            replica = Replica.restore(self.model_cls, self.name, sync.snapshot.state)
            if replica.seq != sync.snapshot.seq:
                raise ValueError(
                    f"the snapshot of event {sync.snapshot.seq} holds the state after {replica.seq}"
                )
        else:
            replica = Replica.create(self.model_cls, self.name, sync.options)
        self.replica = replica
        self.synced_from = sync.snapshot.seq if sync.snapshot is not None else 0
        self.resume(sync)

    def catch_up(self, sync: Sync) -> None:
        """Rebuild the replica from ``sync``, or bring the one kept up to it. ``Unusable``
        if the sync's state does not fit the model class; ``LookupError`` for a gap."""
        if sync.full or self.replica is None:
            try:
                self.rebuild(sync)
            except Exception as exc:
                self.replica = None
                raise Unusable(f"{self.name}: cannot rebuild the model: {exc}") from exc
        elif sync.events:
            self.resume(sync)

    def resume(self, sync: Sync) -> None:
        """Bring the replica to the present with the sync's events (those it has are skipped)."""
        replica = self.replica
        assert replica is not None
        for event in sync.events:
            replica.apply(event)
        replica.advance(sync.time)
        replica.take_view_events()
        self.replayed = len(sync.events)

    def apply(self, event: Event) -> bool:
        """Apply the next event and deliver what the model published to the views; False
        for one already applied. A gap raises ``LookupError``."""
        replica = self.replica
        assert replica is not None
        if not replica.apply(event):
            return False
        if replica.view_events:
            self.deliver(replica.take_view_events())
        return True

    def advance(self, time: int) -> None:
        """Move session time to ``time``: due timers fire, the views hear what they publish."""
        replica = self.replica
        assert replica is not None
        replica.advance(time)
        if replica.view_events:
            self.deliver(replica.take_view_events())

    def deliver(self, events: list[tuple[str, Any]]) -> None:
        """Hand what the model published to each membership's view handlers."""
        for member in list(self.members):
            handlers = member.handlers
            for topic, data in events:
                for handler in handlers.get(topic, ()):
                    try:
                        handler(data)
                    except Exception:
                        log.exception("%s: view handler for %r failed", self.name, topic)


@attrs.define(eq=False)
class Membership:
    """One participant of a session: its view id in it, and what it hears of the model."""

    group: Group
    options: Any  # the session's creation options once joined
    create: bool = True
    state: State = State.JOINING
    view_id: str = ""
    error: JoinError | None = None
    resyncs: int = 0  # joins again after the connection dropped
    handlers: dict[str, list[Callable[[Any], None]]] = attrs.Factory(dict)
    on_resync: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def synced(self) -> bool:
        return self.state is State.SYNCED

    def joined(self, sync: Sync) -> None:
        """The reflector answered this membership's join (again, after a reconnect)."""
        again = self.state is State.RESYNCING
        self.options = sync.options
        self.view_id = sync.view
        self.state = State.SYNCED
        if again:
            self.resyncs += 1
            if self.on_resync is not None:
                self.on_resync()

    def failed(self, error: JoinError) -> None:
        self.error = error
        self.state = State.FAILED


class Groups:
    """The groups by session name, and the replicas of sessions left lately."""

    def __init__(self) -> None:
        self._live: dict[str, Group] = {}
        self._kept: OrderedDict[str, Group] = OrderedDict()  # left groups whose replica is current

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Group]:
        return iter(list(self._live.values()))

    def members(self) -> Iterator[Membership]:
        for group in list(self._live.values()):
            yield from list(group.members)

    def get(self, name: str) -> Group | None:
        return self._live.get(name)

    def live(self, group: Group) -> bool:
        return self._live.get(group.name) is group

    def open(self, name: str, model_cls: type[Model]) -> Group:
        """The group of ``name``: the live one, the one kept from a membership left lately, or new."""
        group = self._live.get(name)
        if group is None:
            kept = self._kept.pop(name, None)
            prime(model_cls)
            group = kept if kept is not None and kept.model_cls is model_cls else Group(name, model_cls)
            self._live[name] = group
        return group

    def restore(self, group: Group) -> bool:
        """Make a discarded ``group`` live again (a join given up whose sync came after all:
        it is rebuilt and left, so that it can answer a snapshot asked of the leaver);
        False if its name is taken."""
        if group.name in self._live:
            return False
        self._kept.pop(group.name, None)
        self._live[group.name] = group
        return True

    def discard(self, group: Group, connection: int | None) -> None:
        """Forget ``group`` once nobody uses it; keep its replica if it was synced over
        ``connection``, the current one (None: there is none)."""
        if group.members or group.departing or not self.live(group):
            return
        del self._live[group.name]
        if group.replica is not None and group.connection == connection:
            self._kept[group.name] = group
            if len(self._kept) > KEPT_REPLICAS:
                self._kept.popitem(last=False)

    def forget_kept(self) -> None:
        self._kept.clear()
