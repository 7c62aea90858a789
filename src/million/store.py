"""Persistence of sessions: creation record, latest snapshot and the events after it.

One SQLite file in WAL mode; ``:memory:`` keeps everything in the process (tests).
The reflector hands each batch of changes to ``commit`` in one transaction (group
commit) before it relays them, so a reflector killed at any moment restarts with
every event it ever relayed. Calls run in a worker thread, off the event loop.
"""

from __future__ import annotations

import sqlite3

import attrs
import trio

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    options BLOB NOT NULL,
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    snapshot_time INTEGER NOT NULL DEFAULT 0,
    snapshot_state BLOB,
    snapshot_digest TEXT,
    present BLOB NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS events (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (session, seq)
) WITHOUT ROWID;
"""


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
    present: bytes
    events: list[bytes]


@attrs.define
class Batch:
    """The changes of one group commit, applied in the order of the fields."""

    created: list[tuple[str, str, bytes]] = attrs.Factory(list)
    events: list[tuple[str, int, bytes]] = attrs.Factory(list)
    snapshots: list[tuple[str, int, int, bytes, str]] = attrs.Factory(list)
    presence: dict[str, bytes] = attrs.Factory(dict)  # the views present, as a JSON list

    def __bool__(self) -> bool:
        return bool(self.created or self.events or self.snapshots or self.presence)


class Store:
    """A SQLite store. Use ``open_store``; every method is safe to await from one task at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = trio.Lock()

    async def commit(self, batch: Batch) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._commit, batch)

    async def load(self, name: str) -> StoredSession | None:
        async with self._lock:
            return await trio.to_thread.run_sync(self._load, name)

    async def names(self) -> list[str]:
        async with self._lock:
            return await trio.to_thread.run_sync(self._names)

    def close(self) -> None:
        self._db.close()

    def _commit(self, batch: Batch) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            if batch.created:
                db.executemany(
                    "INSERT OR IGNORE INTO sessions (name, model, options) VALUES (?, ?, ?)",
                    batch.created,
                )
            if batch.events:
                db.executemany(
                    "INSERT OR REPLACE INTO events (session, seq, body) VALUES (?, ?, ?)",
                    batch.events,
                )
            for name, seq, time, state, digest in batch.snapshots:
                db.execute(
                    "UPDATE sessions SET snapshot_seq = ?, snapshot_time = ?, snapshot_state = ?,"
                    " snapshot_digest = ? WHERE name = ? AND snapshot_seq < ?",
                    (seq, time, state, digest, name, seq),
                )
                db.execute("DELETE FROM events WHERE session = ? AND seq <= ?", (name, seq))
            if batch.presence:
                db.executemany(
                    "UPDATE sessions SET present = ? WHERE name = ?",
                    [(present, name) for name, present in batch.presence.items()],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _load(self, name: str) -> StoredSession | None:
        row = self._db.execute(
            "SELECT model, options, snapshot_seq, snapshot_time, snapshot_state,"
            " snapshot_digest, present FROM sessions WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        events = [
            body
            for (body,) in self._db.execute("SELECT body FROM events WHERE session = ? ORDER BY seq", (name,))
        ]
        return StoredSession(name, *row, events=events)

    def _names(self) -> list[str]:
        return [name for (name,) in self._db.execute("SELECT name FROM sessions ORDER BY name")]


def open_store(path: str) -> Store:
    """Open (creating if needed) the store at ``path``; ``:memory:`` for a throwaway one."""
    return Store(path)
