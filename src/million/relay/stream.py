"""The sessions' ordered streams: joins, stamping and relaying events, presence, ticks.

Part of the relay core (sans-IO): ``Streams`` does to sessions what ``RelayCore`` decides
on behalf of connections (and checks a join against its session), and writes what
follows into the shared ``Output``. Its ``snapshots`` ask for snapshots and keep those
agreed (``million.relay.snapshots``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

import attrs

from million.relay.checks import check_options
from million.relay.config import ReflectorConfig
from million.relay.gate import Refused, Role
from million.relay.records import Batch, StoredSession
from million.relay.sessions import Phase, RelaySession, SessionTable, revived
from million.relay.snapshots import Snapshots
from million.wire import codec
from million.wire.protocol import VIEW_EXIT, VIEW_JOIN, ErrorCode, Join, ProtocolError, check_session_name

__all__ = ["Output", "Peer", "Streams"]

C = TypeVar("C", bound=Hashable)


@attrs.define(eq=False)
class Peer(Generic[C]):
    """What the core knows of one connection."""

    label: str
    ip: str = ""
    role: Role = Role.MEMBER
    identity: str = ""  # ``ROLE:NAME``, stamped on every event it causes
    memberships: dict[tuple[str, str], RelaySession[C]] = attrs.Factory(dict)  # (session, view)
    asked: set[str] = attrs.Factory(set)  # sessions it was asked a snapshot of
    allowance: float = 0.0  # messages it may still send now (token bucket)
    refilled: float = 0.0

    def charge(self, rate: int, messages: int, now: float) -> float:
        """Seconds to wait before ``messages`` are handled, at ``rate`` per second (a token
        bucket holding one second's allowance)."""
        self.allowance = min(rate, self.allowance + (now - self.refilled) * rate) - messages
        self.refilled = now
        return -self.allowance / rate if self.allowance < 0 else 0.0


@attrs.define
class Output(Generic[C]):
    """What the core decided since the last ``take``."""

    sends: list[tuple[tuple[C, ...], bytes]] = attrs.Factory(list)  # (recipients, encoded message)
    batch: Batch = attrs.Factory(Batch)  # to store before any of ``sends`` goes out
    emptied: list[str] = attrs.Factory(list)  # sessions that may go idle once ``batch`` is stored

    def __bool__(self) -> bool:
        return bool(self.sends or self.batch or self.emptied)


class Streams(Generic[C]):
    """What happens to sessions' streams: each change is stamped, stored and relayed."""

    def __init__(
        self,
        config: ReflectorConfig,
        table: SessionTable[C],
        peers: dict[C, Peer[C]],
        counters: dict[str, int],
    ) -> None:
        self.config = config
        self.table = table
        self.peers = peers
        self.counters = counters
        self.output: Output[C] = Output()
        self.snapshots: Snapshots[C] = Snapshots(self)

    def emit(self, recipients: tuple[C, ...], data: bytes) -> None:
        self.output.sends.append((recipients, data))

    def append(
        self,
        session: RelaySession[C],
        view: str,
        topic: str,
        data: Any,
        recipients: tuple[C, ...],
        now: float,
        identity: str = "",
    ) -> None:
        """Stamp the next event of ``session`` (published by ``identity``), store it and
        relay it to ``recipients``; ``ProtocolError`` (and nothing changed) if it cannot be
        encoded."""
        try:
            raw = session.stamp(view, topic, data, now, identity)
        except TypeError as exc:  # orjson: nested too deep, or an integer out of range
            raise ProtocolError(ErrorCode.MALFORMED, f"the event cannot be relayed: {exc}") from None
        if session.phase is Phase.OCCUPIED:
            self.table.occupied.move_to_end(session.name)
        output = self.output
        output.batch.events.append((session.name, session.seq, raw))
        output.sends.append((recipients, raw))
        self.counters["events"] += 1
        if session.seq - session.snapshot_seq >= self.config.snapshot_every and self.snapshots.due(session):
            self.snapshots.ask(session, session.recipients)

    def check_publish(self, session: RelaySession[C]) -> None:
        """``ProtocolError`` if ``session`` may take no more events now."""
        if session.broken:
            raise ProtocolError(
                ErrorCode.STORAGE, f"session {session.name!r} takes no events: {session.broken}"
            )
        if len(session.tail) >= self.config.max_tail or session.tail_bytes >= self.config.max_tail_bytes:
            if self.snapshots.may_ask(session):
                self.snapshots.ask(session, session.recipients)
            raise Refused(
                "tail",
                f"session {session.name!r} keeps {len(session.tail)} events ({session.tail_bytes} bytes)"
                " since its latest agreed snapshot: no more until two identities agree one",
            )

    def join(self, conn: C, message: Join, now: float) -> None:
        """A join of ``conn``: checked against the limits and the session's model and
        options (the caller loaded the session if it was stored), then entered."""
        check_session_name(message.session)
        config = self.config
        if len(self.peers[conn].memberships) >= config.max_sessions_per_connection:
            raise Refused(
                "memberships",
                f"a connection may hold at most {config.max_sessions_per_connection} memberships",
            )
        options = check_options(message.options, config.max_depth) if message.create else None
        session = self._session(message, options)
        if session.broken:
            raise ProtocolError(
                ErrorCode.STORAGE, f"session {session.name!r} cannot be joined: {session.broken}"
            )
        if len(session.tail) >= 2 * config.max_tail or session.tail_bytes >= 2 * config.max_tail_bytes:
            self.check_publish(session)  # joins get twice a publish's room: one may answer a snapshot
        if len(session.views) >= config.max_members:
            raise Refused(
                "members", f"session {session.name!r} has its maximum of {config.max_members} members"
            )
        if session.model != message.model or (options is not None and options != session.options):
            if not session.conns:
                self.output.emptied.append(session.name)
            raise ProtocolError(
                ErrorCode.MODEL_MISMATCH,
                f"session {session.name!r} was created with model {session.model!r} and other options"
                if session.model == message.model
                else f"session {session.name!r} runs model {session.model!r}, not {message.model!r}",
            )
        self.enter(conn, session, message.ref, message.have, now)

    def _session(self, message: Join, options: bytes | None) -> RelaySession[C]:
        """The session a join names: in memory (the caller loaded it if it was stored), or new."""
        name = message.session
        session = self.table.in_memory.get(name)
        if session is not None:
            return session
        if options is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"there is no session {name!r}")
        if len(self.table.in_memory) >= self.config.max_open_sessions:
            raise Refused(
                "sessions",
                f"the reflector holds its maximum of {self.config.max_open_sessions} open sessions",
            )
        session = RelaySession(name, message.model, options)
        self.output.batch.created.append((name, message.model, session.options))
        self.table.add(session)
        return session

    def revive(self, stored: StoredSession, now: float) -> None:
        """A session back from the store: the views it lists as present exit first."""
        session: RelaySession[C] = revived(stored)
        self.table.add(session)
        output = self.output
        for view in stored.present:  # present when the reflector last stopped without a goodbye: gone now
            self.append(session, view, VIEW_EXIT, view, (), now)
            output.batch.left.append((stored.name, view))
        output.emptied.append(stored.name)

    def enter(self, conn: C, session: RelaySession[C], ref: int, have: int | None, now: float) -> None:
        """A new membership of ``conn``: its sync, then its ``view-join`` for everyone."""
        view = f"v{session.seq + 1}"
        full = conn not in session.conns
        sync = session.sync(ref, view, full, have, session.clock(now))
        self.table.enter(session, conn, view, now)
        self.peers[conn].memberships[(session.name, view)] = session
        self.emit((conn,), sync)
        self.append(session, view, VIEW_JOIN, view, session.recipients, now, self.peers[conn].identity)
        self.output.batch.joined.append((session.name, view))

    def exit(self, conn: C, session: RelaySession[C], view: str, now: float) -> None:
        """End one membership: the exit goes to everyone who saw it, the leaver included."""
        recipients = session.recipients
        del self.peers[conn].memberships[(session.name, view)]
        emptied = self.table.exit(session, conn, view, now)
        if not session.broken:  # else the store's own stream goes on from where it stopped
            self.append(session, view, VIEW_EXIT, view, recipients, now, self.peers[conn].identity)
            self.output.batch.left.append((session.name, view))
        if emptied:
            self.output.emptied.append(session.name)

    def tick(self, now: float) -> None:
        """A time-only tick for every occupied session silent for a tick interval. The
        occupied sessions are kept least recently stamped first: only the due are visited."""
        interval = self.config.tick_ms / 1000
        occupied = self.table.occupied
        due = []
        for session in occupied.values():
            if now - session.last_sent < interval:
                break
            due.append(session)
        for session in due:
            session.time = session.clock(now)
            session.last_sent = now
            occupied.move_to_end(session.name)
            self.emit(session.recipients, codec.encode_tick(session.name, session.time))
