"""What the relay core hands the store to keep, and what the store gives back.

Plain records: no I/O, no trio.
"""

from __future__ import annotations

import attrs

__all__ = ["Batch", "StoredSession"]


@attrs.frozen
class StoredSession:
    """Everything needed to bring a session back: JSON values are kept encoded."""

    name: str
    model: str
    options: bytes
    snapshot_seq: int
    snapshot_time: int
    snapshot_state: bytes | None
    snapshot_digest: str | None
    present: list[str]  # views present when the store last heard of the session
    events: list[bytes]


@attrs.define
class Batch:
    """The changes of one group commit, applied in the order of the fields."""

    created: list[tuple[str, str, bytes]] = attrs.Factory(list)
    events: list[tuple[str, int, bytes]] = attrs.Factory(list)
    snapshots: list[tuple[str, int, int, bytes, str]] = attrs.Factory(list)
    joined: list[tuple[str, str]] = attrs.Factory(list)  # (session, view) now present
    left: list[tuple[str, str]] = attrs.Factory(list)  # (session, view) no longer present

    def __bool__(self) -> bool:
        return bool(self.created or self.events or self.snapshots or self.joined or self.left)
