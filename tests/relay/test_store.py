"""The store on its own (real SQLite files, no sockets): locking, the journal's format and
its failures, SQLite refusing to apply, file modes, fsync, presence rows."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import resource
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from million.compute.runner import _temporary_store, remove_store
from million.relay import store as store_module
from million.relay.journal import Journal, parse
from million.relay.store import MAGIC, Batch, Store, StoreError, StoreWriteError, open_store

LOGGER = "million.relay.store"
JOURNAL_LOGGER = "million.relay.journal"


def created(seq: int) -> Batch:
    return Batch(created=[("s", "m", b"{}")], events=[("s", seq, b'{"seq":%d}' % seq)])


def event(seq: int, body: bytes | None = None) -> Batch:
    return Batch(events=[("s", seq, body or b'{"seq":%d}' % seq)])


async def events_of(store: Store) -> list[bytes]:
    stored = await store.load("s")
    assert stored is not None
    return stored.events


async def journal_of(tmp_path: Path, *batches: Batch) -> bytes:
    """The journal a store writes for ``batches``."""
    store = open_store(str(tmp_path / "writer.db"))
    for batch in batches:
        await store.commit(batch)
    data = (tmp_path / "writer.db.journal").read_bytes()
    store.close()
    return data


def record(body: bytes) -> bytes:
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


# --- one reflector per store --------------------------------------------------------------


def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    path = str(tmp_path / "store.db")
    first = open_store(path)
    with pytest.raises(StoreError) as refused:
        open_store(path)
    assert str(refused.value) == f"store {path} is in use by another reflector (pid {os.getpid()})"
    first.close()
    open_store(path).close()


def test_a_store_held_by_another_process_is_refused(tmp_path):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    try:
        code = f"from million.relay.store import open_store\nopen_store({path!r})"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        store.close()
    assert result.returncode != 0
    assert f"StoreError: store {path} is in use by another reflector (pid {os.getpid()})" in result.stderr


# --- the journal's format --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda two, three: three[:-3], "a cut record"),
        (lambda two, three: three[:-1] + bytes([three[-1] ^ 1]), "a record with a wrong checksum"),
        (lambda two, three: two + b"\x07\x00", "a cut record header"),
        (lambda two, three: two + record(b"\x93\x01\x02\x03"), "a record that is not a batch"),
    ],
)
async def test_a_journal_with_a_corrupt_tail_is_recovered_up_to_it_and_reported(
    tmp_path, caplog, damage: Callable[[bytes, bytes], bytes], problem: str
):
    two = await journal_of(tmp_path, created(1), event(2))
    damaged = damage(two, await journal_of(tmp_path, created(1), event(2), event(3)))
    journal = tmp_path / "store.db.journal"
    journal.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, JOURNAL_LOGGER):
        store = open_store(str(tmp_path / "store.db"))
    try:
        assert await events_of(store) == [b'{"seq":1}', b'{"seq":2}']
    finally:
        store.close()
    (message,) = [r.getMessage() for r in caplog.records if r.name == JOURNAL_LOGGER]
    dropped = len(damaged) - len(two)
    assert f"journal {journal}: {problem}" in message
    assert f"at offset {len(two)}; dropped its last {dropped} bytes, kept the 2 batches" in message
    assert not journal.exists()


class Planted:
    """Unpickling this creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


async def test_a_journal_of_the_pickle_format_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "owned"
    (tmp_path / "store.db.journal").write_bytes(record(pickle.dumps(Planted(marker))))
    with pytest.raises(StoreError, match=r"store\.db\.journal: it is not a journal this version"):
        open_store(str(tmp_path / "store.db"))
    assert not marker.exists()
    assert (tmp_path / "store.db.journal").exists()  # kept for the operator to look at
    open_store(str(tmp_path / "other.db")).close()  # and the refused store's lock is released
    (tmp_path / "store.db.journal").unlink()
    open_store(str(tmp_path / "store.db")).close()


async def test_a_pickle_inside_a_journal_record_is_reported_not_run(tmp_path, caplog):
    marker = tmp_path / "owned"
    (tmp_path / "store.db.journal").write_bytes(MAGIC + record(pickle.dumps(Planted(marker))))
    with caplog.at_level(logging.WARNING, JOURNAL_LOGGER):
        open_store(str(tmp_path / "store.db")).close()
    assert not marker.exists()
    assert "a record that is not a batch" in caplog.text


async def test_a_journal_cut_within_its_header_holds_nothing(tmp_path, caplog):
    (tmp_path / "store.db.journal").write_bytes(MAGIC[:5])
    with caplog.at_level(logging.WARNING, JOURNAL_LOGGER):
        store = open_store(str(tmp_path / "store.db"))
    try:
        assert await store.names() == []
    finally:
        store.close()
    assert "a cut file header at offset 0; dropped its last 5 bytes" in caplog.text


async def test_a_journal_applied_twice_changes_nothing(tmp_path):
    path = str(tmp_path / "store.db")
    batches = [
        Batch(created=[("s", "m", b"{}")], events=[("s", 1, b"1")], joined=[("s", "v1")]),
        Batch(events=[("s", 2, b"2")], left=[("s", "v1")], joined=[("s", "v2")]),
        Batch(snapshots=[("s", 2, 20, b"{}", "d")]),
        Batch(events=[("s", 3, b"3")], joined=[("s", "v3")]),
    ]
    journal = await journal_of(tmp_path, *batches)
    store = open_store(path)
    for batch in batches:
        await store.commit(batch)
    store.close()
    (tmp_path / "store.db.journal").write_bytes(journal)  # as if the kill came before its removal
    store = open_store(path)
    try:
        stored = await store.load("s")
        assert stored is not None
        assert (stored.snapshot_seq, stored.events, stored.present) == (2, [b"3"], ["v2", "v3"])
    finally:
        store.close()


async def test_the_first_body_stored_for_a_seq_is_kept(tmp_path):
    store = open_store(str(tmp_path / "store.db"))
    try:
        await store.commit(created(1))
        await store.commit(event(1, b'{"again":1}'))
        assert await events_of(store) == [b'{"seq":1}']
    finally:
        store.close()


# --- failing writes ---------------------------------------------------------------------------


def journal_file(store: Store) -> Journal:
    """The store's journal, whose writes the tests below replace."""
    assert store._journal is not None
    return store._journal


def short_writes(journal: Journal, most: int) -> Callable[[memoryview], int]:
    def write(data: memoryview) -> int:
        assert journal._fd is not None
        return os.write(journal._fd, data[:most])

    return write


def half_then(journal: Journal, error: int | None) -> Callable[[memoryview], int]:
    """Write half of the first call's bytes; then fail with ``error`` (None: write nothing)."""
    calls: list[int] = []

    def write(data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            assert journal._fd is not None
            return os.write(journal._fd, data[: len(data) // 2])
        if error is None:
            return 0
        raise OSError(error, os.strerror(error))

    return write


async def test_short_writes_are_continued_until_the_record_is_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    await store.commit(created(1))
    monkeypatch.setattr(journal_file(store), "_write_some", short_writes(journal_file(store), 7))
    await store.commit(event(2))
    journal = (tmp_path / "store.db.journal").read_bytes()
    store.close()
    (tmp_path / "copy.db.journal").write_bytes(journal)
    copy = open_store(str(tmp_path / "copy.db"))
    try:
        assert await events_of(copy) == [b'{"seq":1}', b'{"seq":2}']
    finally:
        copy.close()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO, None])
async def test_a_failed_write_fails_the_commit_and_the_store_goes_on(tmp_path, monkeypatch, error):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    journal = tmp_path / "store.db.journal"
    try:
        await store.commit(created(1))
        size = journal.stat().st_size
        with monkeypatch.context() as patch:
            patch.setattr(journal_file(store), "_write_some", half_then(journal_file(store), error))
            with pytest.raises(StoreWriteError, match=f"cannot write to the journal of store {path}"):
                await store.commit(event(2, b"x" * 1000))
        assert journal.stat().st_size == size  # no torn record left in the journal
        await store.commit(event(3))
        copy = tmp_path / "copy.db"
        (tmp_path / "copy.db.journal").write_bytes(journal.read_bytes())  # what a kill would leave
        assert await events_of(store) == [b'{"seq":1}', b'{"seq":3}']
    finally:
        store.close()
    recovered = open_store(str(copy))
    try:
        assert await events_of(recovered) == [b'{"seq":1}', b'{"seq":3}']
    finally:
        recovered.close()


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes of any file are cut short, then fail with EFBIG (the kernel's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_a_real_short_write_fails_the_commit_and_is_cut_back(tmp_path):
    store = open_store(str(tmp_path / "store.db"))
    journal = tmp_path / "store.db.journal"
    try:
        await store.commit(created(1))
        size = journal.stat().st_size
        with file_size_limit(size + 100), pytest.raises(StoreWriteError, match="File too large"):
            await store.commit(event(2, b"x" * 1000))  # 100 bytes go in, then EFBIG
        assert journal.stat().st_size == size
        await store.commit(event(3))
        assert await events_of(store) == [b'{"seq":1}', b'{"seq":3}']
    finally:
        store.close()


async def test_nothing_is_appended_after_a_torn_record_that_could_not_be_cut(tmp_path, monkeypatch):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    journal = tmp_path / "store.db.journal"
    try:
        await store.commit(created(1))
        size = journal.stat().st_size

        def cannot_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        with monkeypatch.context() as patch:
            patch.setattr(os, "ftruncate", cannot_truncate)
            patch.setattr(journal_file(store), "_write_some", half_then(journal_file(store), errno.ENOSPC))
            with pytest.raises(StoreWriteError):
                await store.commit(event(2, b"x" * 1000))
            patch.undo()
            patch.setattr(os, "ftruncate", cannot_truncate)  # the disk is back, the journal still torn
            with pytest.raises(StoreWriteError):
                await store.commit(event(3))
        assert journal.stat().st_size > size
        await store.commit(event(4))  # ftruncate works again: the torn record goes first
        assert parse(journal.read_bytes())[2] == ""
        assert await events_of(store) == [b'{"seq":1}', b'{"seq":4}']
    finally:
        store.close()


async def test_a_journal_that_cannot_be_opened_fails_the_commit_only(tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "store.db"))
    try:
        with monkeypatch.context() as patch:

            def no_descriptors() -> int:
                raise OSError(errno.EMFILE, "Too many open files")

            patch.setattr(journal_file(store), "_open", no_descriptors)
            with pytest.raises(StoreWriteError, match="Too many open files"):
                await store.commit(created(1))
        await store.commit(created(2))
        assert await events_of(store) == [b'{"seq":2}']
    finally:
        store.close()


# --- failing applies --------------------------------------------------------------------------


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.01)
    monkeypatch.setattr(store_module, "APPLY_EVERY", 0.01)
    monkeypatch.setattr(store_module, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(store_module, "RETRY_MAX", 0.02)


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110 (the store's counters: no event to wait on)
            await trio.sleep(0.01)


@pytest.mark.usefixtures("quick_retries")
async def test_sqlite_busy_is_logged_once_and_retried_until_it_applies(tmp_path, caplog):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.keep_applying)
            with (
                contextlib.closing(sqlite3.connect(path)) as blocker,
                caplog.at_level(logging.WARNING, LOGGER),
            ):
                blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file
                await store.commit(created(1))
                await until(lambda: "database is locked" in caplog.text)
                await store.commit(event(2))
                await until(lambda: store.applies == 0 and store._retry == store_module.RETRY_MAX)
                await trio.sleep(0.1)  # several more tries
                assert store.pending_bytes > 0
                blocker.rollback()
                await until(lambda: store.pending_bytes == 0)
            nursery.cancel_scope.cancel()
        messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert len(messages) == 2
        assert messages[0].startswith(f"cannot apply to store {path}: database is locked; retrying")
        assert messages[1] == f"store {path}: applying works again"
        assert await events_of(store) == [b'{"seq":1}', b'{"seq":2}']
    finally:
        store.close()
    assert not list(tmp_path.glob("store.db.journal*"))


@pytest.mark.usefixtures("quick_retries")
async def test_a_full_database_is_logged_and_retried_until_there_is_room(tmp_path, caplog):
    store = open_store(str(tmp_path / "store.db"))
    try:
        await store.commit(created(1))
        await store.apply()
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
        await store.commit(event(2, b"x" * 100_000))
        with caplog.at_level(logging.WARNING, LOGGER):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.keep_applying)
                await until(lambda: "database or disk is full" in caplog.text)
                assert store.pending_bytes > 100_000
                store._db.execute("PRAGMA max_page_count = 1000000")
                await until(lambda: store.pending_bytes == 0)
                nursery.cancel_scope.cancel()
        assert len(await events_of(store)) == 2
        assert caplog.text.count("database or disk is full") == 1
    finally:
        store.close()


@pytest.mark.usefixtures("quick_retries")
async def test_commit_waits_while_sqlite_is_too_far_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_PENDING", 1)
    path = str(tmp_path / "store.db")
    store = open_store(path)
    committed = trio.Event()

    async def commit_second() -> None:
        await store.commit(event(2))
        committed.set()

    try:
        with contextlib.closing(sqlite3.connect(path)) as blocker:
            blocker.execute("BEGIN EXCLUSIVE")
            await store.commit(created(1))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit_second)
                await trio.sleep(0.2)
                assert not committed.is_set()
                blocker.rollback()
        assert committed.is_set()
        assert await events_of(store) == [b'{"seq":1}', b'{"seq":2}']
    finally:
        store.close()


@pytest.mark.usefixtures("quick_retries")
async def test_a_journal_that_cannot_be_rotated_does_not_stop_the_background_apply(
    tmp_path, monkeypatch, caplog
):
    store = open_store(str(tmp_path / "store.db"))
    try:
        await store.commit(created(1))
        with caplog.at_level(logging.WARNING, LOGGER), monkeypatch.context() as patch:

            def cannot_rename(source: str, target: str) -> None:
                raise OSError(errno.EMFILE, "Too many open files")

            patch.setattr(os, "replace", cannot_rename)
            with trio.move_on_after(0.2):
                await store.keep_applying()
        assert "cannot rotate the journal" in caplog.text
        assert store.pending_bytes > 0
        assert await events_of(store) == [b'{"seq":1}']
    finally:
        store.close()


async def test_close_keeps_the_journal_when_sqlite_refuses(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.01)
    path = str(tmp_path / "store.db")
    store = open_store(path)
    await store.commit(created(1))
    with contextlib.closing(sqlite3.connect(path)) as blocker, caplog.at_level(logging.WARNING, LOGGER):
        blocker.execute("BEGIN EXCLUSIVE")
        store.close()
        blocker.rollback()
    assert "its journal keeps the batches for the next start" in caplog.text
    reopened = open_store(path)
    try:
        assert await events_of(reopened) == [b'{"seq":1}']
    finally:
        reopened.close()


# --- files ------------------------------------------------------------------------------------


async def test_the_store_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        path = str(tmp_path / "store.db")
        store = open_store(path)
        await store.commit(created(1))
        paths = [path, f"{path}-wal", f"{path}-shm", f"{path}.journal", f"{path}.lock"]
        await store.apply()
        await store.commit(event(2))
        modes = {name: stat.S_IMODE(os.stat(name).st_mode) for name in paths}
        store.close()
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(paths, 0o600)


@pytest.mark.parametrize("fsync", [True, False])
async def test_fsync_puts_each_commit_on_the_disk_when_asked(tmp_path, monkeypatch, fsync):
    synced: list[int] = []
    real = os.fsync

    def fsync_spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync_spy)
    path = str(tmp_path / "store.db")
    store = open_store(path, fsync=fsync)
    try:
        journal = tmp_path / "store.db.journal"
        await store.commit(created(1))
        await store.commit(event(2))
        on_disk = [inode for inode in synced if inode == journal.stat().st_ino]
        assert len(on_disk) == (2 if fsync else 0)
        assert (tmp_path.stat().st_ino in synced) is fsync  # the journal's name too
        (level,) = store._db.execute("PRAGMA synchronous").fetchone()
        assert level == (2 if fsync else 1)  # FULL, NORMAL
    finally:
        store.close()


# --- the records --------------------------------------------------------------------------------


async def test_presence_rows_join_and_leave_and_come_back_in_join_order(tmp_path):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    await store.commit(Batch(created=[("s", "m", b"{}")], joined=[("s", "v1"), ("s", "v2"), ("s", "v3")]))
    await store.commit(Batch(left=[("s", "v2")], joined=[("t", "v9")]))
    await store.commit(Batch(joined=[("s", "v4"), ("s", "v1")]))  # v1 is present already
    stored = await store.load("s")
    assert stored is not None
    assert stored.present == ["v1", "v3", "v4"]
    await store.commit(Batch(left=[("s", "v1"), ("s", "v3"), ("s", "v4")]))
    store.close()
    reopened = open_store(path)
    try:
        stored = await reopened.load("s")
        assert stored is not None
        assert stored.present == []
    finally:
        reopened.close()


def test_a_store_of_the_previous_format_is_refused(tmp_path):
    path = str(tmp_path / "store.db")
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute("CREATE TABLE presence (name TEXT PRIMARY KEY, views BLOB NOT NULL)")
        old.execute("PRAGMA user_version=2")
    with pytest.raises(StoreError, match="store format 2, this one reads 3"):
        open_store(path)
    open_store(str(tmp_path / "other.db")).close()


# --- million run's temporary store ------------------------------------------------------------


def test_a_temporary_store_is_in_a_fresh_private_directory_removed_with_it(tmp_path):
    first, second = _temporary_store(), _temporary_store()
    directory = Path(first).parent
    try:
        assert Path(second).parent != directory
        assert directory.parent == Path(tempfile.gettempdir())
        assert directory.name.startswith("million-")
        info = directory.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.getuid(), 0o700)
        assert list(directory.iterdir()) == []
        open_store(first).close()
        remove_store(first)
        assert not directory.exists()
    finally:
        for path in (first, second):
            with contextlib.suppress(OSError):
                remove_store(path)
    assert not Path(second).parent.exists()
    user_store = tmp_path / "kept.db"
    open_store(str(user_store)).close()
    remove_store(str(user_store))
    assert tmp_path.exists()  # a store the user named: only its files go
