"""The store: received instances as files, written durably, at paths built from hashes.

An instance file is the DICOM File Format: preamble, file meta (what the association said), then
the data set exactly as the sender encoded it. Writing follows one recipe so a crash can never
leave half a file where a reader looks: temp file in ``<root>/.incoming`` (same filesystem), write,
flush, fsync, atomic rename into place, fsync of the folder. Paths come from SHA-256 hashes of the
study, series and SOP Instance UIDs and of the content, never from UID text, so no peer can steer where we write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# PS3.5 9.1: digits and dots, at most 64 characters, no empty component, no leading zero.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
INCOMING = ".incoming"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_root(root: Path) -> None:
    """Create the storage root and its incoming folder; remove temp files a crash left behind.

    Only call this when no receiver is writing (at service start, before receivers fork).
    """
    incoming = root / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    for leftover in incoming.iterdir():
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
