"""Snapshots and digests: whom the reflector asks, and which snapshot it keeps.

Part of the relay core (sans-IO). Every ``snapshot_every`` events the reflector asks one
connection of a session for a snapshot of the latest event, and a connection of another
identity for a digest of the same event. A snapshot whose digest is not the digest of its
state as received (``state_digest``) is refused. Otherwise it is the session's candidate,
kept (in memory for joiners, and in the store) only once the digest asked of the other
identity is the same; the two may come in either order. A digest that differs is a
divergence, and the candidate is dropped. Until a snapshot is agreed, the session keeps
its events since the latest agreed one: its tail, bounded by ``max_tail`` and
``max_tail_bytes``.

So one identity alone cannot choose the state that later joiners restore; two identities
that agree can (docs/security.md). A session whose members are all of one identity is
asked no snapshot: none could be agreed.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from million.relay.checks import check_json
from million.relay.sessions import Candidate, RelaySession, SnapshotAsk
from million.wire import codec
from million.wire.protocol import (
    Digest,
    DigestRequest,
    ErrorCode,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    state_digest,
)

if TYPE_CHECKING:
    from million.relay.stream import Peer, Streams

__all__ = ["Snapshots"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Hashable)


class Snapshots(Generic[C]):
    """The snapshot and digest requests of the sessions' streams, and their answers."""

    def __init__(self, streams: Streams[C]) -> None:
        self.streams = streams  # its output, and the sessions and connections it knows
        self.config = streams.config
        self.peers = streams.peers

    def due(self, session: RelaySession[C]) -> bool:
        """Whether to ask now: ``snapshot_every`` events since the latest snapshot kept and
        since the latest request that came to nothing, and no request in progress."""
        every = self.config.snapshot_every
        return session.seq - max(session.snapshot_seq, session.failed_seq) >= every and self.may_ask(session)

    def may_ask(self, session: RelaySession[C]) -> bool:
        """No snapshot asked and none awaiting agreement, or the latest asked a whole
        interval ago (unanswered or unagreed): ask again."""
        pending = session.asked or session.candidate
        return pending is None or session.seq - pending.seq >= self.config.snapshot_every

    def ask(self, session: RelaySession[C], candidates: tuple[C, ...]) -> None:
        """Ask one of ``candidates`` (the one at ``seq`` modulo their number) for a snapshot
        of the session's latest event, and the next one of another identity for a digest
        of it. If they are all of one identity, nothing is asked (no snapshot could be
        agreed), and nothing is tried again for ``snapshot_every`` events."""
        count = len(candidates)
        if not count:
            return
        peers = self.peers
        first = session.seq % count
        conn = candidates[first]
        identity = peers[conn].identity
        for step in range(1, count):
            other = candidates[(first + step) % count]
            if peers[other].identity != identity:
                break
        else:
            session.failed_seq = session.seq
            return
        session.asked = SnapshotAsk(conn, session.seq, session.time)
        session.digest_asked = (other, session.seq)
        peers[conn].asked.add(session.name)
        self.streams.emit((conn,), codec.encode(SnapshotRequest(session.name, session.seq)))
        self.streams.emit((other,), codec.encode(DigestRequest(session.name, session.seq)))

    def leaving(self, session: RelaySession[C], conn: C) -> None:
        """``conn`` left ``session`` with a ``leave``, before it is sent its ``left``. If
        that leaves fewer than two identities present, at least ``leave_snapshot_after``
        events follow the latest snapshot (and the latest request that came to nothing)
        and nothing is in progress, the leaver (which still holds its replica) and those
        present are asked: a snapshot of one and a digest of another identity. The last
        leaver alone is asked nothing: no other identity could agree its snapshot, and
        the session keeps its events (see ``ask``)."""
        behind = session.seq - max(session.snapshot_seq, session.failed_seq)
        if (
            conn in session.conns
            or behind < self.config.leave_snapshot_after
            or not self.may_ask(session)
            or not self._one_identity(session.recipients)
        ):
            return
        self.ask(session, (*session.recipients, conn))

    def _one_identity(self, conns: tuple[C, ...]) -> bool:
        """Whether ``conns`` are of one identity at most (the scan stops at a second)."""
        if not conns:
            return True
        identity = self.peers[conns[0]].identity
        return all(self.peers[conn].identity == identity for conn in conns[1:])

    def snapshot(self, conn: C, message: Snapshot, now: float) -> None:
        """A snapshot answered: refused unless a client could encode its state again and
        its digest is its state's, then the session's candidate until the digest of
        another identity agrees or differs."""
        session = self.streams.table.in_memory.get(message.session)
        if session is None and message.session in self.peers[conn].asked:
            self.peers[conn].asked.discard(message.session)
            return  # asked before the session left memory: too late to be used
        check_json(message.state, None, "a snapshot's state")
        asked = session.asked if session is not None else None
        if session is not None and asked is not None and message.seq < asked.seq and conn in session.conns:
            return  # the answer to a request made again since: too late to be used
        if session is None or asked is None or asked.conn != conn or asked.seq != message.seq:
            raise ProtocolError(ErrorCode.UNEXPECTED, "a snapshot nobody asked for")
        session.asked = None
        peer = self.peers[conn]
        peer.asked.discard(session.name)
        if state_digest(message.state) != message.digest:
            session.failed_seq = message.seq
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"the snapshot of event {message.seq} does not carry the digest of its state",
            )
        candidate = Candidate(message.seq, asked.time, message.state, message.digest, peer.identity)
        self._settled(session, session.offer(candidate), message.seq, message.digest)

    def digest(self, conn: C, message: Digest, now: float) -> None:
        """A digest answered: it agrees the candidate (or waits for it) if it is the one
        asked of ``conn``; any other is nobody's business."""
        session = self.streams.table.in_memory.get(message.session)
        asked = session is not None and session.digest_asked == (conn, message.seq)
        if session is None or not (asked or conn in session.conns):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not in session {message.session!r}")
        if asked:  # the leaver asked on its way out is no longer in the session
            session.digest_asked = None
            identity = self.peers[conn].identity
            self._settled(
                session, session.vouch(message.seq, message.digest, identity), message.seq, message.digest
            )

    def forget(self, conn: C, peer: Peer[C]) -> None:
        """``conn`` is gone: the snapshots asked of it will never come."""
        for name in peer.asked:
            session = self.streams.table.in_memory.get(name)
            if session is not None and session.asked is not None and session.asked.conn == conn:
                session.asked = None
                self.streams.output.emptied.append(name)

    def _settled(self, session: RelaySession[C], kept: bool | None, seq: int, digest: str) -> None:
        """What follows an agreement (``kept``), a divergence (not ``kept``), or a wait (None)."""
        if kept is None:
            return
        if not kept:
            self.streams.counters["divergences"] += 1
            log.warning("session %s diverged at event %d (digest %s)", session.name, seq, digest[:40])
            return
        state, kept_digest = session.snapshot_state, session.snapshot_digest
        assert state is not None and kept_digest is not None  # just kept
        output = self.streams.output
        output.batch.snapshots.append(
            (session.name, session.snapshot_seq, session.snapshot_time, state, kept_digest)
        )
        if not session.conns:
            output.emptied.append(session.name)
        elif self.due(session):
            self.ask(session, session.recipients)
