"""The reflector's side of one session: its ordered stream, its members and its snapshot.

Sans-IO: time comes in as ``now`` (seconds on any monotonic clock); nothing here waits.
A connection is whatever hashable handle the caller uses for it.

A snapshot is kept only once agreed: received, it is a ``Candidate`` until the digest of
the same event from another identity is the same (``offer`` and ``vouch``, in either order).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

import attrs

from million.relay.records import StoredSession
from million.wire import codec

C = TypeVar("C", bound=Hashable)
MAX_DIGESTS = 16  # digests waiting for their snapshot, per session
RATE_WINDOW = 10.0  # s: a session's events per second are over the last 10 to 20 s


class Phase(enum.Enum):
    """Where a session is in its life on the reflector."""

    OCCUPIED = "occupied"  # someone is present: its time runs and it ticks
    EMPTY = "empty"  # nobody is present; kept until its events are stored and its snapshot answered
    IDLE = "idle"  # nobody is present and all is stored: dropped first when memory is needed


@attrs.frozen
class SnapshotAsk(Generic[C]):
    """A snapshot request outstanding: who was asked, of which event, at what session time."""

    conn: C
    seq: int
    time: int


@attrs.frozen
class Candidate:
    """A snapshot received with the right digest of its state, not agreed yet."""

    seq: int
    time: int
    state: bytes
    digest: str
    identity: str  # of the connection that sent it


@attrs.define(eq=False)
class RelaySession(Generic[C]):
    """One session's stream: stamped events since the latest agreed snapshot, and who is present."""

    name: str
    model: str
    options: bytes  # the creation record's options, encoded: compared and relayed as they are
    phase: Phase = Phase.EMPTY
    seq: int = 0
    time: int = 0  # session time (ms) of the latest event or tick
    time_base: int = 0  # session time when it was last occupied
    occupied_since: float | None = None
    marks: list[tuple[float, int]] = attrs.Factory(list)  # (time, seq), ``RATE_WINDOW`` apart: the last two
    last_sent: float = 0.0  # when the latest event or tick was stamped
    snapshot_seq: int = 0
    snapshot_time: int = 0
    snapshot_state: bytes | None = None
    snapshot_digest: str | None = None
    tail: list[bytes] = attrs.Factory(list)  # encoded events after the snapshot
    tail_bytes: int = 0
    views: dict[str, C] = attrs.Factory(dict)  # present view -> its connection
    conns: dict[C, int] = attrs.Factory(dict)  # connection -> its views here
    recipients: tuple[C, ...] = ()  # the connections, in the order they came
    asked: SnapshotAsk[C] | None = None
    digest_asked: tuple[C, int] | None = None  # who was asked a digest of which event
    candidate: Candidate | None = None  # the snapshot received, until agreed or dropped
    # seq -> (digest, identity) of an asked digest that came before its snapshot
    digests: dict[int, tuple[str, str]] = attrs.Factory(dict)
    failed_seq: int = 0  # the latest request that came to nothing: none asked, refused or disagreed
    divergences: int = 0
    broken: str = ""  # why the store failed it: then it takes no more events

    def clock(self, now: float) -> int:
        """Session time: only time while someone is present counts."""
        if self.occupied_since is None:
            return self.time
        return max(self.time, self.time_base + int((now - self.occupied_since) * 1000))

    def stamp(self, view: str, topic: str, data: Any, now: float, identity: str = "") -> bytes:
        """The next event of the stream, encoded once and kept in the tail. ``TypeError``,
        and nothing changed, if ``data`` cannot be encoded: seqs stay consecutive."""
        time = self.clock(now)
        raw = codec.encode_event(self.name, self.seq + 1, time, view, topic, data, identity)
        self.seq += 1
        self.time = time
        self.last_sent = now
        self.tail.append(raw)
        self.tail_bytes += len(raw)
        self._mark(now)
        return raw

    def enter(self, conn: C, view: str, now: float) -> None:
        """``view`` of ``conn`` is present from now on."""
        if not self.conns:
            self.time_base = self.time
            self.occupied_since = now
            self.marks = [(now, self.seq)]
            self.phase = Phase.OCCUPIED
        count = self.conns.get(conn, 0)
        self.conns[conn] = count + 1
        if not count:
            self.recipients = (*self.recipients, conn)
        self.views[view] = conn

    def exit(self, conn: C, view: str, now: float) -> None:
        """``view`` of ``conn`` is no longer present; the last one out leaves it empty, its
        time stopped at ``now``."""
        del self.views[view]
        count = self.conns[conn] - 1
        if count:
            self.conns[conn] = count
        else:
            del self.conns[conn]
            self.recipients = tuple(self.conns)
        if not self.conns:
            self.time = self.clock(now)
            self.occupied_since = None
            self.phase = Phase.EMPTY

    def sync(self, ref: int, view: str, full: bool, have: int | None, time: int) -> bytes:
        """The Sync for a join: everything, only the events after ``have``, or nothing
        when the joining connection already holds the session."""
        resume = full and have is not None and self.snapshot_seq <= have <= self.seq
        if resume:
            full = False
        body: dict[str, Any] = {
            "type": "sync",
            "ref": ref,
            "session": self.name,
            "view": view,
            "model": self.model,
            "options": codec.fragment(self.options),
            "time": time,
            "full": full,
        }
        if full:
            if self.snapshot_state is not None:
                body["snapshot"] = {
                    "seq": self.snapshot_seq,
                    "time": self.snapshot_time,
                    "state": codec.fragment(self.snapshot_state),
                    "digest": self.snapshot_digest,
                }
            body["events"] = [codec.fragment(raw) for raw in self.tail]
        elif resume and have is not None:
            body["events"] = [codec.fragment(raw) for raw in self.tail[have - self.snapshot_seq :]]
        return codec.dumps(body)

    def keep_snapshot(self, seq: int, time: int, state: bytes, digest: str) -> None:
        """The snapshot after event ``seq`` replaces the events up to it."""
        self.tail = self.tail[seq - self.snapshot_seq :]
        self.tail_bytes = sum(map(len, self.tail))
        self.snapshot_seq, self.snapshot_time = seq, time
        self.snapshot_state, self.snapshot_digest = state, digest

    def offer(self, candidate: Candidate) -> bool | None:
        """A snapshot received: True if a digest of its event from another identity
        agrees (it is kept), False if that digest differs (it is dropped), None while it
        waits for one (the candidate, replacing any other)."""
        reported = self.digests.pop(candidate.seq, None)
        if reported is None or reported[1] == candidate.identity:
            self.candidate = candidate
            return None
        return self._settle(candidate, reported[0])

    def vouch(self, seq: int, digest: str, identity: str) -> bool | None:
        """A digest of event ``seq`` from ``identity``: True if it agrees the candidate
        of another identity (kept), False if it differs (dropped), None if it waits for
        its snapshot (at most ``MAX_DIGESTS`` wait) or is the candidate's own identity's."""
        candidate = self.candidate
        if candidate is None or candidate.seq != seq:
            if len(self.digests) >= MAX_DIGESTS:
                self.digests.clear()
            self.digests[seq] = (digest, identity)
            return None
        if candidate.identity == identity:
            return None
        return self._settle(candidate, digest)

    def _settle(self, candidate: Candidate, digest: str) -> bool | None:
        self.candidate = None
        if candidate.seq <= self.snapshot_seq:  # not after the snapshot kept: of no use
            return None
        if digest != candidate.digest:
            self.divergences += 1
            self.failed_seq = candidate.seq
            return False
        self.keep_snapshot(candidate.seq, candidate.time, candidate.state, candidate.digest)
        return True

    def events_per_s(self, now: float) -> float | None:
        """Events per second over the last ``RATE_WINDOW`` to twice that, as far back as
        someone has been present (longer if nothing happened since: then fewer per second
        than there were); None over less than a second."""
        if not self.marks:
            return None
        self._mark(now)
        since, seq = self.marks[0]
        return round((self.seq - seq) / (now - since), 1) if now - since >= 1 else None

    def _mark(self, now: float) -> None:
        """A new mark once ``RATE_WINDOW`` has passed since the last: two are kept."""
        if self.marks and now - self.marks[-1][0] >= RATE_WINDOW:
            self.marks = [self.marks[-1], (now, self.seq)]

    def describe(self, now: float) -> dict[str, Any]:
        """The session as ``million status`` shows it."""
        return {
            "name": self.name,
            "model": self.model,
            "participants": len(self.views),
            "connections": len(self.conns),
            "seq": self.seq,
            "time": self.time,
            "events_per_s": self.events_per_s(now),
            "snapshot_seq": self.snapshot_seq,
            "events_since_snapshot": self.seq - self.snapshot_seq,
            "divergences": self.divergences,
        }

    @property
    def pinned(self) -> bool:
        """Whether it must stay in memory: someone is present. A snapshot asked of a
        leaver does not pin it: one that never answers could otherwise keep it forever."""
        return bool(self.conns)


class SessionTable(Generic[C]):
    """The sessions in memory by name, which are occupied and which idle, and the names of
    all sessions in the store."""

    def __init__(self, idle_limit: int) -> None:
        self.idle_limit = idle_limit
        self.in_memory: dict[str, RelaySession[C]] = {}
        self.occupied: OrderedDict[str, RelaySession[C]] = OrderedDict()  # least recently stamped first
        self.idle: OrderedDict[str, None] = OrderedDict()  # oldest first
        self.stored: set[str] = set()

    def add(self, session: RelaySession[C]) -> None:
        """A session created now, or brought back from the store."""
        self.in_memory[session.name] = session
        self.stored.add(session.name)

    def enter(self, session: RelaySession[C], conn: C, view: str, now: float) -> None:
        if session.phase is not Phase.OCCUPIED:
            self.idle.pop(session.name, None)
            self.occupied[session.name] = session
            session.last_sent = now  # its place in ``occupied``
        session.enter(conn, view, now)

    def exit(self, session: RelaySession[C], conn: C, view: str, now: float) -> bool:
        """End a membership; True if that left the session empty."""
        session.exit(conn, view, now)
        if session.phase is Phase.EMPTY:
            self.occupied.pop(session.name, None)
            return True
        return False

    def settle(self, emptied: Iterable[str]) -> None:
        """``emptied`` sessions are stored: those not pinned go idle, and the oldest idle
        ones beyond the limit leave memory."""
        for name in emptied:
            session = self.in_memory.get(name)
            if session is not None and session.broken and not session.conns:
                del self.in_memory[name]  # come back as the store has it
            elif session is not None and not session.pinned:
                session.phase = Phase.IDLE
                self.idle[name] = None
                self.idle.move_to_end(name)
        while len(self.idle) > self.idle_limit:
            name, _ = self.idle.popitem(last=False)
            session = self.in_memory.get(name)
            if session is not None and session.phase is Phase.IDLE:
                del self.in_memory[name]


def revived(stored: StoredSession) -> RelaySession[Any]:
    """A session as the store kept it; nobody is present."""
    return RelaySession(
        stored.name,
        stored.model,
        stored.options,
        seq=codec.loads(stored.events[-1])["seq"] if stored.events else stored.snapshot_seq,
        time=codec.loads(stored.events[-1])["time"] if stored.events else stored.snapshot_time,
        snapshot_seq=stored.snapshot_seq,
        snapshot_time=stored.snapshot_time,
        snapshot_state=stored.snapshot_state,
        snapshot_digest=stored.snapshot_digest,
        tail=list(stored.events),
        tail_bytes=sum(map(len, stored.events)),
    )
