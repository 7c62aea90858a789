"""The client side of the protocol: one websocket per process, many sessions over it.

``open_client(url)`` connects and keeps connecting: a dropped connection is
re-established with backoff and every session is joined again and rebuilt from the
reflector's snapshot and events, so a model never applies an event twice. Views in
the same process that join the same session share one replica of its model.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from million.replica.model import Model, Replica, digest_of_dump, dump_state
from million.replica.session import JoinError, Session
from million.wire import codec, tasks, transport
from million.wire.protocol import (
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
)

__all__ = ["Client", "ClientError", "open_client"]

log = logging.getLogger(__name__)

FRAME_TARGET = 1 << 18  # bytes per outgoing frame, unless the reflector allows less
KEPT_REPLICAS = 64  # replicas of left sessions kept to rejoin with only the events since
LEAVE_TIMEOUT = 5.0
FATAL = {ErrorCode.VERSION, ErrorCode.UNAUTHORIZED}


class ClientError(Exception):
    """The reflector cannot be used: unreachable, another protocol version, or refused."""


@attrs.define(eq=False)
class Group:
    """This process's participants of one session and the replica they share."""

    name: str
    model_cls: type[Model]
    options: Any
    replica: Replica | None = None
    sessions: list[Session] = attrs.Factory(list)
    synced_from: int = 0  # seq of the snapshot the replica was last rebuilt from
    replayed: int = 0  # events replayed on top of it
    departing: int = 0  # memberships left but not yet confirmed by the reflector
    connection: int = 0  # the connection the replica was synced over
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def rebuild(self, sync: Sync) -> None:
        if sync.snapshot is not None:
            replica = Replica.restore(self.model_cls, self.name, sync.snapshot.state)
        else:
            replica = Replica.create(self.model_cls, self.name, sync.options)
        for event in sync.events:
            replica.apply(event)
        replica.advance(sync.time)
        replica.take_view_events()
        self.replica = replica
        self.synced_from = sync.snapshot.seq if sync.snapshot is not None else 0
        self.replayed = len(sync.events)

    def resume(self, sync: Sync) -> None:
        """Bring the kept replica to the present with the events since it was left."""
        replica = self.replica
        assert replica is not None
        for event in sync.events:
            replica.apply(event)  # the ones it already has are skipped
        replica.advance(sync.time)
        replica.take_view_events()
        self.replayed = len(sync.events)


@attrs.frozen
class ClientStatistics:
    connections: int
    frames_in: int
    events_applied: int
    sessions: int


class Client:
    """A connection to a reflector. Use ``open_client``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        label: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.label = label
        self.ssl_context = ssl_context
        self.connection_id = ""
        self.errors: deque[Error] = deque(maxlen=100)
        self._groups: dict[str, Group] = {}
        self._kept: OrderedDict[str, Group] = OrderedDict()  # left groups whose replica is current
        self._joining: dict[int, Session] = {}
        self._departing: dict[tuple[str, str], Group] = {}
        self._departed = trio.Event()
        self._departed.set()
        self._replies: dict[int, trio.MemorySendChannel[Any]] = {}
        self._refs = itertools.count(1)
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._max_frame = transport.DEFAULT_MAX_FRAME
        self._connected = False
        self._connections = 0
        self._frames_in = 0
        self._events_applied = 0
        self._handlers = {
            Event: self._on_event,
            Tick: self._on_tick,
            Sync: self._on_sync,
            SnapshotRequest: self._on_snapshot_request,
            DigestRequest: self._on_digest_request,
            Left: self._on_left,
            Error: self._on_error,
            Pong: self._on_reply,
            Status: self._on_reply,
            Welcome: self._on_welcome,
        }

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connections(self) -> int:
        """Connections made so far: the number of the current one."""
        return self._connections

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(self._connections, self._frames_in, self._events_applied, len(self._groups))

    # --- sessions ----------------------------------------------------------------------

    async def join(
        self, name: str, model_cls: type[Model], options: Any = None, *, create: bool = True
    ) -> Session:
        """Join ``name`` and wait until this participant's replica is at the present."""
        group = self._groups.get(name)
        if group is None:
            kept = self._kept.pop(name, None)
            if kept is None or kept.model_cls is not model_cls:
                kept = Group(name, model_cls, options)
            group = self._groups[name] = kept
        session = Session(self, group, model_cls, options, create)
        group.sessions.append(session)
        if self._connected:
            self._send_join(session)
        try:
            await session.wait_joined()
        except BaseException:
            self._forget(session)
            raise
        return session

    def leave(self, session: Session) -> None:
        """Leave the session without waiting.

        The replica stays until the reflector confirms (``left``), so that it can still
        answer the snapshot the reflector may ask for on the way out; ``settle`` waits
        for that.
        """
        if session.synced and self._connected:
            self._send(Leave(session.name, session.view_id))
            self._depart(session.name, session.view_id, session.group)
        self._forget(session)

    def _depart(self, name: str, view: str, group: Group) -> None:
        """Keep ``group`` until the reflector confirms that ``view`` left."""
        self._departing[(name, view)] = group
        group.departing += 1
        if self._departed.is_set():
            self._departed = trio.Event()

    def publish(self, name: str, view: str, topic: str, data: Any) -> None:
        if self._connected:
            self._queue(codec.encode_publish(name, view, topic, data))

    async def settle(self) -> None:
        """Wait until every leave is confirmed and everything queued is sent."""
        while self._connected and not self._departed.is_set():
            await self._departed.wait()
        await self.drain()

    async def drain(self) -> None:
        """Wait until everything queued has been handed to the connection (or it is gone)."""
        while self._connected and not self._drained.is_set():
            await self._drained.wait()

    async def ping(self) -> None:
        """A round trip to the reflector."""
        await self._request(Ping(next(self._refs)))

    def summarize(self, name: str, view: str, seq: int, data: Any) -> None:
        self._send(Summarize(name, view, seq, data))

    async def status(self, summaries: list[str] | None = None) -> Any:
        """The reflector's description of itself and its sessions, with the latest
        summaries of the sessions named in ``summaries``."""
        reply = await self._request(StatusRequest(next(self._refs), summaries or []))
        return reply.info

    async def _request(self, message: Ping | StatusRequest) -> Any:
        """Send ``message`` and wait for its answer; ``ClientError`` if the connection is
        down or goes down first."""
        if not self._connected:
            raise ClientError(f"not connected to the reflector at {self.url}")
        send, receive = trio.open_memory_channel[Any](1)
        self._replies[message.ref] = send
        try:
            self._send(message)
            return await receive.receive()
        except trio.EndOfChannel:
            raise ClientError(f"the connection to {self.url} was lost before it answered") from None
        finally:
            self._replies.pop(message.ref, None)

    def _forget(self, session: Session) -> None:
        session.synced = False
        group = session.group
        if session in group.sessions:
            group.sessions.remove(session)
        self._discard(group)

    def _discard(self, group: Group) -> None:
        if not group.sessions and not group.departing and self._groups.get(group.name) is group:
            del self._groups[group.name]
            if self._connected and group.replica is not None and group.connection == self._connections:
                self._kept[group.name] = group
                if len(self._kept) > KEPT_REPLICAS:
                    self._kept.popitem(last=False)

    def _send_join(self, session: Session) -> None:
        ref = next(self._refs)
        self._joining[ref] = session
        group = session.group
        current = group.replica is not None and group.connection == self._connections
        have = group.replica.seq if current and group.replica is not None else None
        model = session.model_cls.model_name
        self._send(Join(ref, session.name, model, session.options, session.create, have))

    def _send(self, message: Any) -> None:
        if self._connected:
            self._queue(codec.encode(message))

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._wake.set()
        if self._drained.is_set():
            self._drained = trio.Event()

    # --- the connection ----------------------------------------------------------------

    async def run(
        self, *, first_timeout: float = 10.0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stay connected until cancelled; ``task_status`` is reported once first connected."""
        delay = 0.05
        deadline = trio.current_time() + first_timeout
        started = False
        while True:
            try:
                async with transport.connect(self.url, ssl_context=self.ssl_context) as channel:
                    await self._handshake(channel)
                    delay = 0.05
                    async with tasks.open_nursery() as nursery:
                        nursery.start_soon(self._writer, channel, nursery.cancel_scope)
                        self._on_connected()
                        if not started:
                            started = True
                            task_status.started()
                        reason = await self._reader(channel)
                        nursery.cancel_scope.cancel()
                    log.info("connection to %s closed: %s", self.url, reason)
            except (
                OSError,
                transport.Closed,
                trio.BrokenResourceError,
                trio.TooSlowError,
                ProtocolError,
            ) as exc:
                if not started and trio.current_time() > deadline:
                    raise ClientError(f"cannot reach the reflector at {self.url}: {exc}") from None
                log.info("connection to %s lost: %s; reconnecting in %.2fs", self.url, exc, delay)
            finally:
                self._on_disconnected()
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _handshake(self, channel: transport.Channel) -> None:
        await channel.send(codec.encode(Hello(PROTOCOL_VERSION, self.token, self.label)))
        with trio.fail_after(10):
            reply = codec.decode_reflector(await channel.receive())
        first = reply[0] if reply else None
        if isinstance(first, Error):
            if first.code in FATAL:
                raise ClientError(f"the reflector at {self.url} refused us: {first.message}")
            raise ProtocolError(first.code, first.message)
        if not isinstance(first, Welcome):
            raise ProtocolError(ErrorCode.UNEXPECTED, f"expected a welcome, got {first!r}")
        self._on_welcome(first)

    def _on_connected(self) -> None:
        self._connected = True
        self._connections += 1
        self._out = []
        for group in self._groups.values():
            for session in group.sessions:
                self._send_join(session)

    def _on_disconnected(self) -> None:
        self._connected = False
        self._joining.clear()
        for group in self._groups.values():
            for session in group.sessions:
                session.synced = False
        self._drained.set()
        for group in self._departing.values():
            group.departing = 0
            self._discard(group)
        self._departing.clear()
        self._departed.set()
        self._kept.clear()
        for reply in self._replies.values():
            reply.close()

    async def _writer(self, channel: transport.Channel, scope: trio.CancelScope) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            parts, self._out = self._out, []
            try:
                for chunk in _chunks(parts, min(FRAME_TARGET, self._max_frame)):
                    await channel.send(chunk)
            except transport.Closed:
                scope.cancel()
                return
            if not self._out:
                self._drained.set()

    async def _reader(self, channel: transport.Channel) -> transport.Closed:
        """Apply what the reflector sends until the connection closes; returns why."""
        handlers = self._handlers
        while True:
            try:
                data = await channel.receive()
            except transport.Closed as closed:
                return closed
            self._frames_in += 1
            touched: dict[str, Group] = {}
            for message in codec.decode_reflector(data):
                group = handlers[type(message)](message)
                if group is not None:
                    touched[group.name] = group
            for group in touched.values():
                group.changed()

    # --- messages from the reflector ---------------------------------------------------

    def _on_event(self, event: Event) -> Group | None:
        group = self._groups.get(event.session)
        if group is None or group.replica is None:
            return None
        replica = group.replica
        try:
            applied = replica.apply(event)
        except LookupError as exc:  # a gap: resynchronise everything through a new connection
            raise ProtocolError(ErrorCode.UNEXPECTED, str(exc)) from None
        if applied:
            self._events_applied += 1
            if replica.view_events:
                _deliver(group, replica.take_view_events())
        return group

    def _on_tick(self, tick: Tick) -> Group | None:
        group = self._groups.get(tick.session)
        if group is None or group.replica is None:
            return None
        group.replica.advance(tick.time)
        if group.replica.view_events:
            _deliver(group, group.replica.take_view_events())
        return group

    def _on_sync(self, sync: Sync) -> Group | None:
        session = self._joining.pop(sync.ref, None)
        if session is None:
            return None
        group = session.group
        if self._groups.get(group.name) is not group:  # given up, and nobody else here uses it
            self._send(Leave(sync.session, sync.view))
            return None
        if sync.full or group.replica is None:
            try:
                group.rebuild(sync)
            except Exception as exc:  # state this model class cannot take: fail loudly, not forever
                log.error("%s: cannot rebuild the model: %s", sync.session, exc)
                group.replica = None
                session.failed(JoinError("unusable-state", f"cannot rebuild {sync.session}: {exc}"))
                self._send(Leave(sync.session, sync.view))
                return None
        elif sync.events:
            try:
                group.resume(sync)
            except LookupError as exc:
                raise ProtocolError(ErrorCode.UNEXPECTED, str(exc)) from None
        group.connection = self._connections
        if session not in group.sessions:  # the join was given up on the way: leave again
            self._send(Leave(sync.session, sync.view))
            self._depart(sync.session, sync.view, group)
            return group
        session.options = sync.options
        session.joined(sync.view)
        return group

    def _on_snapshot_request(self, request: SnapshotRequest) -> None:
        replica = self._replica_at(request.session, request.seq)
        if replica is None:
            return
        state = dump_state(replica.snapshot())
        message = codec.encode_snapshot(request.session, request.seq, state, digest_of_dump(state))
        if len(message) + 2 > self._max_frame:  # it travels inside a frame's [ ]
            log.error(
                "%s: a snapshot of %d bytes is over the reflector's frame limit of %d; not sent",
                request.session,
                len(message),
                self._max_frame,
            )
            return
        self._queue(message)

    def _on_digest_request(self, request: DigestRequest) -> None:
        replica = self._replica_at(request.session, request.seq)
        if replica is not None:
            self._send(Digest(request.session, request.seq, replica.digest()))

    def _replica_at(self, name: str, seq: int) -> Replica | None:
        group = self._groups.get(name)
        if group is None or group.replica is None or group.replica.seq != seq:
            return None
        return group.replica

    def _on_left(self, left: Left) -> None:
        group = self._departing.pop((left.session, left.view), None)
        if group is not None:
            group.departing -= 1
            self._discard(group)
        if not self._departing:
            self._departed.set()

    def _on_error(self, error: Error) -> None:
        self.errors.append(error)
        session = self._joining.pop(error.ref, None) if error.ref is not None else None
        if session is not None:
            session.failed(JoinError(error.code, error.message))
            return
        log.warning("reflector error %s: %s", error.code, error.message)

    def _on_reply(self, reply: Pong | Status) -> None:
        send = self._replies.pop(reply.ref, None)
        if send is not None:
            send.send_nowait(reply)

    def _on_welcome(self, welcome: Welcome) -> None:
        self.connection_id = welcome.connection
        self._max_frame = welcome.max_frame


def ssl_context(cafile: str | None) -> ssl.SSLContext | None:
    """The context for ``wss://`` URLs that also trusts ``cafile``; None: the system's."""
    return ssl.create_default_context(cafile=cafile) if cafile else None


def client_env(token: str | None, cafile: str | None) -> dict[str, str]:
    """Environment variables that give a child process the same token and trust."""
    env = {"MILLION_TOKEN": token, "MILLION_CAFILE": cafile}
    return {key: value for key, value in env.items() if value}


def _deliver(group: Group, events: list[tuple[str, Any]]) -> None:
    for session in list(group.sessions):
        for topic, data in events:
            try:
                session.deliver(topic, data)
            except Exception:
                log.exception("%s: view handler for %r failed", group.name, topic)


def _chunks(parts: list[bytes], limit: int) -> list[bytes]:
    """Pack encoded messages into as few frames of at most ``limit`` bytes as fit.

    A single message over the limit still goes alone: the reflector refuses it, loudly.
    """
    chunks: list[bytes] = []
    start = size = 0
    for i, part in enumerate(parts):
        if size and size + len(part) + 2 > limit:
            chunks.append(codec.frame(parts[start:i]))
            start, size = i, 0
        size += len(part) + 1
    if start < len(parts):
        chunks.append(codec.frame(parts[start:]))
    return chunks


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    label: str = "",
    ssl_context: ssl.SSLContext | None = None,
    first_timeout: float = 10.0,
) -> AsyncIterator[Client]:
    """Connect to the reflector at ``url``; raises ``ClientError`` if it cannot be reached."""
    try:
        transport.address(url)
    except ValueError as exc:
        raise ClientError(str(exc)) from None
    client = Client(url, token=token, label=label, ssl_context=ssl_context)
    async with tasks.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: client.run(first_timeout=first_timeout, task_status=task_status)
        )
        yield client
        with trio.move_on_after(LEAVE_TIMEOUT):
            await client.settle()
        nursery.cancel_scope.cancel()
