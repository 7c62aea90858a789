"""The relay core: every rule of the reflector, with no I/O, no trio and no clock.

``RelayCore`` takes what a connection sent (``hello``, then ``receive`` for each decoded
message), the connection's end (``drop``) and the passing of time (``tick``), each with
``now``. It answers by appending to its output: the encoded messages to send and to
whom, the changes to store, and the sessions that may leave memory once those changes
are stored. The caller (``million.relay.server``) takes the output (``take``), commits
its batch to the store, and only then sends its messages: nothing is relayed that a
restart could lose. Each connection receives its messages in the order they were caused.

Nothing a client sends can break a session: what cannot be stamped, stored and relayed
is refused before it gets a sequence number, with an error to its sender only, and
every limit of ``ReflectorConfig`` is enforced here (``docs/security.md``).

A connection is any hashable handle the caller chooses; the core never looks inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

import attrs

from million.relay.checks import REPLY_BYTES_PER_UNIT, cost
from million.relay.config import ReflectorConfig, ReflectorStatistics
from million.relay.gate import Gate, Refused, Role
from million.relay.records import Batch, StoredSession
from million.relay.sessions import RelaySession, SessionTable
from million.relay.stream import Output, Peer, Streams
from million.relay.summaries import Summaries
from million.wire import codec
from million.wire.protocol import (
    PROTOCOL_VERSION,
    Digest,
    Error,
    ErrorCode,
    Join,
    Leave,
    Left,
    Ping,
    Pong,
    ProtocolError,
    Publish,
    Snapshot,
    Status,
    StatusRequest,
    Summarize,
    Welcome,
)

__all__ = ["Output", "Peer", "RelayCore"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Hashable)
STATUS_SESSIONS = 1000  # occupied sessions a status describes, the first by name
READ = (Ping, StatusRequest)  # what a connection with the view token may send
MAX_LABEL = 100  # characters of a client label that names its identity without --tokens
COUNTERS = (
    "events",
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "divergences",
    "errors",
    "throttled",
)


class RelayCore(Generic[C]):
    """Sessions, their ordered streams, presence, snapshots, summaries and limits."""

    def __init__(
        self, config: ReflectorConfig, *, stored: Iterable[str], now: float, version: str, store_path: str
    ) -> None:
        self.config = config
        self.version = version  # of million, announced in the welcome
        self.store_path = store_path
        self.started_at = now
        self.table: SessionTable[C] = SessionTable(config.idle_sessions)
        self.table.stored.update(stored)
        self.peers: dict[C, Peer[C]] = {}
        self.gate = Gate(config)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.refusals: dict[str, int] = {}  # refusals by limit
        self._summaries = Summaries(config)
        self.streams: Streams[C] = Streams(config, self.table, self.peers, self.counters)
        self.snapshots = self.streams.snapshots
        self._handlers: dict[type, Callable[[C, Any, float], None]] = {
            Join: self.streams.join,
            Publish: self._on_publish,
            Leave: self._on_leave,
            Snapshot: self.snapshots.snapshot,
            Digest: self.snapshots.digest,
            Ping: self._on_ping,
            StatusRequest: self._on_status,
            Summarize: self._on_summary,
        }

    # --- what the caller feeds in -------------------------------------------------------

    def open(self, ip: str) -> None:
        """A connection from ``ip`` begins; ``Refused`` if a connection limit is reached.
        Every ``open`` that passes is ended by ``drop`` (after ``hello`` or not)."""
        try:
            self.gate.open(ip)
        except Refused as exc:
            self.refuse(exc.limit)
            raise

    def hello(self, conn: C, messages: list[Any], now: float, conn_name: str, ip: str = "") -> bytes:
        """Admit ``conn`` if ``messages`` are a valid hello; the encoded welcome to send it.

        ``ProtocolError`` says why it is refused.
        """
        try:
            hello, role, identity = self.gate.hello(messages, ip, now)
        except ProtocolError as exc:
            if isinstance(exc, Refused):
                self.refuse(exc.limit)
            elif exc.code == ErrorCode.UNAUTHORIZED:
                self.refuse("token")
            raise
        self.gate.admitted()
        if not identity:  # without identities, each client (by its label) is one
            label = hello.client if 0 < len(hello.client) <= MAX_LABEL else conn_name
            identity = f"admin:{label}"
        peer: Peer[C] = Peer(
            hello.client, ip, role, identity, allowance=self.config.max_messages_per_s, refilled=now
        )
        self.peers[conn] = peer
        welcome = Welcome(PROTOCOL_VERSION, conn_name, f"million {self.version}", self.config.max_frame)
        return codec.encode(welcome)

    def refuse(self, limit: str) -> None:
        """Count a refusal by ``limit`` (docs/security.md names them)."""
        self.refusals[limit] = self.refusals.get(limit, 0) + 1

    def needs_load(self, message: Any) -> str | None:
        """The stored session that must be loaded (``revive``) before ``message`` is received."""
        if type(message) is Join and message.session not in self.sessions and message.session in self.stored:
            return message.session
        return None

    def revive(self, stored: StoredSession, now: float) -> None:
        """Bring a session back from the store (if it is not in memory already)."""
        if stored.name not in self.sessions:
            self.streams.revive(stored, now)

    def receive(self, conn: C, message: Any, now: float) -> None:
        """Handle one message of an admitted connection; a broken rule answers it with an error."""
        try:
            handler = self._handlers.get(type(message))
            if handler is None:
                raise ProtocolError(ErrorCode.UNEXPECTED, f"unexpected {type(message).__name__.lower()}")
            if self.peers[conn].role is Role.VIEWER and type(message) not in READ:
                raise ProtocolError(ErrorCode.READ_ONLY, "this connection's token only reads")
            handler(conn, message, now)
        except ProtocolError as exc:
            if isinstance(exc, Refused):
                self.refuse(exc.limit)
            self.error(conn, exc, getattr(message, "session", None), getattr(message, "ref", None))

    def error(self, conn: C, exc: ProtocolError, session: str | None = None, ref: int | None = None) -> None:
        """Tell ``conn`` what it did wrong."""
        self.counters["errors"] += 1
        log.info("connection %s: %s: %s", conn, exc.code, exc.message)
        self.streams.emit((conn,), codec.encode(Error(exc.code, exc.message, session, ref)))

    def charge(self, conn: C, messages: list[Any], now: float) -> float:
        """Seconds ``conn`` must wait before its ``messages`` are handled: each costs what it
        makes the reflector do (``checks.cost``), from a bucket of one second's allowance."""
        units = len(messages)
        for message in messages:
            if type(message) is not Publish:
                units += cost(message, len(self.table.occupied)) - 1
        pause = self.peers[conn].charge(self.config.max_messages_per_s, units, now)
        if pause:
            self.counters["throttled"] += 1
            self.refuse("rate")
        return pause

    def drop(self, conn: C, now: float, ip: str = "") -> None:
        """``conn`` (opened from ``ip``) ended: every membership it held exits, every
        snapshot asked of it is off."""
        peer = self.peers.get(conn)
        if peer is None:
            self.gate.close(ip, admitted=False)
            return
        self.gate.close(peer.ip, admitted=True)
        for (_, view), session in list(peer.memberships.items()):
            self.streams.exit(conn, session, view, now)
        del self.peers[conn]
        self.snapshots.forget(conn, peer)

    def tick(self, now: float) -> None:
        """A time-only tick for every occupied session silent for a tick interval."""
        self.streams.tick(now)

    @property
    def sessions(self) -> dict[str, RelaySession[C]]:
        """The sessions in memory, by name."""
        return self.table.in_memory

    @property
    def stored(self) -> set[str]:
        """The names of the sessions in the store."""
        return self.table.stored

    def take(self) -> Output[C]:
        """Everything decided since the last ``take``: store its batch, then send."""
        output, self.streams.output = self.streams.output, Output()
        return output

    def stored_batch(self, emptied: list[str]) -> None:
        """The batch taken with ``emptied`` is stored: those sessions may go idle, and the
        oldest idle ones beyond the limit leave memory."""
        self.table.settle(emptied)

    def store_failed(self, batch: Batch, reason: str) -> set[C]:
        """``batch`` could not be stored, and its messages are not sent (the caller drops
        the connections they were for): the sessions it touched take no more events until
        they leave memory and come back from the store as it is."""
        names = {name for name, *_ in batch.created} | {name for name, *_ in batch.events}
        names |= {name for name, *_ in batch.snapshots}
        members: set[C] = set()
        for name in names:
            session = self.sessions.get(name)
            if session is not None:
                session.broken = reason
                members.update(session.conns)
        log.error("the store failed (%s): %d sessions take no more events", reason, len(names))
        return members

    # --- what the caller may read ---------------------------------------------------------

    def statistics(self) -> ReflectorStatistics:
        return ReflectorStatistics(
            connections=len(self.peers),
            sessions=len(self.table.occupied),
            idle=len(self.table.idle),
            refused=dict(self.refusals),
            **self.counters,
        )

    def describe(self, now: float) -> dict[str, Any]:
        """What ``million status`` shows: the reflector and its occupied sessions."""
        occupied = sorted(self.table.occupied)[:STATUS_SESSIONS]
        return {
            "version": self.version,
            "uptime_s": round(now - self.started_at, 3),
            "store": self.store_path,
            "statistics": attrs.asdict(self.statistics()),
            "sessions": [self.table.occupied[name].describe(now) for name in occupied],
            "sessions_total": len(self.table.occupied),
        }

    def summary_names(self) -> list[str]:
        """The sessions with a summary, least recently summarized first."""
        return self._summaries.names()

    def summaries(self, names: Iterable[str]) -> dict[str, bytes]:
        """The latest summaries (encoded JSON, as received) of the sessions ``names`` that have one."""
        return self._summaries.get(names)

    # --- the ordered stream ---------------------------------------------------------------

    def _member(self, conn: C, name: str, view: str) -> RelaySession[C]:
        session = self.peers[conn].memberships.get((name, view))
        if session is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"view {view!r} has not joined session {name!r}")
        return session

    # --- messages -------------------------------------------------------------------------

    def _on_publish(self, conn: C, message: Publish, now: float) -> None:
        peer = self.peers[conn]
        session = peer.memberships.get((message.session, message.view))
        if session is None:
            session = self._member(conn, message.session, message.view)  # raises
        config = self.config
        if (
            session.broken
            or len(session.tail) >= config.max_tail
            or session.tail_bytes >= config.max_tail_bytes
        ):
            self.streams.check_publish(session)  # says why not
        self.streams.append(
            session, message.view, message.topic, message.data, session.recipients, now, peer.identity
        )

    def _on_leave(self, conn: C, message: Leave, now: float) -> None:
        session = self._member(conn, message.session, message.view)
        self.streams.exit(conn, session, message.view, now)
        self.snapshots.leaving(session, conn)  # asked before its left, while it holds its replica
        self.streams.emit((conn,), codec.encode(Left(message.session, message.view)))

    def _on_summary(self, conn: C, message: Summarize, now: float) -> None:
        session = self._member(conn, message.session, message.view)
        self._summaries.receive(message, session.seq)

    def _on_ping(self, conn: C, message: Ping, now: float) -> None:
        self.streams.emit((conn,), codec.encode(Pong(message.ref)))

    def _on_status(self, conn: C, message: StatusRequest, now: float) -> None:
        info = self.describe(now)
        summaries = self._summaries.asked(message.summaries[:1000])
        info["summaries"] = {name: codec.fragment(raw) for name, raw in summaries.items()}
        reply = codec.encode(Status(message.ref, info))
        self.peers[conn].allowance -= len(reply) // REPLY_BYTES_PER_UNIT  # its size is its cost
        self.streams.emit((conn,), reply)
