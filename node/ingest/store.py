"""The store: received instances as files, written durably, at paths built from hashes.

An instance file is the DICOM File Format: preamble, file meta (what the association said), then
the data set exactly as the sender encoded it. Writing follows one recipe so a crash can never
leave half a file where a reader looks: temp file in ``<root>/.incoming`` (same filesystem), write,
flush, fsync, atomic rename into place, fsync of the folder. Paths come from SHA-256 hashes of the
study, series and SOP Instance UIDs and of the content, never from UID text, so no peer can steer where we write.

Received instances take two steps (see ``IncomingFile`` and ``node.ingest.receiver``):

1. *Landing* (before the sender is answered): the data set is written into a temp file while it
   arrives, then flushed (fdatasync), renamed into ``<root>/.landed`` and the folder fsynced.
   From here on the instance survives kill -9 and power loss.
2. *Placing* (after the answer, in batches): the landed file is hard-linked at its final path,
   the final folders are fsynced, the index rows committed, and only then the landed name
   removed. A landed file is therefore the durable record of "answered, maybe not indexed yet":
   at start the receiver indexes and places whatever is still there (``landed_files``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

# PS3.5 9.1: digits and dots, at most 64 characters, no empty component, no leading zero.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
INCOMING = ".incoming"
LANDED = ".landed"


class OutOfSpace(Exception):
    """Free space is under the reserve, or the disk filled up while writing (answer A700)."""


def valid_uid(uid: str | None) -> bool:
    """True for a well-formed DICOM UID (digits and dots, <= 64 chars, no empty components)."""
    if not uid or len(uid) > 64:
        return False
    return _UID_RE.match(uid) is not None


def uid_hash(uid: str) -> str:
    """Hex SHA-256 of a UID: the only way a UID takes part in a path."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()


def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str, content_sha256: str) -> str:
    """Where an instance lives, relative to the storage root: one folder per series.

    A series' instances share a folder, so writing a 300-slice series creates folders (and
    fsyncs their parents) once, and a study can be removed as one tree. The content hash in the
    name lets a replacement be written beside the stored copy instead of over it, and makes the
    path of identical content the same every time.
    """
    st, se, sop = uid_hash(study_uid), uid_hash(series_uid), uid_hash(sop_instance_uid)
    return f"{st[:2]}/{st[:32]}/{se[:32]}/{sop[:40]}-{content_sha256[:16]}.dcm"


def free_bytes(root: Path) -> int:
    """Bytes available to us on the filesystem holding ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(root).free


def ensure_space(root: Path, reserve: int, needed: int = 0) -> None:
    """Raise OutOfSpace when writing ``needed`` bytes would leave less than ``reserve`` free."""
    if free_bytes(root) - needed < reserve:
        raise OutOfSpace(f"free space under the reserve of {reserve} bytes")


class SpaceGuard:
    """``ensure_space`` for the receive path, asking the filesystem less often.

    Far from the reserve, a free-space figure at most ``max_age`` seconds old is good enough:
    in that time all receivers together write far less than ``margin``. Within ``margin`` of
    the reserve every check asks the filesystem again, so the refusal (A700) comes exactly
    where ``ensure_space`` would refuse.
    """

    def __init__(self, root: Path, reserve: int, margin: int = 256 * 1024 * 1024, max_age: float = 0.1):
        self.root, self.reserve, self.margin, self.max_age = Path(root), reserve, margin, max_age
        self._free = 0
        self._at = float("-inf")

    def check(self, needed: int = 0) -> None:
        """Raise OutOfSpace when writing ``needed`` bytes would leave less than the reserve free."""
        now = time.monotonic()
        if now - self._at > self.max_age or self._free - needed < self.reserve + self.margin:
            self._free = free_bytes(self.root)
            self._at = now
        if self._free - needed < self.reserve:
            raise OutOfSpace(f"free space under the reserve of {self.reserve} bytes")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_root(root: Path, prefix: str = "") -> None:
    """Create the storage root and its incoming and landing folders; remove temp files a crash
    left behind (only those named ``prefix*``: a restarted receiver cleans up only its own).

    With an empty prefix, only call this when no receiver is writing (service start).
    """
    root = Path(root)
    incoming = root / INCOMING
    for folder in (incoming, root / LANDED):
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
    for leftover in incoming.iterdir():
        if leftover.name.startswith(prefix):
            try:
                leftover.unlink()
            except OSError:
                pass


_durable_dirs: set[Path] = set()


def _make_dirs_durable(root: Path, folder: Path) -> None:
    # A new folder is only durable once its parent's entry for it is fsynced. Another receiver
    # may have just made it and not fsynced yet, so each process fsyncs every level once itself.
    if folder in _durable_dirs:
        return
    levels = []
    while folder != root:
        levels.append(folder)
        folder = folder.parent
    for level in reversed(levels):
        if level in _durable_dirs:
            continue
        level.mkdir(exist_ok=True)
        _fsync_dir(level.parent)
        _durable_dirs.add(level)


def _forget_dirs(folder: Path) -> None:
    while folder in _durable_dirs:
        _durable_dirs.discard(folder)
        folder = folder.parent


@dataclass(frozen=True)
class StoredFile:
    """What the store wrote: relative path, size on disk and the data set's SHA-256."""

    relpath: str
    size_bytes: int
    sha256: str


def write_durable(root: Path, relpath: str, chunks: Iterable[bytes | memoryview]) -> int:
    """Write ``chunks`` to ``root/relpath`` durably and atomically; return the byte count.

    When this returns, the file and its directory entry are on disk. On any error (ENOSPC
    included) the temp file is removed and nothing appears at ``relpath``.
    """
    target = root / relpath
    _make_dirs_durable(root, target.parent)
    fd, tmp = tempfile.mkstemp(dir=root / INCOMING, suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = fh.write(view)
                    size += written
                    view = view[written:]
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace("disk full while writing") from err
        raise
    _fsync_dir(target.parent)
    return size


# --- receiving straight to disk ---------------------------------------------------------------

try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    sync_file_range = _libc.sync_file_range
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux/glibc: writeback simply starts at the flush
    sync_file_range = None
SYNC_FILE_RANGE_WRITE = 2
_landed_counter = itertools.count()
_WRITEBACK_STEP = 256 * 1024


class IncomingFile:
    """One data set being received into a temp file, written back while it arrives.

    The file is ``meta`` (preamble + file meta) followed by the data set's fragments. Writeback
    of what has arrived is started every 256 KiB (sync_file_range), so the flush before the
    answer waits only for the tail. A write error (disk full) turns the file into a discard:
    the temp file is removed at once and the rest of the data set is only counted. The content
    hash is not computed on the way in (it costs as much as the rest of the answer path); the
    Indexer computes it from the landed file.
    """

    def __init__(self, root: Path, prefix: str, meta: bytes):
        self.root = root
        fd, path = tempfile.mkstemp(dir=root / INCOMING, prefix=prefix, suffix=".part")
        self.fd: int | None = fd
        self.path = Path(path)
        self.meta_len = len(meta)
        self.data_len = 0
        self.error: BaseException | None = None
        self.known_sha: object = None  # for the receiver: the index's hash for this UID, if any
        self._sha256: str | None = None
        self._pos = 0
        self._started = 0
        self._write(memoryview(meta))

    def _write(self, view: memoryview) -> None:
        while view:
            written = os.write(self.fd, view)  # type: ignore[arg-type]
            self._pos += written
            view = view[written:]
        if sync_file_range is not None and self._pos - self._started >= _WRITEBACK_STEP:
            sync_file_range(self.fd, self._started, self._pos - self._started, SYNC_FILE_RANGE_WRITE)
            self._started = self._pos

    def write(self, data: memoryview | bytes) -> None:
        """Append one fragment of the data set."""
        self.data_len += len(data)
        if self.fd is None:
            return
        try:
            self._write(memoryview(data))
        except OSError as err:
            self.error = OutOfSpace("disk full while writing") if err.errno in (errno.ENOSPC, errno.EDQUOT) else err
            self.discard()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the data set (computed on first use, from the file)."""
        if self._sha256 is None:
            with self.data_set_view() as view:
                self._sha256 = hashlib.sha256(view).hexdigest()
        return self._sha256

    @property
    def size(self) -> int:
        """Bytes in the file: meta + data set."""
        return self.meta_len + self.data_len

    def data_set_view(self) -> "MappedDataSet":
        """The received data set, memory-mapped (for parsing the header)."""
        return MappedDataSet(self.fd, self.meta_len)  # type: ignore[arg-type]

    def discard(self) -> None:
        """Close and remove the temp file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def land(self, dirsync: "DirSync") -> Path:
        """Make the file durable under ``.landed/name``; returns that path."""
        try:
            os.fdatasync(self.fd)  # type: ignore[arg-type]
        except OSError as err:
            self.discard()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace("disk full while writing") from err
            raise
        os.close(self.fd)  # type: ignore[arg-type]
        self.fd = None
        # The temp name is unique among live temp files; time and a counter keep it unique
        # among landed files left by earlier processes with the same prefix.
        landed = self.root / LANDED / f"{self.path.stem}-{time.time_ns():x}-{next(_landed_counter):x}.dcm"
        try:
            os.replace(self.path, landed)
        except OSError:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise
        dirsync.sync(landed.parent)
        return landed


class DataSetBuffer:
    """A data set arriving into memory, fragment by fragment, for the journal (``node.ingest.journal``).

    The fragments are kept as they came (views of the received PDUs, no copy) and joined once
    when complete. Their SHA-256 is computed as they arrive (hashlib releases the GIL, so this
    overlaps the rest of the receiver's work): it guards the journal record and is the content
    hash the index keeps, so nothing reads the bytes again for it. Past ``spill_at`` bytes the
    data set goes to an ``IncomingFile`` instead (``file``), so a large instance never sits in
    memory.
    """

    def __init__(self, root: Path, prefix: str, meta: bytes, spill_at: int):
        self.root, self.prefix, self.meta = root, prefix, meta
        self.spill_at = spill_at
        self.parts: list[bytes | memoryview] = []
        self.data_len = 0
        self.file: IncomingFile | None = None
        self.error: BaseException | None = None
        self.known_sha: object = None  # for the receiver: the index's hash for this UID, if any
        self._hash = hashlib.sha256()  # of the data set, as it arrives

    def write(self, data: memoryview | bytes) -> None:
        """Take the next fragment (kept by reference: it must not change afterwards)."""
        if self.file is not None:
            self.file.write(data)
            return
        self.data_len += len(data)
        if self.error is not None:
            return
        self.parts.append(data)
        self._hash.update(data)
        if self.data_len > self.spill_at:
            self._spill()

    @property
    def digest(self) -> bytes:
        """SHA-256 of the data set received so far (digest bytes)."""
        return self._hash.digest()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the data set received so far."""
        return self._hash.hexdigest()

    def _spill(self) -> None:
        parts, self.parts = self.parts, []
        try:
            self.file = IncomingFile(self.root, self.prefix, self.meta)
        except OSError as err:
            self.error = OutOfSpace("disk full while writing") if err.errno in (errno.ENOSPC, errno.EDQUOT) else err
            return
        self.file.known_sha = self.known_sha
        for part in parts:
            self.file.write(part)

    def data(self) -> bytes:
        """The whole data set (joined once)."""
        if len(self.parts) != 1 or not isinstance(self.parts[0], bytes):
            self.parts = [b"".join(self.parts)]
        return self.parts[0]  # type: ignore[return-value]

    @property
    def size(self) -> int:
        """Bytes of the instance file: meta + data set."""
        return len(self.meta) + self.data_len

    def discard(self) -> None:
        """Drop what arrived (idempotent)."""
        self.parts = []
        if self.file is not None:
            self.file.discard()


class MappedDataSet:
    """A read-only memory map of a data set in a file, from ``offset``; use as a context manager."""

    def __init__(self, fd: int, offset: int):
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size > offset else None
        self._view = memoryview(self._map)[offset:] if self._map is not None else memoryview(b"")

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, *_exc: object) -> None:
        self._view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view escaped (in a traceback); the GC closes it later
                pass


class GroupSync:
    """An fsync-like call shared by every thread that needs one at the same time (group commit).

    ``sync(key, flush)`` returns once a ``flush()`` has completed that started after the call:
    everything written before the call is durable. Threads arriving while a flush runs share
    the next one instead of each queueing their own.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state: dict[object, list[int]] = {}  # key -> [requested, done, busy]

    def sync(self, key: object, flush: Callable[[], None]) -> None:
        """Flush (or share a flush that starts after now); raises what the flush raised."""
        with self._cond:
            state = self._state.setdefault(key, [0, 0, 0])
            state[0] += 1
            ticket = state[0]
            while state[1] < ticket:
                if state[2]:
                    self._cond.wait()
                    continue
                state[2], target = 1, state[0]
                self._cond.release()
                try:
                    flush()
                    done = True
                finally:
                    self._cond.acquire()
                    state[2] = 0
                    self._cond.notify_all()
                if done:
                    state[1] = max(state[1], target)


class DirSync(GroupSync):
    """Folder fsyncs shared by the threads that need one at the same time."""

    def sync(self, folder: Path, flush: Callable[[], None] | None = None) -> None:  # type: ignore[override]
        """fsync ``folder`` (or share an fsync that starts after now)."""
        super().sync(folder, flush or (lambda: _fsync_dir(folder)))


def data_set_sha256(path: Path, offset: int) -> str:
    """Hex SHA-256 of a file's bytes from ``offset`` (an instance file's data set)."""
    with open(path, "rb") as fh:
        with MappedDataSet(fh.fileno(), offset) as view:
            return hashlib.sha256(view).hexdigest()


def place(root: Path, source: Path, relpath: str, replace: bool = False) -> bool:
    """Hard-link ``source`` (a landed or written-out file) at its final path; False if a file
    was already there. That file has the same content (the name holds its hash) and is left
    alone, unless ``replace`` (recovery after a crash: it may be incomplete, so it is replaced).
    The new folders are durable; the file and its entry become durable with ``sync_files``.
    """
    target = root / relpath
    _make_dirs_durable(root, target.parent)
    if not target.parent.is_dir():  # removed since we made it (retention): make it again
        _forget_dirs(target.parent)
        _make_dirs_durable(root, target.parent)
    if replace:
        tmp = target.with_name(target.name + ".replace")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.link(source, tmp)
        os.replace(tmp, target)
        return True
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    return True


try:
    _syncfs = _libc.syncfs  # type: ignore[name-defined]
    _syncfs.argtypes = [ctypes.c_int]
except (NameError, AttributeError):
    _syncfs = None


def sync_files(root: Path, paths: list[Path]) -> None:
    """Make ``paths`` (files under ``root``) and their folder entries durable.

    One syncfs(2) of the storage filesystem when there are several: one disk flush for the
    lot, where fsyncing each file would flush the disk once per file. (It also writes out
    whatever else is dirty on that filesystem: keep the store on its own filesystem.)
    Otherwise, or without syncfs, fsync each file and folder.
    """
    if len(paths) > 1 and _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed since (duplicate policy): nothing to keep
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {p.parent for p in paths}:
        if folder.is_dir():
            _fsync_dir(folder)


def unland(landed: Path) -> None:
    """Forget a landed file once its instance is placed and indexed (no fsync needed: a landed
    file that comes back after a crash is recognised as already indexed)."""
    try:
        os.unlink(landed)
    except FileNotFoundError:
        pass


def landed_files(root: Path, prefix: str = "") -> Iterator[Path]:
    """Landed files (answered, maybe not indexed), oldest first."""
    folder = Path(root) / LANDED
    if not folder.is_dir():
        return iter(())
    found = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.suffix == ".dcm"]
    return iter(sorted(found, key=lambda p: p.stat().st_mtime_ns))


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries become durable)."""
    _fsync_dir(path)


def remove_file(root: Path, relpath: str) -> None:
    """Remove a stored file (after its replacement is durable and indexed); fsync the folder."""
    target = root / relpath
    try:
        target.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(target.parent)


def is_stored(root: Path, relpath: str) -> bool:
    """True when a file is at ``relpath``: it is then complete (only whole files are renamed in)."""
    return (root / relpath).is_file()


def open_instance(root: Path, relpath: str) -> Path:
    """Absolute path of a stored instance (for readers: assembler, workers, API)."""
    return root / relpath
