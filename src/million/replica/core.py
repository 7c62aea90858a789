"""The client core: the client's side of the protocol, with no I/O, no trio and no clock.

``ClientCore`` holds this process's memberships of sessions and the replicas they
share. Feed it the reflector's frames (``welcome`` for the first of a connection, then
``receive``) and the connection's end (``disconnected``); it applies events to the
replicas, answers snapshot and digest requests, and queues what to send, which the
caller takes with ``data_to_send`` (``on_output`` is called whenever something was
queued). A dropped connection is the caller's to re-establish: on the next ``welcome``
every membership joins again, and a replica rebuilt from the reflector's snapshot and
events never applies an event twice. Memberships in the same process share one replica.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from million.replica.membership import Group, Groups, JoinError, Membership, State, Unusable
from million.replica.model import Model, Replica
from million.replica.state import StateError, dump_state
from million.wire import codec
from million.wire.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Digest,
    DigestRequest,
    Error,
    ErrorCode,
    Event,
    Hello,
    Join,
    Leave,
    Left,
    Ping,
    Pong,
    ProtocolError,
    SnapshotRequest,
    Status,
    StatusRequest,
    Summarize,
    Sync,
    Tick,
    Welcome,
    state_digest,
)

__all__ = [
    "ClientCore",
    "ClientError",
    "ClientStatistics",
    "Group",
    "JoinError",
    "Membership",
    "Received",
    "State",
]

log = logging.getLogger(__name__)

FRAME_TARGET = 1 << 18  # bytes per outgoing frame, unless the reflector allows less
FATAL = {ErrorCode.VERSION, ErrorCode.UNAUTHORIZED}


class ClientError(Exception):
    """The reflector cannot be used: unreachable, another protocol version, or refused."""


@attrs.frozen
class Received:
    """What a frame changed: groups whose replica or memberships moved, and replies."""

    changed: list[Group]
    replies: list[Pong | Status]


@attrs.frozen
class ClientStatistics:
    connections: int
    frames_in: int
    events_applied: int
    sessions: int


def _nothing() -> None:
    pass


class ClientCore:
    """Memberships, replicas and the exchange with the reflector."""

    def __init__(self, *, token: str | None = None, label: str = "") -> None:
        self.token = token
        self.label = label
        self.on_output: Callable[[], None] = _nothing
        self.errors: deque[Error] = deque(maxlen=100)
        self.connected = False
        self.connection = 0  # the number of the current (or last) connection, from 1
        self.max_frame = DEFAULT_MAX_FRAME
        self._groups = Groups()
        self._joining: dict[int, Membership] = {}
        self._departing: dict[tuple[str, str], Group] = {}
        self._refs = itertools.count(1)
        self._out: list[bytes] = []
        self._frames_in = 0
        self._events_applied = 0
        self._changed: dict[str, Group] = {}
        self._replies: list[Pong | Status] = []
        self._handlers: dict[type, Callable[[Any], None]] = {
            Event: self._on_event,
            Tick: self._on_tick,
            Sync: self._on_sync,
            SnapshotRequest: self._on_request,
            DigestRequest: self._on_request,
            Left: self._on_left,
            Error: self._on_error,
            Pong: self._replies.append,
            Status: self._replies.append,
        }

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(self.connection, self._frames_in, self._events_applied, len(self._groups))

    @property
    def departing(self) -> bool:
        """Whether a leave is not yet confirmed by the reflector."""
        return bool(self._departing)

    @property
    def pending(self) -> bool:
        """Whether something is queued to send."""
        return bool(self._out)

    # --- the connection -------------------------------------------------------------------

    def hello(self) -> bytes:
        """The first frame of every connection."""
        return codec.encode(Hello(PROTOCOL_VERSION, self.token, self.label))

    def welcome(self, data: bytes) -> None:
        """The reflector's answer to the hello: connected, and every membership joins again.

        ``ClientError`` if the reflector refuses this client for good, ``ProtocolError``
        for anything else unexpected.
        """
        self.max_frame = check_welcome(data).max_frame
        self.connected = True
        self.connection += 1
        self._out = []
        for member in self._groups.members():
            self._send_join(member)

    def disconnected(self) -> None:
        """The connection ended: memberships wait for the next, unconfirmed leaves are done."""
        self.connected = False
        self._joining.clear()
        for member in self._groups.members():
            if member.state is State.SYNCED:
                member.state = State.RESYNCING
        for group in self._departing.values():
            group.departing = 0
            self._groups.discard(group, None)
        self._departing.clear()
        self._groups.forget_kept()
        self._out = []

    def receive(self, data: bytes) -> Received:
        """Apply a frame from the reflector. ``ProtocolError`` if the stream cannot be
        followed (a gap): the connection must be dropped and made again."""
        self._frames_in += 1
        handlers = self._handlers
        for message in codec.decode_reflector(data):
            handlers[type(message)](message)
        changed, self._changed = list(self._changed.values()), {}
        replies = self._replies[:]
        self._replies.clear()
        return Received(changed, replies)

    def data_to_send(self) -> list[bytes]:
        """Everything queued, packed into as few frames as the reflector allows."""
        parts, self._out = self._out, []
        return codec.frames(parts, min(FRAME_TARGET, self.max_frame))

    # --- sessions -------------------------------------------------------------------------

    def join(
        self, name: str, model_cls: type[Model], options: Any = None, *, create: bool = True
    ) -> Membership:
        """A new membership of ``name``; it is joined once ``state`` is no longer JOINING."""
        group = self._groups.open(name, model_cls)
        member = Membership(group, options, create)
        group.members.append(member)
        if self.connected:
            self._send_join(member)
        return member

    def leave(self, member: Membership) -> None:
        """Leave without waiting. The replica stays until the reflector confirms, so that
        it can still answer the snapshot the reflector may ask for on the way out."""
        if member.synced and self.connected:
            self._send(Leave(member.name, member.view_id))
            self._depart(member.name, member.view_id, member.group)
        self.forget(member)

    def forget(self, member: Membership) -> None:
        """Drop a membership (a join given up, or one that failed) without telling anyone."""
        if member.state is not State.FAILED:
            member.state = State.LEFT
        group = member.group
        if member in group.members:
            group.members.remove(member)
        self._discard(group)

    def publish(self, member: Membership, topic: str, data: Any) -> bool:
        """Queue an event for the session's models; False (dropped) while not synced."""
        if not (member.state is State.SYNCED and self.connected):
            return False
        self._queue(codec.encode_publish(member.name, member.view_id, topic, data))
        return True

    def summarize(self, member: Membership, data: Any, seq: int | None = None) -> None:
        """Tell the reflector what the session is at as of event ``seq`` (default: the last applied)."""
        replica = member.group.replica
        if member.synced and self.connected and replica is not None:
            self._send(Summarize(member.name, member.view_id, seq or replica.seq, codec.dumps(data)))

    def ping(self) -> int:
        """Queue a ping; its Pong carries the returned ref."""
        self._send(Ping(ref := next(self._refs)))
        return ref

    def status(self, summaries: Iterable[str] = ()) -> int:
        """Queue a status request; its Status carries the returned ref."""
        self._send(StatusRequest(ref := next(self._refs), list(summaries)))
        return ref

    def _depart(self, name: str, view: str, group: Group) -> None:
        """Keep ``group`` until the reflector confirms that ``view`` left."""
        self._departing[(name, view)] = group
        group.departing += 1

    def _discard(self, group: Group) -> None:
        self._groups.discard(group, self.connection if self.connected else None)

    def _send_join(self, member: Membership) -> None:
        ref = next(self._refs)
        self._joining[ref] = member
        group = member.group
        have = group.have(self.connection)
        self._send(Join(ref, group.name, group.model_cls.model_name, member.options, member.create, have))

    def _send(self, message: Any) -> None:
        if self.connected:
            self._queue(codec.encode(message))

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self.on_output()

    def _touch(self, group: Group) -> None:
        self._changed[group.name] = group

    # --- messages from the reflector -----------------------------------------------------

    def _on_event(self, event: Event) -> None:
        group = self._groups.get(event.session)
        if group is None or group.replica is None:
            return
        try:
            applied = group.apply(event)
        except LookupError as exc:  # a gap: resynchronise everything through a new connection
            raise ProtocolError(ErrorCode.UNEXPECTED, str(exc)) from None
        self._events_applied += applied
        self._touch(group)

    def _on_tick(self, tick: Tick) -> None:
        group = self._groups.get(tick.session)
        if group is None or group.replica is None:
            return
        group.advance(tick.time)
        self._touch(group)

    def _on_sync(self, sync: Sync) -> None:
        member = self._joining.pop(sync.ref, None)
        if member is None:
            return
        group = member.group
        if not self._groups.live(group) and not self._groups.restore(group):
            self._send(Leave(sync.session, sync.view))  # given up, and its name reused since
            return
        try:
            group.catch_up(sync)
        except Unusable as exc:  # state this model class cannot take: fail loudly, not forever
            log.error("%s", exc)
            self._fail(member, JoinError("unusable-state", str(exc)))
            self._send(Leave(sync.session, sync.view))
            return
        except LookupError as exc:  # a gap
            raise ProtocolError(ErrorCode.UNEXPECTED, str(exc)) from None
        group.connection = self.connection
        self._touch(group)
        if member not in group.members:  # the join was given up on the way: leave again
            self._send(Leave(sync.session, sync.view))
            self._depart(sync.session, sync.view, group)
            return
        member.joined(sync)

    def _fail(self, member: Membership, error: JoinError) -> None:
        member.failed(error)
        self._touch(member.group)

    def _on_request(self, request: SnapshotRequest | DigestRequest) -> None:
        """A snapshot or a digest of the replica as it is after event ``seq``, if it is."""
        group = self._groups.get(request.session)
        replica = group.replica if group is not None else None
        if replica is None or replica.seq != request.seq:
            return
        if isinstance(request, DigestRequest):
            try:
                self._send(Digest(request.session, request.seq, replica.digest()))
            except StateError as exc:
                log.error("%s: no digest of event %d: %s", request.session, request.seq, exc)
        elif (message := snapshot_of(replica, request.seq, self.max_frame)) is not None:
            self._queue(message)

    def _on_left(self, left: Left) -> None:
        group = self._departing.pop((left.session, left.view), None)
        if group is not None:
            group.departing -= 1
            self._discard(group)

    def _on_error(self, error: Error) -> None:
        self.errors.append(error)
        member = self._joining.pop(error.ref, None) if error.ref is not None else None
        if member is not None:
            self._fail(member, JoinError(error.code, error.message))
            return
        log.warning("reflector error %s: %s", error.code, error.message)


def check_welcome(data: bytes) -> Welcome:
    """The reflector's answer to a hello; ``ClientError`` if it refuses this client for
    good, ``ProtocolError`` for anything else unexpected."""
    reply = codec.decode_reflector(data)
    first = reply[0] if reply else None
    if isinstance(first, Error):
        if first.code in FATAL:
            raise ClientError(first.message)
        raise ProtocolError(first.code, first.message)
    if not isinstance(first, Welcome):
        raise ProtocolError(ErrorCode.UNEXPECTED, f"expected a welcome, got {first!r}")
    return first


def snapshot_of(replica: Replica, seq: int, max_frame: int) -> bytes | None:
    """The encoded Snapshot of ``replica`` after event ``seq``; None (logged) if it is
    over the reflector's frame limit or cannot be encoded."""
    try:
        state = dump_state(replica.snapshot())
    except StateError as exc:
        log.error("%s: no snapshot of event %d: %s", replica.session, seq, exc)
        return None
    message = codec.encode_snapshot(replica.session, seq, state, state_digest(state))
    if len(message) + 2 > max_frame:  # it travels inside a frame's [ ]
        log.error(
            "%s: a snapshot of %d bytes is over the reflector's frame limit of %d; not sent",
            replica.session,
            len(message),
            max_frame,
        )
        return None
    return message
