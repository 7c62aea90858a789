"""Persistence of sessions: creation record, latest snapshot and the events after it.

One SQLite file in WAL mode, fed through a journal; ``:memory:`` keeps everything in
the process (tests).

The reflector hands each batch of changes to ``commit`` before it relays them.
``commit`` appends the batch to the journal (``<store>.journal``: one write, no
thread, no SQLite), so relaying waits microseconds rather than a SQLite commit.
``apply`` moves journaled batches into SQLite, many per transaction, off the event
loop; the reflector runs it in the background (``keep_applying``), and ``load``,
``names`` and ``close`` apply first, so they always see every committed batch. A
reflector killed at any moment leaves its journal behind, and the next ``open_store``
applies it: every event ever relayed is kept. Like SQLite with ``synchronous=NORMAL``,
the journal is not flushed to the disk on every commit: a killed process loses
nothing, a power cut may lose the last moments.
"""

from __future__ import annotations

import pickle
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from time import perf_counter

import trio

from million.relay.records import Batch, StoredSession

VERSION = 2  # PRAGMA user_version of the schema below

# Each kind of change has its own table, so that a frequent small update (presence)
# never rewrites a large row (a snapshot).
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    options BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    state BLOB NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS presence (
    name TEXT PRIMARY KEY,
    views BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (session, seq)
) WITHOUT ROWID;
"""


class StoreError(Exception):
    """The store file cannot be used."""


_RECORD = struct.Struct("<II")  # length and CRC-32 of a pickled batch
APPLY_EVERY = 0.25  # seconds between background applies
APPLY_AT = 1 << 20  # journaled bytes that start an apply at once
MAX_PENDING = 8 << 20  # journaled bytes not yet in SQLite that make ``commit`` wait


class Store:
    """A SQLite store. Use ``open_store``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pending: list[Batch] = []  # in the journal, not yet in SQLite
        self._applying_batches: list[Batch] = []  # in the rotated journal, going into SQLite
        self._pending_bytes = 0
        self.applies = 0  # SQLite transactions so far, and their total duration
        self.apply_seconds = 0.0
        self._due = trio.Event()
        self._journal: Path | None = None if path == ":memory:" else Path(f"{path}.journal")
        self._applying = self._journal.with_suffix(".journal-applying") if self._journal else None
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        try:
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._check_version()
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={VERSION}")
            self._recover()
            self._file = open(self._journal, "ab", buffering=0) if self._journal else None  # noqa: SIM115
        except (sqlite3.Error, OSError, StoreError) as exc:
            self._db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open store {path}: {exc}") from None
        self._lock = trio.Lock()

    async def commit(self, batch: Batch) -> None:
        """Journal ``batch``: once this returns, the batch survives the process."""
        data = pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
        if self._file is not None:
            self._file.write(_RECORD.pack(len(data), zlib.crc32(data)) + data)
        self._pending.append(batch)
        self._pending_bytes += len(data)
        if self._pending_bytes >= APPLY_AT:
            self._due.set()
        if self._pending_bytes >= MAX_PENDING:  # SQLite is behind: wait for it
            await self.apply()
        else:
            await trio.lowlevel.checkpoint()

    async def apply(self) -> None:
        """Move every journaled batch into SQLite.

        If SQLite fails, the batches stay in memory and in their journal, and the next
        apply (or the next start) tries them again first.
        """
        async with self._lock:
            for _ in range(2):  # a batch left by a failed apply, then the journal's
                if not self._applying_batches:
                    if not self._pending:
                        return
                    self._applying_batches, self._pending, self._pending_bytes = self._pending, [], 0
                    self._rotate()
                await trio.to_thread.run_sync(self._apply, self._applying_batches)
                self._applying_batches = []
                if self._applying is not None:
                    self._applying.unlink(missing_ok=True)

    async def keep_applying(self) -> None:
        """Apply in the background until cancelled."""
        while True:
            with trio.move_on_after(APPLY_EVERY):
                await self._due.wait()
            self._due = trio.Event()
            await self.apply()

    async def load(self, name: str) -> StoredSession | None:
        await self.apply()
        async with self._lock:
            return await trio.to_thread.run_sync(self._load, name)

    async def names(self) -> list[str]:
        await self.apply()
        async with self._lock:
            return await trio.to_thread.run_sync(self._names)

    def close(self) -> None:
        """Apply what is journaled and close; if SQLite fails, the journals stay for the
        next start."""
        try:
            for batches, journal in (
                (self._applying_batches, self._applying),
                (self._pending, self._journal),
            ):
                if batches:
                    self._apply(batches)
                if self._file is not None and journal is not None:
                    journal.unlink(missing_ok=True)
            self._applying_batches, self._pending = [], []
        finally:
            if self._file is not None:
                self._file.close()
            self._db.close()

    def _rotate(self) -> None:
        """Start a new journal; the old one is kept until its batches are in SQLite."""
        if self._file is not None and self._journal is not None and self._applying is not None:
            self._file.close()
            self._journal.rename(self._applying)
            self._file = open(self._journal, "ab", buffering=0)  # noqa: SIM115

    def _recover(self) -> None:
        """Apply the journals a killed process left, oldest first."""
        for journal in (self._applying, self._journal):
            if journal is not None and journal.exists():
                self._apply(list(_read_journal(journal)))
                journal.unlink(missing_ok=True)

    @property
    def pending_bytes(self) -> int:
        """Journaled bytes not yet in SQLite."""
        return self._pending_bytes

    def _apply(self, batches: list[Batch]) -> None:
        started = perf_counter()
        db = self._db
        db.execute("BEGIN")
        try:
            for batch in batches:
                self._write(batch)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.applies += 1
        self.apply_seconds += perf_counter() - started

    def _check_version(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        (tables,) = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if tables and version != VERSION:
            raise StoreError(
                f"cannot open store {self.path}: it was written by another version of million"
                f" (store format {version}, this one reads {VERSION}); use a new file"
            )

    def _write(self, batch: Batch) -> None:
        db = self._db
        if batch.created:
            db.executemany(
                "INSERT OR IGNORE INTO sessions (name, model, options) VALUES (?, ?, ?)", batch.created
            )
        if batch.events:
            db.executemany(
                "INSERT OR REPLACE INTO events (session, seq, body) VALUES (?, ?, ?)", batch.events
            )
        for name, seq, time, state, digest in batch.snapshots:
            db.execute(
                "INSERT INTO snapshots (name, seq, time, state, digest) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, time = excluded.time,"
                " state = excluded.state, digest = excluded.digest WHERE excluded.seq > seq",
                (name, seq, time, state, digest),
            )
            db.execute("DELETE FROM events WHERE session = ? AND seq <= ?", (name, seq))
        if batch.presence:
            db.executemany(
                "INSERT OR REPLACE INTO presence (name, views) VALUES (?, ?)", batch.presence.items()
            )

    def _load(self, name: str) -> StoredSession | None:
        row = self._db.execute(
            "SELECT model, options, coalesce(seq, 0), coalesce(time, 0), state, digest,"
            " coalesce(views, '[]') FROM sessions LEFT JOIN snapshots USING (name)"
            " LEFT JOIN presence USING (name) WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        events = [
            body
            for (body,) in self._db.execute("SELECT body FROM events WHERE session = ? ORDER BY seq", (name,))
        ]
        model, options, seq, time, state, digest, present = row
        return StoredSession(name, model, options, seq, time, state, digest, present, events)

    def _names(self) -> list[str]:
        return [name for (name,) in self._db.execute("SELECT name FROM sessions ORDER BY name")]


def _read_journal(path: Path) -> Iterator[Batch]:
    """The batches of a journal; a record cut short by a kill ends it."""
    data = path.read_bytes()
    offset = 0
    while offset + _RECORD.size <= len(data):
        size, crc = _RECORD.unpack_from(data, offset)
        body = data[offset + _RECORD.size : offset + _RECORD.size + size]
        if len(body) < size or zlib.crc32(body) != crc:
            return
        yield pickle.loads(body)
        offset += _RECORD.size + size


def open_store(path: str) -> Store:
    """Open (creating if needed) the store at ``path``; ``:memory:`` for a throwaway one."""
    return Store(path)
