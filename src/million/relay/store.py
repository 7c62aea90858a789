"""Persistence of sessions: creation record, latest snapshot, the events after it, presence.

One SQLite file in WAL mode, fed through a journal; ``:memory:`` keeps everything in
the process (tests).

The reflector hands each batch of changes to ``commit`` before it relays them.
``commit`` appends the batch to the journal (``<store>.journal``: one write, no
SQLite), so relaying waits microseconds rather than a SQLite commit. ``apply`` moves
journaled batches into SQLite, many per transaction, off the event loop; the reflector
runs it in the background (``keep_applying``), and ``load``, ``names`` and ``close``
apply first, so they always see every committed batch. A reflector killed at any moment
leaves its journal behind, and the next ``open_store`` applies it: every event ever
relayed is kept. Applying is idempotent (events are inserted once per seq), so a
journal applied twice changes nothing.

Durability. By default the journal is not flushed to the disk (like SQLite with
``synchronous=NORMAL``): a killed process loses nothing, a power cut may lose the last
moments. With ``fsync=True`` each ``commit`` ends with ``os.fsync`` of the journal (in a
worker thread), a new journal's directory is synced before it is written to, and SQLite
runs with ``synchronous=FULL``: relayed then means on the disk, at the cost of one fsync
and a thread hop per batch (a commit took 0.5 ms instead of 35 us on the development
machine's virtual disk; more on spinning disks or network storage). The reflector
groups the events of one round into one batch, so the cost is per round, not per event.

Failures. ``commit`` raises ``StoreWriteError`` if the batch could not be journaled
whole (full disk, I/O error, no file descriptor): the batch is then not stored and must
not be relayed; the journal is cut back to its last whole record, so the store goes on
once the disk recovers. A failed apply (SQLite busy, full or broken) leaves the batches
in memory and in their journal; ``keep_applying`` logs it (once per kind of error) and
retries with a growing pause, and ``commit`` waits while ``MAX_PENDING`` bytes are not
applied yet.

Exclusive use. The store takes a ``flock`` on ``<store>.lock`` (which holds the pid of
the holder) at open and releases it at ``close``: a second store on the same file, in
this process or another, is refused with ``StoreError``. The lock file stays. The
database, its WAL files, the journals and the lock are created with mode 0600.

The journal's format, how a record is written whole and how a journal left by a kill is
read back are ``million.relay.journal``'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import TypeVar

import trio

from million.relay.journal import MAGIC, Journal, StoreError, StoreWriteError, encode, remove
from million.relay.records import Batch, StoredSession

__all__ = ["MAGIC", "Batch", "Store", "StoreError", "StoreWriteError", "StoredSession", "open_store"]

log = logging.getLogger(__name__)
T = TypeVar("T")

VERSION = 3  # PRAGMA user_version of the schema below

# Each kind of change has its own table, so that a frequent small update (presence)
# never rewrites a large row (a snapshot). Presence has one row per present view, in
# the order they joined (rowid).
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
    name TEXT NOT NULL,
    view TEXT NOT NULL,
    UNIQUE (name, view)
);
CREATE TABLE IF NOT EXISTS events (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (session, seq)
) WITHOUT ROWID;
"""

_PRESENT = "SELECT view FROM presence WHERE name = ? ORDER BY rowid"
_EVENTS = "SELECT body FROM events WHERE session = ? ORDER BY seq"

APPLY_EVERY = 0.25  # seconds between background applies
APPLY_AT = 1 << 20  # journaled bytes that start an apply at once
MAX_PENDING = 8 << 20  # journaled bytes not yet in SQLite that make ``commit`` wait
BUSY_TIMEOUT = 5.0  # seconds SQLite waits for another writer before an apply fails
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # seconds between tries of a failing apply: doubling up to the max


class Store:
    """A SQLite store. Use ``open_store``."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._pending: list[Batch] = []  # in the journal, not yet in SQLite
        self._pending_bytes = 0
        self._applying_batches: list[Batch] = []  # in the rotated journal, going into SQLite
        self._applying_bytes = 0
        self.applies = 0  # SQLite transactions so far, and their total duration
        self.apply_seconds = 0.0
        self._due = trio.Event()
        self._apply_lock = trio.Lock()
        self._journal_lock = trio.Lock()  # the journal file: appends and rotation
        self._failures: set[str] = set()  # kinds of apply failure logged since the last success
        self._retry = RETRY_FIRST
        memory = path == ":memory:"
        self._journal = None if memory else Journal(path, fsync=fsync)
        self._lock_fd = None if memory else _lock(path)
        try:
            self._db = self._connect()
            try:
                if self._journal is not None:  # apply the journals a killed process left
                    self._journal.recover(self._apply)
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            self._unlock()
            raise

    # --- the reflector's side --------------------------------------------------------------

    async def commit(self, batch: Batch) -> None:
        """Journal ``batch``: once this returns, the batch survives the process (and, with
        ``fsync``, a power cut). ``StoreWriteError`` if it could not: then it is not stored."""
        while self.pending_bytes >= MAX_PENDING:  # SQLite is behind: wait for it
            await self._try_apply()
        data = encode(batch)
        async with self._journal_lock:
            if self._journal is not None:
                if self.fsync:
                    await trio.to_thread.run_sync(self._journal.append, data)
                else:
                    self._journal.append(data)
            self._pending.append(batch)
            self._pending_bytes += len(data)
        if self._pending_bytes >= APPLY_AT:
            self._due.set()

    async def apply(self) -> None:
        """Move every journaled batch into SQLite; ``StoreError`` if that fails.

        The batches then stay in memory and in their journal, and the next apply (or the
        next start) tries them again first.
        """
        async with self._apply_lock:
            for _ in range(2):  # a batch left by a failed apply, then the journal's
                if not self._applying_batches:
                    if not self._pending:
                        return
                    async with self._journal_lock:
                        self._rotate()
                await trio.to_thread.run_sync(self._apply, self._applying_batches)
                self._applying_batches, self._applying_bytes = [], 0
                remove(self._journal.applying if self._journal else None)

    async def keep_applying(self) -> None:
        """Apply in the background until cancelled; failures are logged and retried, never raised."""
        while True:
            with trio.move_on_after(APPLY_EVERY):
                await self._due.wait()
            self._due = trio.Event()
            await self._try_apply()

    async def load(self, name: str) -> StoredSession | None:
        """The stored session ``name``; ``StoreError`` if SQLite fails (to apply what is
        journaled, or to read)."""
        return await self._read(partial(self._load, name))

    async def names(self) -> list[str]:
        """The names of the stored sessions; ``StoreError`` as ``load``."""
        return await self._read(self._names)

    def close(self) -> None:
        """Apply what is journaled and close; if SQLite fails, the journals stay for the
        next start (logged). Releases the store's lock."""
        journal = self._journal
        try:
            for batches, path in (
                (self._applying_batches, journal.applying if journal else None),
                (self._pending, journal.path if journal else None),
            ):
                if batches:
                    self._apply(batches)
                remove(path)
            self._applying_batches, self._pending = [], []
        except StoreError as exc:
            log.warning("%s; its journal keeps the batches for the next start", exc)
        finally:
            if journal is not None:
                journal.close()
            self._db.close()
            self._unlock()

    @property
    def pending_bytes(self) -> int:
        """Journaled bytes not yet in SQLite."""
        return self._pending_bytes + self._applying_bytes

    def _rotate(self) -> None:
        """Hand the journaled batches, and their file, to the apply."""
        if self._journal is not None:
            self._journal.rotate()
        self._applying_batches, self._pending = self._pending, []
        self._applying_bytes, self._pending_bytes = self._pending_bytes, 0

    async def _read(self, query: Callable[[], T]) -> T:
        await self.apply()
        async with self._apply_lock:
            try:
                return await trio.to_thread.run_sync(query)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read store {self.path}: {exc}") from None

    # --- applying --------------------------------------------------------------------------

    async def _try_apply(self) -> None:
        """Apply; on failure, log it (once per kind) and pause before the next try."""
        try:
            await self.apply()
        except StoreError as exc:
            if str(exc) not in self._failures:
                self._failures.add(str(exc))
                log.warning("%s; retrying, %d bytes wait in the journal", exc, self.pending_bytes)
            await trio.sleep(self._retry)
            self._retry = min(self._retry * 2, RETRY_MAX)
            return
        if self._failures:
            log.warning("store %s: applying works again", self.path)
            self._failures.clear()
        self._retry = RETRY_FIRST

    def _apply(self, batches: list[Batch]) -> None:
        """Store ``batches`` in one SQLite transaction; ``StoreError`` if it fails."""
        started = perf_counter()
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                for batch in batches:
                    self._store(batch)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back by itself (full disk, I/O error)
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        except Exception as exc:  # SQLite busy, full, broken, or a value it cannot take
            raise StoreError(f"cannot apply to store {self.path}: {exc}") from exc
        self.applies += 1
        self.apply_seconds += perf_counter() - started

    def _store(self, batch: Batch) -> None:
        db = self._db
        if batch.created:
            db.executemany(
                "INSERT OR IGNORE INTO sessions (name, model, options) VALUES (?, ?, ?)", batch.created
            )
        if batch.events:  # the first body stored for a seq is the one relayed
            db.executemany("INSERT OR IGNORE INTO events (session, seq, body) VALUES (?, ?, ?)", batch.events)
        for name, seq, time, state, digest in batch.snapshots:
            db.execute(
                "INSERT INTO snapshots (name, seq, time, state, digest) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, time = excluded.time,"
                " state = excluded.state, digest = excluded.digest WHERE excluded.seq > seq",
                (name, seq, time, state, digest),
            )
            db.execute("DELETE FROM events WHERE session = ? AND seq <= ?", (name, seq))
        if batch.joined:
            db.executemany("INSERT OR IGNORE INTO presence (name, view) VALUES (?, ?)", batch.joined)
        if batch.left:
            db.executemany("DELETE FROM presence WHERE name = ? AND view = ?", batch.left)

    def _load(self, name: str) -> StoredSession | None:
        db = self._db
        row = db.execute(
            "SELECT model, options, coalesce(seq, 0), coalesce(time, 0), state, digest"
            " FROM sessions LEFT JOIN snapshots USING (name) WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        present = [view for (view,) in db.execute(_PRESENT, (name,))]
        events = [body for (body,) in db.execute(_EVENTS, (name,))]
        model, options, seq, time, state, digest = row
        return StoredSession(name, model, options, seq, time, state, digest, present, events)

    def _names(self) -> list[str]:
        return [name for (name,) in self._db.execute("SELECT name FROM sessions ORDER BY name")]

    # --- opening ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """Open the database (created 0600: SQLite gives its WAL files the same mode)."""
        try:
            if self._journal is not None:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        try:
            if self._journal is not None:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            self._check_version(db)
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={VERSION}")
        except (sqlite3.Error, StoreError) as exc:
            db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        return db

    def _check_version(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        (tables,) = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if tables and version != VERSION:
            raise StoreError(
                f"cannot open store {self.path}: it was written by another version of million"
                f" (store format {version}, this one reads {VERSION}); use a new file"
            )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None


def _lock(path: str) -> int:
    """Hold ``<path>.lock`` (with this pid in it); ``StoreError`` if another store holds it."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 20, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise StoreError(f"store {path} is in use by another reflector (pid {holder})") from None
        raise StoreError(f"cannot lock store {path}: {exc}") from None
    with contextlib.suppress(OSError):  # the pid only makes the message above clearer
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_store(path: str, *, fsync: bool = False) -> Store:
    """Open (creating if needed) the store at ``path``; ``:memory:`` for a throwaway one.

    ``StoreError`` if it cannot be used, e.g. another reflector holds it.
    """
    return Store(path, fsync=fsync)
