"""The store's journal: its format, appending a record, cutting a torn tail, reading it back.

``Journal`` is the file ``Store.commit`` appends each batch to (``<store>.journal``),
before anything goes into SQLite; ``rotate`` hands it to the apply as
``<store>.journal-applying``, and ``recover`` applies the journals a killed process left.
A record is written whole or not at all: a failed write is cut back to the last whole
record, and nothing is appended while that cannot be done.

Format. The file begins with ``MAGIC``, then one record per batch::

    length  u32 little-endian   bytes of the body
    crc     u32 little-endian   CRC-32 (zlib.crc32) of the body
    body    msgpack             [created, events, snapshots, joined, left], each an array
                                of arrays of the ``Batch`` field's tuple (str, int and bin)

A body is decoded by ``msgspec`` into exactly those types, so no journal can execute
code. At start, a record cut short, with a wrong checksum or not decoding into a batch
ends the journal: a warning names the file, the offset and the bytes dropped, and every
record before it is applied. A file that does not begin with ``MAGIC`` (another format)
is refused with ``StoreError``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import zlib
from collections.abc import Callable

import msgspec

from million.relay.records import Batch

__all__ = ["MAGIC", "Journal", "StoreError", "StoreWriteError", "encode", "parse", "read_journal", "remove"]

log = logging.getLogger(__name__)

MAGIC = b"million-journal-1\n"  # the first bytes of every journal
_RECORD = struct.Struct("<II")  # length and CRC-32 of a record's body
_Body = tuple[
    list[tuple[str, str, bytes]],
    list[tuple[str, int, bytes]],
    list[tuple[str, int, int, bytes, str]],
    list[tuple[str, str]],
    list[tuple[str, str]],
]
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Body)


class StoreError(Exception):
    """The store file cannot be used."""


class StoreWriteError(StoreError):
    """A batch could not be journaled whole: it is not stored and must not be relayed."""


def encode(batch: Batch) -> bytes:
    """The body of the record that journals ``batch``."""
    return _ENCODER.encode((batch.created, batch.events, batch.snapshots, batch.joined, batch.left))


class Journal:
    """The journal of the store at ``store``: appended to, rotated, recovered."""

    def __init__(self, store: str, *, fsync: bool = False) -> None:
        self.store = store  # the store's path, for messages
        self.fsync = fsync
        self.path = f"{store}.journal"
        self.applying = f"{store}.journal-applying"
        self._fd: int | None = None  # the journal, opened by the first append
        self._size = 0  # bytes of whole records in it (with MAGIC)
        self._torn = False  # a failed append left bytes after them
        self._named = False  # with fsync: the journal's directory entry is on the disk

    def append(self, data: bytes) -> None:
        """Write one record at the journal's end, whole or not at all (``StoreWriteError``)."""
        header = MAGIC if self._size == 0 else b""
        record = header + _RECORD.pack(len(data), zlib.crc32(data)) + data
        try:
            if self._torn:
                self._cut_back()
            if self._fd is None:
                self._fd = self._open()
            self._write_all(record)
            if self.fsync:
                self._sync()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._cut_back()
            raise StoreWriteError(f"cannot write to the journal of store {self.store}: {exc}") from None
        self._size += len(record)

    def rotate(self) -> None:
        """Hand the journal, if one was written, to the apply (``applying``); the next
        append starts a new one. ``StoreError`` if it cannot be renamed."""
        if self._fd is not None:
            try:
                os.replace(self.path, self.applying)
            except OSError as exc:
                raise StoreError(f"cannot rotate the journal of store {self.store}: {exc}") from None
            self.close()

    def recover(self, apply: Callable[[list[Batch]], None]) -> None:
        """``apply`` the batches of the journals a killed process left, oldest first, then
        remove them."""
        for journal in (self.applying, self.path):
            if os.path.lexists(journal):
                apply(read_journal(journal))
                try:
                    os.unlink(journal)
                except OSError as exc:
                    raise StoreError(f"cannot open store {self.store}: {exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd, self._size, self._torn = None, 0, False

    def _write_all(self, record: bytes) -> None:
        view = memoryview(record)
        while view:
            written = self._write_some(view)
            if written <= 0:
                raise OSError(errno.EIO, "the journal took no bytes")
            view = view[written:]

    def _write_some(self, data: memoryview) -> int:
        """One write to the journal; the number of bytes written."""
        assert self._fd is not None
        return os.write(self._fd, data)

    def _cut_back(self) -> None:
        """Drop what follows the last whole record; until that works, nothing is appended."""
        self._torn = True
        if self._fd is not None:
            os.ftruncate(self._fd, self._size)
        self._torn = False

    def _sync(self) -> None:
        """Put the journal on the disk, and its name (and the rotation before it) once."""
        assert self._fd is not None
        os.fsync(self._fd)
        if not self._named:
            _sync_directory(self.path)
            self._named = True

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        self._size, self._named = 0, False
        return fd


def read_journal(path: str) -> list[Batch]:
    """The batches of a journal up to its end or to a torn or corrupt record (logged)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise StoreError(f"cannot read the journal {path}: {exc}") from None
    if not data.startswith(MAGIC) and not MAGIC.startswith(data):  # not even MAGIC cut short
        raise StoreError(
            f"cannot open the journal {path}: it is not a journal this version of million writes;"
            " move it away to start without it (its batches are then lost)"
        )
    batches, end, problem = parse(data)
    if problem:
        log.warning(
            "journal %s: %s at offset %d; dropped its last %d bytes, kept the %d batches before",
            path,
            problem,
            end,
            len(data) - end,
            len(batches),
        )
    return batches


def parse(data: bytes) -> tuple[list[Batch], int, str]:
    """The batches of a journal's bytes, where the whole records end, and why there ("" at the end)."""
    if len(data) < len(MAGIC):  # cut within MAGIC: no record yet
        return [], 0, "a cut file header" if data else ""
    view = memoryview(data)
    batches: list[Batch] = []
    offset = len(MAGIC)
    while offset < len(data):
        if offset + _RECORD.size > len(data):
            return batches, offset, "a cut record header"
        size, crc = _RECORD.unpack_from(data, offset)
        body = view[offset + _RECORD.size : offset + _RECORD.size + size]
        if len(body) < size:
            return batches, offset, "a cut record"
        if zlib.crc32(body) != crc:
            return batches, offset, "a record with a wrong checksum"
        try:
            batches.append(Batch(*_DECODER.decode(body)))
        except msgspec.DecodeError as exc:
            return batches, offset, f"a record that is not a batch ({exc})"
        offset += _RECORD.size + size
    return batches, offset, ""


def _sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str | None) -> None:
    """Remove a journal whose batches are in SQLite (one left behind is applied again: harmless)."""
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
