"""The reflector: a generic server that orders, stamps, stores and relays session events.

It knows sessions, participants and opaque JSON; nothing about what models do.

Everything a connection's messages cause is appended, in order, to one outbox and
one store batch. The pump task commits the batch to the store (its journal) and
only then hands the outbox to the connections' writer tasks, so nothing is relayed
that a restart could lose, and each connection sees its messages in the order they
were caused. Each writer sends everything queued for its connection as one frame.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from million._version import __version__
from million.relay.config import ReflectorConfig, ReflectorStatistics
from million.relay.store import Batch, Store, StoredSession, open_store
from million.relay.web import serve_web
from million.wire import codec, tasks, transport
from million.wire.protocol import (
    PROTOCOL_VERSION,
    VIEW_EXIT,
    VIEW_JOIN,
    Digest,
    DigestRequest,
    Error,
    ErrorCode,
    Hello,
    Join,
    Leave,
    Left,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Snapshot,
    SnapshotRequest,
    Status,
    StatusRequest,
    Summarize,
    Tick,
    Welcome,
    check_session_name,
)

__all__ = ["Reflector", "ReflectorConfig", "open_reflector", "serve_reflector"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Conn:
    """One client connection: its memberships and its queue of encoded messages."""

    id: str
    channel: transport.Channel
    label: str = ""
    memberships: dict[tuple[str, str], Session] = attrs.Factory(dict)
    out: list[bytes] = attrs.Factory(list)
    out_bytes: int = 0
    wake: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    close_code: int = transport.NORMAL
    close_reason: str = ""
    max_queue_bytes: int = 0
    allowance: float = 0.0  # messages it may still send now (token bucket)
    refilled: float = 0.0

    def enqueue(self, data: bytes) -> None:
        if self.close_reason:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes > self.max_queue_bytes:
            self.kill(
                transport.POLICY, f"{ErrorCode.SLOW_CONSUMER}: send queue over {self.max_queue_bytes} bytes"
            )
        self.wake.set()

    def kill(self, code: int, reason: str) -> None:
        if not self.close_reason:
            log.warning("closing connection %s: %s", self.id, reason)
            self.close_code, self.close_reason = code, reason
            self.out.clear()
            self.out_bytes = 0
            self.scope.cancel()


@attrs.define(eq=False)
class Session:
    """The reflector's side of a session: its stream, members and latest snapshot."""

    name: str
    model: str
    options: Any
    options_key: bytes
    seq: int = 0
    time: int = 0
    occupied_since: float | None = None
    occupied_seq: int = 0  # seq when someone last came into the empty session
    snapshot_seq: int = 0
    snapshot_time: int = 0
    snapshot_state: bytes | None = None
    snapshot_digest: str | None = None
    tail: list[bytes] = attrs.Factory(list)
    views: dict[str, Conn] = attrs.Factory(dict)
    conns: dict[Conn, int] = attrs.Factory(dict)
    recipients: tuple[Conn, ...] = ()
    last_sent: float = 0.0
    snapshot_asked: tuple[Conn, int, int] | None = None
    digests: dict[int, str] = attrs.Factory(dict)
    divergences: int = 0

    time_base: int = 0

    def clock(self, now: float) -> int:
        """Session time: only time while someone is present counts."""
        if self.occupied_since is None:
            return self.time
        return max(self.time, self.time_base + int((now - self.occupied_since) * 1000))


def _options_key(options: Any) -> bytes:
    return codec.dumps(options)


class Reflector:
    """A running reflector; build it with ``open_reflector`` or ``serve_reflector``."""

    def __init__(self, config: ReflectorConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.port = 0
        self.http_port: int | None = None
        self.started_at = 0.0
        self._conns: dict[str, Conn] = {}
        self._sessions: dict[str, Session] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # in memory, nobody present: oldest first
        self._stored: set[str] = set()  # names of the sessions in the store
        self._summaries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # session -> (seq, summary)
        self._loading: dict[str, trio.Event] = {}
        self._occupied: dict[str, Session] = {}
        self._outbox: list[tuple[tuple[Conn, ...], bytes]] = []
        self._batch = Batch()
        self._evict: list[str] = []
        self._dirty = trio.Event()
        self._stats = dict.fromkeys(attrs.fields_dict(ReflectorStatistics), 0)
        self._handlers = {
            Publish: self._on_publish,
            Leave: self._on_leave,
            Snapshot: self._on_snapshot,
            Digest: self._on_digest,
            Ping: self._on_ping,
            StatusRequest: self._on_status,
            Summarize: self._on_summary,
        }

    @property
    def web_url(self) -> str | None:
        """The page's address, if it is served."""
        if self.http_port is None:
            return None
        scheme = "https" if self.config.ssl_context else "http"
        return f"{scheme}://{self.config.host}:{self.http_port}/"

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.ssl_context else "ws"
        return f"{scheme}://{self.config.host}:{self.port}"

    def statistics(self) -> ReflectorStatistics:
        stats = dict(
            self._stats, connections=len(self._conns), sessions=len(self._occupied), idle=len(self._idle)
        )
        return ReflectorStatistics(**stats)

    # --- serving -----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Reflector] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; on the way out, commit what is pending and tell clients."""
        self.started_at = trio.current_time()
        self._stored = set(await self.store.names())
        try:
            async with tasks.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                nursery.start_soon(self.store.keep_applying)
                nursery.start_soon(self._ticker)
                self.port = await nursery.start(
                    lambda task_status: transport.serve(
                        self._handle,
                        self.config.host,
                        self.config.port,
                        ssl_context=self.config.ssl_context,
                        max_frame=self.config.max_frame,
                        engine=self.config.transport,
                        task_status=task_status,
                    )
                )
                if self.config.http_port is not None:
                    self.http_port = await nursery.start(
                        partial(
                            serve_web,
                            self,
                            self.config.host,
                            self.config.http_port,
                            ssl_context=self.config.ssl_context,
                        )
                    )
                log.info("reflector listening on %s (store %s)", self.url, self.store.path)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()

    async def _handle(self, channel: transport.Channel) -> None:
        # Whatever happens here must never reach the server's nursery: other clients go on.
        conn = Conn(
            secrets.token_hex(4),
            channel,
            max_queue_bytes=self.config.max_queue_bytes,
            allowance=self.config.max_messages_per_s,
            refilled=trio.current_time(),
        )
        try:
            if await self._handshake(conn):
                await self._serve_connection(conn)
        except transport.Closed:
            pass
        except Exception:
            log.exception("connection %s failed", conn.id)
        finally:
            if trio.current_effective_deadline() == -math.inf and not conn.close_reason:
                conn.close_code = transport.GOING_AWAY
                conn.close_reason = f"{ErrorCode.SHUTDOWN}: the reflector is stopping"
            self._drop(conn)
            if conn.close_reason:
                with trio.CancelScope(shield=True):
                    await channel.close(conn.close_code, conn.close_reason)

    async def _handshake(self, conn: Conn) -> bool:
        with trio.move_on_after(10):
            data = await conn.channel.receive()
            try:
                messages = codec.decode_client(data)
                hello = messages[0] if len(messages) == 1 else None
                if not isinstance(hello, Hello):
                    raise ProtocolError(ErrorCode.UNEXPECTED, "the first message must be a hello")
                if hello.version != PROTOCOL_VERSION:
                    raise ProtocolError(
                        ErrorCode.VERSION,
                        f"this reflector speaks protocol version {PROTOCOL_VERSION}, not {hello.version}",
                    )
                if self.config.token is not None and not secrets.compare_digest(
                    (hello.token or "").encode(), self.config.token.encode()
                ):
                    raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong token")
            except ProtocolError as exc:
                await conn.channel.send(codec.encode(Error(exc.code, exc.message)))
                conn.close_code, conn.close_reason = transport.POLICY, f"{exc.code}: {exc.message}"
                return False
            conn.label = hello.client
            await conn.channel.send(
                codec.encode(
                    Welcome(PROTOCOL_VERSION, conn.id, f"million {__version__}", self.config.max_frame)
                )
            )
            return True
        conn.close_code, conn.close_reason = transport.POLICY, "no hello within 10 s"
        return False

    async def _serve_connection(self, conn: Conn) -> None:
        self._conns[conn.id] = conn
        with conn.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn, nursery.cancel_scope)
                await self._reader(conn)
                nursery.cancel_scope.cancel()

    async def _reader(self, conn: Conn) -> None:
        stats = self._stats
        handlers = self._handlers
        while True:
            try:
                data = await conn.channel.receive()
            except transport.Closed:
                return
            stats["frames_in"] += 1
            stats["bytes_in"] += len(data)
            try:
                messages = codec.decode_client(data)
            except ProtocolError as exc:
                self._error(conn, exc)
                continue
            pause = self._throttle(conn, len(messages))
            if pause:
                stats["throttled"] += 1
                await trio.sleep(pause)  # its socket backs up: the sender slows, nobody else does
            for message in messages:
                try:
                    handler = handlers.get(type(message))
                    if handler is not None:
                        handler(conn, message)
                    elif type(message) is Join:
                        await self._on_join(conn, message)
                    else:
                        raise ProtocolError(
                            ErrorCode.UNEXPECTED, f"unexpected {type(message).__name__.lower()}"
                        )
                except ProtocolError as exc:
                    self._error(conn, exc, getattr(message, "session", None), getattr(message, "ref", None))

    def _throttle(self, conn: Conn, messages: int) -> float:
        """Seconds ``conn`` must wait before its ``messages`` are handled (token bucket
        of one second's allowance)."""
        rate = self.config.max_messages_per_s
        now = trio.current_time()
        conn.allowance = min(rate, conn.allowance + (now - conn.refilled) * rate) - messages
        conn.refilled = now
        return -conn.allowance / rate if conn.allowance < 0 else 0.0

    async def _writer(self, conn: Conn, scope: trio.CancelScope) -> None:
        stats = self._stats
        while True:
            await conn.wake.wait()
            conn.wake = trio.Event()
            parts, conn.out, conn.out_bytes = conn.out, [], 0
            if not parts:
                continue
            data = parts[0] if len(parts) == 1 else codec.frame(parts)
            stats["frames_out"] += 1
            stats["bytes_out"] += len(data)
            try:
                await conn.channel.send(data)
            except transport.Closed:
                scope.cancel()
                return

    def _error(
        self, conn: Conn, exc: ProtocolError, session: str | None = None, ref: int | None = None
    ) -> None:
        self._stats["errors"] += 1
        log.info("connection %s: %s: %s", conn.id, exc.code, exc.message)
        self._emit((conn,), codec.encode(Error(exc.code, exc.message, session, ref)))

    # --- the pipeline ------------------------------------------------------------------

    def _emit(self, recipients: tuple[Conn, ...], data: bytes) -> None:
        self._outbox.append((recipients, data))
        self._dirty.set()

    async def _pump(self) -> None:
        while True:
            await self._dirty.wait()
            await self._flush()

    async def _flush(self) -> None:
        self._dirty = trio.Event()
        batch, self._batch = self._batch, Batch()
        outbox, self._outbox = self._outbox, []
        evict, self._evict = self._evict, []
        if batch:
            with trio.CancelScope(shield=True):  # once taken, a batch is always written
                await self.store.commit(batch)
        for recipients, data in outbox:
            for conn in recipients:
                conn.enqueue(data)
        for name in evict:
            if self._evictable(name):
                self._idle[name] = None
                self._idle.move_to_end(name)
        while len(self._idle) > self.config.idle_sessions:
            name, _ = self._idle.popitem(last=False)
            if self._evictable(name):
                del self._sessions[name]

    def _evictable(self, name: str) -> bool:
        session = self._sessions.get(name)
        return session is not None and not session.conns and session.snapshot_asked is None

    async def _ticker(self) -> None:
        interval = self.config.tick_ms / 1000
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for session in self._occupied.values():
                if now - session.last_sent >= interval:
                    session.time = session.clock(now)
                    session.last_sent = now
                    self._emit(session.recipients, codec.encode(Tick(session.name, session.time)))

    # --- the ordered stream ------------------------------------------------------------

    def _append(
        self, session: Session, view: str, topic: str, data: Any, recipients: tuple[Conn, ...]
    ) -> None:
        now = trio.current_time()
        session.seq += 1
        session.time = session.clock(now)
        session.last_sent = now
        raw = codec.encode_event(session.name, session.seq, session.time, view, topic, data)
        session.tail.append(raw)
        self._batch.events.append((session.name, session.seq, raw))
        self._emit(recipients, raw)
        self._stats["events"] += 1
        if session.seq - session.snapshot_seq >= self.config.snapshot_every and self._may_ask(session):
            self._ask_snapshot(session, session.recipients)

    def _may_ask(self, session: Session) -> bool:
        """No request outstanding, or one left unanswered for a whole interval: ask again."""
        asked = session.snapshot_asked
        return asked is None or session.seq - asked[1] >= self.config.snapshot_every

    def _ask_snapshot(self, session: Session, candidates: tuple[Conn, ...]) -> None:
        if not candidates:
            return
        asked = candidates[session.seq % len(candidates)]
        session.snapshot_asked = (asked, session.seq, session.time)
        self._emit((asked,), codec.encode(SnapshotRequest(session.name, session.seq)))
        if len(candidates) > 1:
            other = candidates[(session.seq + 1) % len(candidates)]
            self._emit((other,), codec.encode(DigestRequest(session.name, session.seq)))

    def _on_publish(self, conn: Conn, message: Publish) -> None:
        session = conn.memberships.get((message.session, message.view))
        if session is None:
            raise ProtocolError(
                ErrorCode.NOT_JOINED, f"view {message.view!r} has not joined session {message.session!r}"
            )
        self._append(session, message.view, message.topic, message.data, session.recipients)

    async def _on_join(self, conn: Conn, message: Join) -> None:
        check_session_name(message.session)
        if len(conn.memberships) >= self.config.max_sessions_per_connection:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"a connection may hold at most {self.config.max_sessions_per_connection} memberships",
            )
        session = await self._session(message)
        if session.model != message.model or (
            message.create and session.options_key != _options_key(message.options)
        ):
            if not session.conns:
                self._evict.append(session.name)
            raise ProtocolError(
                ErrorCode.MODEL_MISMATCH,
                f"session {session.name!r} was created with model {session.model!r} and other options"
                if session.model == message.model
                else f"session {session.name!r} runs model {session.model!r}, not {message.model!r}",
            )
        view = f"v{session.seq + 1}"
        full = conn not in session.conns
        self._idle.pop(session.name, None)
        now = trio.current_time()
        if not session.conns:
            session.time_base = session.time
            session.occupied_since = now
            session.occupied_seq = session.seq
            self._occupied[session.name] = session
        session.conns[conn] = session.conns.get(conn, 0) + 1
        session.recipients = tuple(session.conns)
        session.views[view] = conn
        conn.memberships[(session.name, view)] = session
        sync = self._sync(session, message.ref, view, full, message.have, session.clock(now))
        self._emit((conn,), sync)
        self._append(session, view, VIEW_JOIN, view, session.recipients)
        self._batch.presence[session.name] = codec.dumps(list(session.views))

    def _sync(self, session: Session, ref: int, view: str, full: bool, have: int | None, time: int) -> bytes:
        """The Sync for a join: everything, only the events after ``have``, or nothing
        when the connection already holds the session."""
        resume = full and have is not None and session.snapshot_seq <= have <= session.seq
        if resume:
            full = False
        body: dict[str, Any] = {
            "type": "sync",
            "ref": ref,
            "session": session.name,
            "view": view,
            "model": session.model,
            "options": session.options,
            "time": time,
            "full": full,
        }
        if full:
            if session.snapshot_state is not None:
                body["snapshot"] = {
                    "seq": session.snapshot_seq,
                    "time": session.snapshot_time,
                    "state": codec.fragment(session.snapshot_state),
                    "digest": session.snapshot_digest,
                }
            body["events"] = [codec.fragment(raw) for raw in session.tail]
        elif resume:
            body["events"] = [codec.fragment(raw) for raw in session.tail[have - session.snapshot_seq :]]
        return codec.dumps(body)

    async def _session(self, message: Join) -> Session:
        """The live session named in a join: in memory, loaded from the store, or new."""
        name = message.session
        while name in self._loading:
            await self._loading[name].wait()
        session = self._sessions.get(name)
        if session is not None:
            return session
        stored = None
        if name in self._stored:
            self._loading[name] = loaded = trio.Event()
            try:
                stored = await self.store.load(name)
            finally:
                del self._loading[name]
                loaded.set()
        session = self._sessions.get(name)
        if session is not None:
            return session
        if stored is None and not message.create:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"there is no session {name!r}")
        if stored is None:
            session = Session(name, message.model, message.options, _options_key(message.options))
            self._batch.created.append((name, message.model, session.options_key))
            self._stored.add(name)
        else:
            session = _revive(stored)
        self._sessions[name] = session
        for view in codec.loads(stored.present) if stored is not None else ():
            # Present when the reflector last stopped without saying goodbye: gone now.
            self._append(session, view, VIEW_EXIT, view, ())
            self._batch.presence[name] = b"[]"
        return session

    def _on_leave(self, conn: Conn, message: Leave) -> None:
        session = conn.memberships.get((message.session, message.view))
        if session is None:
            raise ProtocolError(
                ErrorCode.NOT_JOINED, f"view {message.view!r} has not joined session {message.session!r}"
            )
        self._remove(conn, session, message.view)
        behind = session.seq - session.snapshot_seq
        if (
            not session.conns
            and session.snapshot_asked is None
            and behind >= self.config.leave_snapshot_after
        ):
            self._ask_snapshot(session, (conn,))
        self._emit((conn,), codec.encode(Left(message.session, message.view)))

    def _remove(self, conn: Conn, session: Session, view: str) -> None:
        """End one membership: the exit goes to everyone who saw it, the leaver included."""
        recipients = session.recipients
        del conn.memberships[(session.name, view)]
        del session.views[view]
        count = session.conns[conn] - 1
        if count:
            session.conns[conn] = count
        else:
            del session.conns[conn]
            session.recipients = tuple(session.conns)
        self._append(session, view, VIEW_EXIT, view, recipients)
        self._batch.presence[session.name] = codec.dumps(list(session.views))
        if not session.conns:
            session.occupied_since = None
            self._occupied.pop(session.name, None)
            self._evict.append(session.name)

    def _drop(self, conn: Conn) -> None:
        """A connection ended: every membership it held exits."""
        self._conns.pop(conn.id, None)
        for (_, view), session in list(conn.memberships.items()):
            self._remove(conn, session, view)
        for session in self._sessions.values():
            if session.snapshot_asked is not None and session.snapshot_asked[0] is conn:
                session.snapshot_asked = None
                if not session.conns:
                    self._evict.append(session.name)

    def _on_snapshot(self, conn: Conn, message: Snapshot) -> None:
        session = self._sessions.get(message.session)
        asked = session.snapshot_asked if session is not None else None
        if session is not None and asked is not None and message.seq < asked[1] and conn in session.conns:
            return  # the answer to a request made again since: too late to be used
        if session is None or asked is None or asked[0] is not conn or asked[1] != message.seq:
            raise ProtocolError(ErrorCode.UNEXPECTED, "a snapshot nobody asked for")
        session.snapshot_asked = None
        state = codec.compact(codec.dumps(message.state))
        session.tail = session.tail[message.seq - session.snapshot_seq :]
        session.snapshot_seq, session.snapshot_time = message.seq, asked[2]
        session.snapshot_state, session.snapshot_digest = state, message.digest
        self._batch.snapshots.append((session.name, message.seq, asked[2], state, message.digest))
        self._compare(session, message.seq, message.digest)
        if not session.conns:
            self._evict.append(session.name)
        elif session.seq - session.snapshot_seq >= self.config.snapshot_every:
            self._ask_snapshot(session, session.recipients)
        self._dirty.set()

    def _on_digest(self, conn: Conn, message: Digest) -> None:
        session = self._sessions.get(message.session)
        if session is None or conn not in session.conns:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not in session {message.session!r}")
        self._compare(session, message.seq, message.digest)

    def _compare(self, session: Session, seq: int, digest: str) -> None:
        first = session.digests.pop(seq, None)
        if first is None:
            if len(session.digests) > 16:
                session.digests.clear()
            session.digests[seq] = digest
        elif first != digest:
            session.divergences += 1
            self._stats["divergences"] += 1
            log.warning(
                "session %s diverged at event %d: digests %s and %s", session.name, seq, first, digest
            )

    def _on_summary(self, conn: Conn, message: Summarize) -> None:
        if (message.session, message.view) not in conn.memberships:
            raise ProtocolError(
                ErrorCode.NOT_JOINED, f"view {message.view!r} has not joined session {message.session!r}"
            )
        raw = codec.compact(codec.dumps(message.data))
        if len(raw) > self.config.max_summary:
            raise ProtocolError(
                ErrorCode.LIMIT, f"a summary may have at most {self.config.max_summary} bytes, not {len(raw)}"
            )
        if message.seq < self._summaries.get(message.session, (0, b""))[0]:
            return  # a participant that lags behind described an older state
        self._summaries[message.session] = (message.seq, raw)
        self._summaries.move_to_end(message.session)
        if len(self._summaries) > self.config.summaries:
            self._summaries.popitem(last=False)

    def summary_names(self) -> list[str]:
        return list(self._summaries)

    def summaries(self, names: Iterable[str]) -> dict[str, Any]:
        """The latest summaries of the sessions ``names`` that have one."""
        return {name: codec.loads(self._summaries[name][1]) for name in names if name in self._summaries}

    def summaries_under(self, root: str) -> dict[str, Any]:
        """Summaries of ``root`` and the sessions below it (``root-...``)."""
        prefix = f"{root}-"
        return self.summaries(name for name in self._summaries if name == root or name.startswith(prefix))

    def _on_ping(self, conn: Conn, message: Ping) -> None:
        self._emit((conn,), codec.encode(Pong(message.ref)))

    def _on_status(self, conn: Conn, message: StatusRequest) -> None:
        info = self.describe()
        info["summaries"] = self.summaries(message.summaries[:1000])
        self._emit((conn,), codec.encode(Status(message.ref, info)))

    def describe(self) -> dict[str, Any]:
        """What ``million status`` shows: the reflector and its sessions with participants."""
        now = trio.current_time()
        return {
            "version": __version__,
            "uptime_s": round(trio.current_time() - self.started_at, 3),
            "store": self.store.path,
            "statistics": attrs.asdict(self.statistics()),
            "sessions": [
                {
                    "name": s.name,
                    "model": s.model,
                    "participants": len(s.views),
                    "connections": len(s.conns),
                    "seq": s.seq,
                    "time": s.time,
                    "events_per_s": _rate(s.seq - s.occupied_seq, now - (s.occupied_since or now)),
                    "snapshot_seq": s.snapshot_seq,
                    "events_since_snapshot": s.seq - s.snapshot_seq,
                    "divergences": s.divergences,
                }
                for s in sorted(self._occupied.values(), key=lambda s: s.name)
            ],
        }


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _revive(stored: StoredSession) -> Session:
    options = codec.loads(stored.options)
    session = Session(
        stored.name,
        stored.model,
        options,
        stored.options,
        seq=stored.snapshot_seq + len(stored.events),
        time=codec.loads(stored.events[-1])["time"] if stored.events else stored.snapshot_time,
        snapshot_seq=stored.snapshot_seq,
        snapshot_time=stored.snapshot_time,
        snapshot_state=stored.snapshot_state,
        snapshot_digest=stored.snapshot_digest,
        tail=list(stored.events),
    )
    return session


@asynccontextmanager
async def open_reflector(config: ReflectorConfig | None = None) -> AsyncIterator[Reflector]:
    """Run a reflector in this process for the duration of the block."""
    config = config or ReflectorConfig(port=0)
    store = open_store(config.store)
    try:
        async with tasks.open_nursery() as nursery:
            reflector = await nursery.start(serve_reflector, config, store)
            yield reflector
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def serve_reflector(
    config: ReflectorConfig,
    store: Store,
    *,
    task_status: trio.TaskStatus[Reflector] = trio.TASK_STATUS_IGNORED,
) -> None:
    await Reflector(config, store).serve(task_status=task_status)
