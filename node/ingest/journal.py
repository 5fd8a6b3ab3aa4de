"""The receiver's write-ahead journal: an instance is durable after one fdatasync.

Making a new file durable costs a filesystem-journal commit (fsync of the file, rename, fsync
of its folder): 1.5–2 ms on the machines we measured, more when the disk is shared. Each
receiver process therefore owns a journal: a preallocated file, written through with zeros once
when it is created, so that overwriting it changes no metadata and ``fdatasync`` only has to
write the data and flush the disk cache. An instance is appended as one record (header block
+ file meta + data set) and is answered Success once the record is flushed; concurrent
associations share the flush (group commit). The Indexer then writes the instance file at
its final path, fsyncs it and its folder, commits the index row — in batches, off the answer
path — and only then *retires* the record, whose space the ring reuses.

Layout (all little endian): block 0 holds the checkpoint (every record with a smaller sequence
number is retired); records start on 4 KiB boundaries: a 4 KiB header block then the payload.
The header (version 2) holds magic, sequence number, payload length, meta length, CRC-32 of the
file meta, receive time, SHA-256 of the data set, CRC-32 of the header. The SHA-256 is the one
the index keeps for the instance: the receiver computes it while the data set arrives, so one
pass over the bytes both guards the record and names its content (version 1 records, with a
CRC-32 of the whole payload instead, are still read back). Recovery (``Journal.open``) scans
every block for valid headers at or above the checkpoint whose payload checks out: those are
the instances possibly answered and not yet indexed. A torn record (crash during its write)
fails its checksum and was never answered.

Instances that do not fit (over a quarter of the journal, or the ring is full of records not
yet indexed) take the slower per-file path (``store.IncomingFile``).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from node.ingest.store import SYNC_FILE_RANGE_WRITE, GroupSync, sync_file_range

BLOCK = 4096
DEFAULT_SIZE = 64 * 1024 * 1024
FOLDER = ".journal"
_CHECKPOINT = struct.Struct("<8sQI")  # magic, first live sequence number, crc32
_HEADER_V1 = struct.Struct("<8sQQIIQ")  # magic, seq, payload length, meta length, payload crc32, time (ns)
# magic, seq, payload length, meta length, meta crc32, time (ns), data set sha256
_HEADER = struct.Struct("<8sQQIIQ32s")
_CHECKPOINT_MAGIC = b"AINJCKP1"
_RECORD_MAGIC_V1 = b"AINJREC1"
_RECORD_MAGIC = b"AINJREC2"
_MAGIC_PREFIX = b"AINJREC"


class JournalFull(Exception):
    """No room for this record now (too big, or the ring holds records not yet indexed)."""


def _align(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


@dataclass(frozen=True)
class Record:
    """One instance in the journal: its payload is file meta + data set."""

    journal: "Journal"
    seq: int
    offset: int
    meta_len: int
    payload_len: int
    received_ns: int = 0
    sha256: str | None = None  # hex SHA-256 of the data set (version 2 records)

    def payload(self) -> memoryview:
        """The payload, read through the journal's memory map (release it when done)."""
        start = self.offset + BLOCK
        return self.journal.view()[start : start + self.payload_len]


class Journal:
    """One process's journal file (see the module docstring)."""

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self.size = size
        self._fd = fd
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        self._lock = threading.Lock()
        self._sync = GroupSync()
        self._head = BLOCK
        self._next_seq = 1
        self._live: dict[int, tuple[int, int]] = {}  # seq -> (offset, length) not yet retired
        self._retired_since_checkpoint = False
        self._checkpointed_at = 0.0
        self.max_payload = (size - BLOCK) // 4

    # -- opening, recovery

    @classmethod
    def open(cls, path: Path, size: int | None = None, create: bool = True) -> tuple["Journal", list[Record]]:
        """Open (creating and zero-filling it if needed) and recover: the journal and its
        unretired valid records, oldest first. Those must be indexed, then retired.
        ``create=False`` only inspects an existing journal (FileNotFoundError otherwise)."""
        path = Path(path)
        size = size or DEFAULT_SIZE
        if create and (not path.exists() or path.stat().st_size < size):
            _create(path, size)
        else:
            size = path.stat().st_size
        fd = os.open(path, (os.O_RDWR if create else os.O_RDONLY) | os.O_CLOEXEC)
        journal = cls(path, fd, size)
        records = journal._scan()
        return journal, records

    def _scan(self) -> list[Record]:
        first_live = 0
        magic, seq, crc = _CHECKPOINT.unpack_from(self._map, 0)
        if magic == _CHECKPOINT_MAGIC and zlib.crc32(self._map[: _CHECKPOINT.size - 4]) == crc:
            first_live = seq
        found: list[Record] = []
        highest = first_live - 1
        view = memoryview(self._map)
        try:
            for offset in range(BLOCK, self.size - BLOCK + 1, BLOCK):
                if view[offset : offset + 7] != _MAGIC_PREFIX:
                    continue
                record = self._record_at(view, offset)
                if record is None:
                    continue
                highest = max(highest, record.seq)
                if record.seq >= first_live:
                    found.append(record)
        finally:
            view.release()
        found.sort(key=lambda r: r.seq)
        self._next_seq = max(highest + 1, first_live, 1)
        for record in found:
            self._live[record.seq] = (record.offset, BLOCK + _align(record.payload_len))
        if found:  # continue after the newest record, so the oldest are reused last
            newest = found[-1]
            self._head = newest.offset + BLOCK + _align(newest.payload_len)
        return found

    def _record_at(self, view: memoryview, offset: int) -> Record | None:
        magic = bytes(view[offset : offset + 8])
        layout = _HEADER if magic == _RECORD_MAGIC else _HEADER_V1 if magic == _RECORD_MAGIC_V1 else None
        if layout is None:
            return None
        header = bytes(view[offset : offset + layout.size + 4])
        (header_crc,) = struct.unpack_from("<I", header, layout.size)
        if zlib.crc32(header[: layout.size]) != header_crc:
            return None
        fields = layout.unpack_from(header)
        _, seq, length, meta_len, crc, received_ns = fields[:6]
        if meta_len > length or offset + BLOCK + length > self.size:
            return None
        start = offset + BLOCK
        if layout is _HEADER_V1:
            if zlib.crc32(view[start : start + length]) != crc:
                return None  # torn: this record was never answered
            return Record(self, seq, offset, meta_len, length, received_ns)
        digest = fields[6]
        if (
            zlib.crc32(view[start : start + meta_len]) != crc
            or hashlib.sha256(view[start + meta_len : start + length]).digest() != digest
        ):
            return None  # torn: this record was never answered
        return Record(self, seq, offset, meta_len, length, received_ns, digest.hex())

    # -- the answer path

    def append(
        self, meta: bytes, data: bytes | memoryview, received_ns: int = 0, sha256: bytes | None = None
    ) -> Record:
        """Write a record and flush it (shared with concurrent appends); durable on return.
        ``sha256``: the data set's SHA-256 (digest bytes) when the caller computed it already
        (the receiver does, while the data set arrives)."""
        length = len(meta) + len(data)
        if length > self.max_payload:
            raise JournalFull("instance too large for the journal")
        span = BLOCK + _align(length)
        with self._lock:
            offset = self._head if self._head + span <= self.size else BLOCK
            for live_offset, live_span in self._live.values():
                if offset < live_offset + live_span and live_offset < offset + span:
                    raise JournalFull("journal holds records not indexed yet")
            seq = self._next_seq
            self._next_seq += 1
            self._head = offset + span
            self._live[seq] = (offset, span)
        try:
            if sha256 is None:
                sha256 = hashlib.sha256(data).digest()
            header = _HEADER.pack(_RECORD_MAGIC, seq, length, len(meta), zlib.crc32(meta), received_ns, sha256)
            header += struct.pack("<I", zlib.crc32(header))
            os.pwritev(self._fd, [header.ljust(BLOCK, b"\0"), meta, data], offset)
            self._sync.sync(self, lambda: os.fdatasync(self._fd))
        except BaseException:
            with self._lock:
                self._live.pop(seq, None)
            raise
        return Record(self, seq, offset, len(meta), length, received_ns, sha256.hex())

    # -- the indexer's side

    def view(self) -> memoryview:
        """A view of the whole journal (through its memory map)."""
        return memoryview(self._map)

    def copy_to(self, record: Record, fd: int) -> None:
        """Write a record's payload into the file ``fd`` (kernel-side copy where possible) and
        start its writeback."""
        offset, left = record.offset + BLOCK, record.payload_len
        try:
            while left:
                copied = os.copy_file_range(self._fd, fd, left, offset)
                if not copied:
                    raise OSError("short copy from the journal")
                offset += copied
                left -= copied
        except (AttributeError, OSError) as err:  # no copy_file_range here: through the map
            if isinstance(err, OSError) and err.errno not in (None, 18, 22, 38, 95):  # EXDEV EINVAL ENOSYS EOPNOTSUPP
                raise
            view = self.view()[offset : record.offset + BLOCK + record.payload_len]
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                view.release()
        _start_writeback(fd, record.payload_len)

    def retire(self, records: list[Record]) -> None:
        """These records' instances are placed and indexed: their space may be reused."""
        with self._lock:
            for record in records:
                self._live.pop(record.seq, None)
            self._retired_since_checkpoint = True

    def checkpoint(self, min_interval: float = 0.0) -> None:
        """Record durably that every retired record is done (so recovery skips them); not more
        often than every ``min_interval`` seconds (it costs a flush)."""
        with self._lock:
            if not self._retired_since_checkpoint or time.monotonic() - self._checkpointed_at < min_interval:
                return
            self._retired_since_checkpoint = False
            self._checkpointed_at = time.monotonic()
            first_live = min(self._live, default=self._next_seq)
        block = _CHECKPOINT.pack(_CHECKPOINT_MAGIC, first_live, 0)[:-4]
        block += struct.pack("<I", zlib.crc32(block))
        os.pwrite(self._fd, block, 0)
        self._sync.sync(self, lambda: os.fdatasync(self._fd))

    @property
    def checkpoint_due(self) -> bool:
        """Records were retired since the last checkpoint."""
        return self._retired_since_checkpoint

    def live_bytes(self) -> int:
        """Bytes of the ring held by records not retired yet."""
        with self._lock:
            return sum(span for _, span in self._live.values())

    def live(self) -> int:
        """Records not retired yet."""
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        """Close the file (records not retired stay for the next open)."""
        try:
            self._map.close()
        except BufferError:  # a payload view is still held; the GC closes the map later
            pass
        os.close(self._fd)


def _start_writeback(fd: int, length: int) -> None:
    if sync_file_range is not None:
        sync_file_range(fd, 0, length, SYNC_FILE_RANGE_WRITE)


def _create(path: Path, size: int) -> None:
    """A journal file of ``size`` bytes, every block written (zeros) and flushed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        zeros = bytes(1 << 20)
        written = 0
        while written < size:
            written += os.write(fd, zeros[: min(len(zeros), size - written)])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def room_to_create(path: Path, size: int, free: int, reserve: int) -> str | None:
    """Why a journal of ``size`` bytes cannot be preallocated at ``path`` with ``free`` bytes
    free and ``reserve`` to keep (None: it fits, or it exists at full size already)."""
    have = path.stat().st_size if path.exists() else 0
    needed = max(0, size - have)
    if needed and free - needed < reserve:
        return (
            f"preallocating {needed >> 20} MiB would leave {max(0, free - needed) >> 20} MiB free, "
            f"under storage.min_free_bytes ({reserve >> 20} MiB)"
        )
    return None


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".unavailable")


def mark_unavailable(path: Path, reason: str) -> None:
    """Note for the operator (``node.ingest.quarantine.alerts``) that a journal cannot be used."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _marker(path).write_text(reason)
    except OSError:  # the disk is full: the error log line is all there is
        pass


def mark_available(path: Path) -> None:
    """The journal is in use again: drop its note."""
    try:
        _marker(path).unlink()
    except FileNotFoundError:
        pass


def unavailable_journals(root: Path) -> list[tuple[str, str]]:
    """(journal name, reason) of every journal a receiver could not use."""
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        return []
    found = []
    for marker in sorted(folder.glob("*.unavailable")):
        try:
            found.append((marker.name.removesuffix(".unavailable"), marker.read_text()[:300]))
        except OSError:
            continue
    return found


def journal_files(root: Path) -> list[Path]:
    """Every journal file under a storage root."""
    folder = Path(root) / FOLDER
    return sorted(folder.glob("*.wal")) if folder.is_dir() else []
