"""The relay core: every rule of the reflector, with no I/O, no trio and no clock.

``RelayCore`` takes what a connection sent (``hello``, then ``receive`` for each decoded
message), the connection's end (``drop``) and the passing of time (``tick``), each with
``now``. It answers by appending to its output: the encoded messages to send and to
whom, the changes to store, and the sessions that may leave memory once those changes
are stored. The caller (``million.relay.server``) takes the output (``take``), commits
its batch to the store, and only then sends its messages: nothing is relayed that a
restart could lose. Each connection receives its messages in the order they were caused.

A connection is any hashable handle the caller chooses; the core never looks inside it.
"""

from __future__ import annotations

import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

import attrs

from million.relay.config import ReflectorConfig, ReflectorStatistics
from million.relay.records import Batch, StoredSession
from million.relay.sessions import Phase, RelaySession, SnapshotAsk
from million.wire import codec
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

__all__ = ["Output", "Peer", "RelayCore"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Hashable)


@attrs.define(eq=False)
class Peer(Generic[C]):
    """What the core knows of one connection."""

    label: str
    memberships: dict[tuple[str, str], RelaySession[C]] = attrs.Factory(dict)  # (session, view)
    asked: set[str] = attrs.Factory(set)  # sessions it was asked a snapshot of
    allowance: float = 0.0  # messages it may still send now (token bucket)
    refilled: float = 0.0


@attrs.define
class Output(Generic[C]):
    """What the core decided since the last ``take``."""

    sends: list[tuple[tuple[C, ...], bytes]] = attrs.Factory(list)  # (recipients, encoded message)
    batch: Batch = attrs.Factory(Batch)  # to store before any of ``sends`` goes out
    emptied: list[str] = attrs.Factory(list)  # sessions that may go idle once ``batch`` is stored

    def __bool__(self) -> bool:
        return bool(self.sends or self.batch or self.emptied)


class RelayCore(Generic[C]):
    """Sessions, their ordered streams, presence, snapshots, summaries and limits."""

    def __init__(
        self, config: ReflectorConfig, *, stored: Iterable[str], now: float, version: str, store_path: str
    ) -> None:
        self.config = config
        self.version = version  # of million, announced in the welcome
        self.store_path = store_path
        self.started_at = now
        self.stored = set(stored)  # names of the sessions in the store
        self.sessions: dict[str, RelaySession[C]] = {}
        self.peers: dict[C, Peer[C]] = {}
        self.counters = dict.fromkeys(attrs.fields_dict(ReflectorStatistics), 0)
        self._occupied: dict[str, RelaySession[C]] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._summaries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # name -> (seq, summary)
        self._output: Output[C] = Output()
        self._handlers: dict[type, Callable[[C, Any, float], None]] = {
            Join: self._on_join,
            Publish: self._on_publish,
            Leave: self._on_leave,
            Snapshot: self._on_snapshot,
            Digest: self._on_digest,
            Ping: self._on_ping,
            StatusRequest: self._on_status,
            Summarize: self._on_summary,
        }

    # --- what the caller feeds in -------------------------------------------------------

    def hello(self, conn: C, messages: list[Any], now: float, conn_name: str) -> bytes:
        """Admit ``conn`` if ``messages`` are a valid hello; the encoded welcome to send it.

        ``ProtocolError`` says why it is refused.
        """
        hello = messages[0] if len(messages) == 1 else None
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.UNEXPECTED, "the first message must be a hello")
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.VERSION,
                f"this reflector speaks protocol version {PROTOCOL_VERSION}, not {hello.version}",
            )
        token = self.config.token
        if token is not None and not hmac.compare_digest((hello.token or "").encode(), token.encode()):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong token")
        self.peers[conn] = Peer(hello.client, allowance=self.config.max_messages_per_s, refilled=now)
        welcome = Welcome(PROTOCOL_VERSION, conn_name, f"million {self.version}", self.config.max_frame)
        return codec.encode(welcome)

    def needs_load(self, message: Any) -> str | None:
        """The stored session that must be loaded (``revive``) before ``message`` is received."""
        if type(message) is Join and message.session not in self.sessions and message.session in self.stored:
            return message.session
        return None

    def revive(self, stored: StoredSession, now: float) -> None:
        """Bring a session back from the store (if it is not in memory already)."""
        if stored.name in self.sessions:
            return
        session: RelaySession[C] = RelaySession(
            stored.name,
            stored.model,
            stored.options,
            seq=stored.snapshot_seq + len(stored.events),
            time=codec.loads(stored.events[-1])["time"] if stored.events else stored.snapshot_time,
            snapshot_seq=stored.snapshot_seq,
            snapshot_time=stored.snapshot_time,
            snapshot_state=stored.snapshot_state,
            snapshot_digest=stored.snapshot_digest,
            tail=list(stored.events),
        )
        self.sessions[stored.name] = session
        present = codec.loads(stored.present)
        for view in present:  # present when the reflector last stopped without a goodbye: gone now
            self._append(session, view, VIEW_EXIT, view, (), now)
        if present:
            self._output.batch.presence[stored.name] = b"[]"
        self._output.emptied.append(stored.name)

    def receive(self, conn: C, message: Any, now: float) -> None:
        """Handle one message of an admitted connection; a broken rule answers it with an error."""
        try:
            handler = self._handlers.get(type(message))
            if handler is None:
                raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected {type(message).__name__.lower()}")
            handler(conn, message, now)
        except ProtocolError as exc:
            self.error(conn, exc, getattr(message, "session", None), getattr(message, "ref", None))

    def error(self, conn: C, exc: ProtocolError, session: str | None = None, ref: int | None = None) -> None:
        """Tell ``conn`` what it did wrong."""
        self.counters["errors"] += 1
        log.info("connection %s: %s: %s", conn, exc.code, exc.message)
        self._emit((conn,), codec.encode(Error(exc.code, exc.message, session, ref)))

    def charge(self, conn: C, messages: int, now: float) -> float:
        """Seconds ``conn`` must wait before its ``messages`` are handled (a token bucket
        holding one second's allowance)."""
        peer = self.peers[conn]
        rate = self.config.max_messages_per_s
        peer.allowance = min(rate, peer.allowance + (now - peer.refilled) * rate) - messages
        peer.refilled = now
        if peer.allowance >= 0:
            return 0.0
        self.counters["throttled"] += 1
        return -peer.allowance / rate

    def drop(self, conn: C, now: float) -> None:
        """``conn`` ended: every membership it held exits, every snapshot asked of it is off."""
        peer = self.peers.pop(conn, None)
        if peer is None:
            return
        for (_, view), session in list(peer.memberships.items()):
            self._remove(conn, peer, session, view, now)
        for name in peer.asked:
            session = self.sessions.get(name)
            if session is not None and session.asked is not None and session.asked.conn == conn:
                session.asked = None
                self._output.emptied.append(name)

    def tick(self, now: float) -> None:
        """A time-only tick for every occupied session silent for a tick interval."""
        interval = self.config.tick_ms / 1000
        for session in self._occupied.values():
            if now - session.last_sent >= interval:
                session.time = session.clock(now)
                session.last_sent = now
                self._emit(session.recipients, codec.encode(Tick(session.name, session.time)))

    def take(self) -> Output[C]:
        """Everything decided since the last ``take``: store its batch, then send."""
        output, self._output = self._output, Output()
        return output

    def stored_batch(self, emptied: list[str]) -> None:
        """The batch taken with ``emptied`` is stored: those sessions may go idle, and the
        oldest idle ones beyond the limit leave memory."""
        for name in emptied:
            session = self.sessions.get(name)
            if session is not None and not session.pinned:
                session.phase = Phase.IDLE
                self._idle[name] = None
                self._idle.move_to_end(name)
        while len(self._idle) > self.config.idle_sessions:
            name, _ = self._idle.popitem(last=False)
            session = self.sessions.get(name)
            if session is not None and session.phase is Phase.IDLE:
                del self.sessions[name]

    # --- what the caller may read ---------------------------------------------------------

    def statistics(self) -> ReflectorStatistics:
        counters = dict(
            self.counters, connections=len(self.peers), sessions=len(self._occupied), idle=len(self._idle)
        )
        return ReflectorStatistics(**counters)

    def describe(self, now: float) -> dict[str, Any]:
        """What ``million status`` shows: the reflector and its occupied sessions."""
        return {
            "version": self.version,
            "uptime_s": round(now - self.started_at, 3),
            "store": self.store_path,
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

    def summary_names(self) -> list[str]:
        """The sessions with a summary, least recently summarized first."""
        return list(self._summaries)

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]:
        """The latest summaries (encoded JSON, as received) of the sessions ``names`` that have one."""
        kept = self._summaries
        return {name: kept[name][1] for name in names if name in kept}

    # --- the ordered stream ---------------------------------------------------------------

    def _emit(self, recipients: tuple[C, ...], data: bytes) -> None:
        self._output.sends.append((recipients, data))

    def _append(
        self,
        session: RelaySession[C],
        view: str,
        topic: str,
        data: Any,
        recipients: tuple[C, ...],
        now: float,
    ) -> None:
        raw = session.stamp(view, topic, data, now)
        self._output.batch.events.append((session.name, session.seq, raw))
        self._emit(recipients, raw)
        self.counters["events"] += 1
        if session.seq - session.snapshot_seq >= self.config.snapshot_every and self._may_ask(session):
            self._ask_snapshot(session, session.recipients)

    def _may_ask(self, session: RelaySession[C]) -> bool:
        """No request outstanding, or one left unanswered for a whole interval: ask again."""
        asked = session.asked
        return asked is None or session.seq - asked.seq >= self.config.snapshot_every

    def _ask_snapshot(self, session: RelaySession[C], candidates: tuple[C, ...]) -> None:
        if not candidates:
            return
        conn = candidates[session.seq % len(candidates)]
        session.asked = SnapshotAsk(conn, session.seq, session.time)
        self.peers[conn].asked.add(session.name)
        self._emit((conn,), codec.encode(SnapshotRequest(session.name, session.seq)))
        if len(candidates) > 1:
            other = candidates[(session.seq + 1) % len(candidates)]
            self._emit((other,), codec.encode(DigestRequest(session.name, session.seq)))

    def _member(self, conn: C, name: str, view: str) -> RelaySession[C]:
        session = self.peers[conn].memberships.get((name, view))
        if session is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"view {view!r} has not joined session {name!r}")
        return session

    # --- messages -------------------------------------------------------------------------

    def _on_publish(self, conn: C, message: Publish, now: float) -> None:
        session = self._member(conn, message.session, message.view)
        self._append(session, message.view, message.topic, message.data, session.recipients, now)

    def _on_join(self, conn: C, message: Join, now: float) -> None:
        check_session_name(message.session)
        peer = self.peers[conn]
        if len(peer.memberships) >= self.config.max_sessions_per_connection:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"a connection may hold at most {self.config.max_sessions_per_connection} memberships",
            )
        options = codec.compact(codec.dumps(message.options)) if message.create else None
        session = self._session(message, options)
        if session.model != message.model or (options is not None and options != session.options):
            if not session.conns:
                self._output.emptied.append(session.name)
            raise ProtocolError(
                ErrorCode.MODEL_MISMATCH,
                f"session {session.name!r} was created with model {session.model!r} and other options"
                if session.model == message.model
                else f"session {session.name!r} runs model {session.model!r}, not {message.model!r}",
            )
        view = f"v{session.seq + 1}"
        full = conn not in session.conns
        if session.phase is not Phase.OCCUPIED:
            self._idle.pop(session.name, None)
            self._occupied[session.name] = session
        session.enter(conn, view, now)
        peer.memberships[(session.name, view)] = session
        self._emit((conn,), session.sync(message.ref, view, full, message.have, session.clock(now)))
        self._append(session, view, VIEW_JOIN, view, session.recipients, now)
        self._output.batch.presence[session.name] = codec.dumps(list(session.views))

    def _session(self, message: Join, options: bytes | None) -> RelaySession[C]:
        """The session a join names: in memory (the caller loaded it if it was stored), or new."""
        name = message.session
        session = self.sessions.get(name)
        if session is not None:
            return session
        if options is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"there is no session {name!r}")
        session = RelaySession(name, message.model, options)
        self._output.batch.created.append((name, message.model, session.options))
        self.stored.add(name)
        self.sessions[name] = session
        return session

    def _on_leave(self, conn: C, message: Leave, now: float) -> None:
        session = self._member(conn, message.session, message.view)
        self._remove(conn, self.peers[conn], session, message.view, now)
        behind = session.seq - session.snapshot_seq
        if not session.conns and session.asked is None and behind >= self.config.leave_snapshot_after:
            self._ask_snapshot(session, (conn,))
        self._emit((conn,), codec.encode(Left(message.session, message.view)))

    def _remove(self, conn: C, peer: Peer[C], session: RelaySession[C], view: str, now: float) -> None:
        """End one membership: the exit goes to everyone who saw it, the leaver included."""
        recipients = session.recipients
        del peer.memberships[(session.name, view)]
        session.exit(conn, view)
        self._append(session, view, VIEW_EXIT, view, recipients, now)
        self._output.batch.presence[session.name] = codec.dumps(list(session.views))
        if session.phase is Phase.EMPTY:
            self._occupied.pop(session.name, None)
            self._output.emptied.append(session.name)

    def _on_snapshot(self, conn: C, message: Snapshot, now: float) -> None:
        session = self.sessions.get(message.session)
        asked = session.asked if session is not None else None
        if session is not None and asked is not None and message.seq < asked.seq and conn in session.conns:
            return  # the answer to a request made again since: too late to be used
        if session is None or asked is None or asked.conn != conn or asked.seq != message.seq:
            raise ProtocolError(ErrorCode.UNEXPECTED, "a snapshot nobody asked for")
        session.asked = None
        self.peers[conn].asked.discard(session.name)
        session.keep_snapshot(message.seq, asked.time, message.state, message.digest)
        self._output.batch.snapshots.append(
            (session.name, message.seq, asked.time, message.state, message.digest)
        )
        self._compare(session, message.seq, message.digest)
        if not session.conns:
            self._output.emptied.append(session.name)
        elif session.seq - session.snapshot_seq >= self.config.snapshot_every:
            self._ask_snapshot(session, session.recipients)

    def _on_digest(self, conn: C, message: Digest, now: float) -> None:
        session = self.sessions.get(message.session)
        if session is None or conn not in session.conns:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not in session {message.session!r}")
        self._compare(session, message.seq, message.digest)

    def _compare(self, session: RelaySession[C], seq: int, digest: str) -> None:
        if session.compare(seq, digest):
            self.counters["divergences"] += 1
            log.warning("session %s diverged at event %d (digest %s)", session.name, seq, digest)

    def _on_summary(self, conn: C, message: Summarize, now: float) -> None:
        self._member(conn, message.session, message.view)
        raw = message.data
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

    def _on_ping(self, conn: C, message: Ping, now: float) -> None:
        self._emit((conn,), codec.encode(Pong(message.ref)))

    def _on_status(self, conn: C, message: StatusRequest, now: float) -> None:
        info = self.describe(now)
        summaries = self.summaries(message.summaries[:1000])
        info["summaries"] = {name: codec.fragment(raw) for name, raw in summaries.items()}
        self._emit((conn,), codec.encode(Status(message.ref, info)))


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
