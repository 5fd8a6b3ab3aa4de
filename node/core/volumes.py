"""Streamed series volumes: each instance's pixel data decoded once, at ingest, into one file per series.

The receiver has walked every byte of an instance when it answers; the analysis used to read and
decode all of them again when the study was ready (most of a CT's time to result). Instead the
node decodes each instance once, off the C-STORE answer path (``node.ingest.volume_stream``),
and appends its stored values to the series' volume file; the analysis maps that file
(``StreamedSeries``) and reads only the instances' headers for their geometry, so the
geometry, ordering, rescale and grouping code is the file loader's own, voxel for voxel.

On disk, beside the instance files of a series (``<series folder>/.volume/``):

- ``pixels.bin``: the stored values (``pixel_array``: frames × rows × columns, native dtype) of
  each instance, one after another, each at a 64-byte aligned offset;
- ``slots.jsonl``: one line per instance, written after its pixels are flushed (fdatasync):
  the instance file's name, size and modification time, where its values lie, their shape,
  dtype and CRC-32.

It is a cache, never the truth: a slot counts only while it names the instance file the index
lists with the same size and modification time, lies inside ``pixels.bin`` and its CRC matches.
Anything missing, torn (a crash mid-write), re-sent or corrupted makes the reader say why and
the analysis reads the files instead. Several receiver processes may append to one series: an
exclusive ``flock`` on ``pixels.bin`` orders them. Retention removes the folder with the study.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom

VOLUME_DIR = ".volume"
PIXELS = "pixels.bin"
SLOTS = "slots.jsonl"
FORMAT = 1
_ALIGN = 64


class NotStreamable(ValueError):
    """The instance's pixels are not kept in a streamed volume (colour, palette, no pixel data);
    the analysis reads its file."""


@dataclass(frozen=True)
class Slot:
    """Where one instance's stored values lie in ``pixels.bin`` and which file they came from."""

    name: str  # the instance file's name (it holds the content hash)
    size: int
    mtime_ns: int
    offset: int
    shape: tuple[int, ...]  # (frames, rows, columns)
    dtype: str
    crc32: int

    @property
    def nbytes(self) -> int:
        """Bytes the values take in ``pixels.bin``."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def line(self) -> bytes:
        """The slot as one line of ``slots.jsonl``."""
        record = {"v": FORMAT, **self.__dict__, "shape": list(self.shape)}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")


def volume_folder(series_folder: Path) -> Path:
    """The streamed volume of the series whose instance files are in ``series_folder``."""
    return Path(series_folder) / VOLUME_DIR


def stored_values(path: Path) -> np.ndarray:
    """An instance's stored values as the file loader decodes them: (frames, rows, columns).

    Only grey images are streamed (one sample per pixel, not PALETTE COLOR): colour conversion
    stays with the file loader. Raises ``NotStreamable`` otherwise, or for a file pydicom cannot
    read or decode (the file loader then reports why).
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        raise NotStreamable(f"not readable ({type(err).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotStreamable("no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        raise NotStreamable("colour image")
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - the decoders raise many types
        raise NotStreamable(f"cannot decode ({type(err).__name__})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1 or arr.ndim == 2:  # the file loader's rule (imaging._decode)
        arr = arr.reshape((1, *arr.shape[-2:]))
    return np.ascontiguousarray(arr)


def append(series_folder: Path, items: Iterable[tuple[Path, np.ndarray]]) -> int:
    """Append instances' stored values (``path``: the instance file, ``values``: its stored
    values) to the series' volume; returns how many slots were written.

    The values are flushed (fdatasync) before their slot lines are written, so a slot never
    points at values a crash could lose.
    """
    items = list(items)
    if not items:
        return 0
    folder = volume_folder(series_folder)
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / PIXELS, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.fstat(fd).st_size
        slots = []
        for path, values in items:
            st = path.stat()
            offset = -(-end // _ALIGN) * _ALIGN
            data = memoryview(np.ascontiguousarray(values)).cast("B")
            os.pwrite(fd, data, offset)
            end = offset + len(data)
            slots.append(
                Slot(
                    path.name,
                    st.st_size,
                    st.st_mtime_ns,
                    offset,
                    tuple(values.shape),
                    values.dtype.str,
                    zlib.crc32(data),
                )
            )
        os.fdatasync(fd)
        with open(folder / SLOTS, "ab") as fh:  # O_APPEND: each line lands whole at the end
            fh.write(b"".join(s.line() for s in slots))
        return len(slots)
    finally:
        os.close(fd)  # releases the lock


def remove(series_folder: Path) -> None:
    """Remove a series' streamed volume (retention, or a study removed)."""
    shutil.rmtree(volume_folder(series_folder), ignore_errors=True)


def _parse(line: bytes) -> Slot | None:
    try:
        record = json.loads(line)
        if record.get("v") != FORMAT:
            return None
        return Slot(
            str(record["name"]),
            int(record["size"]),
            int(record["mtime_ns"]),
            int(record["offset"]),
            tuple(int(n) for n in record["shape"]),
            str(record["dtype"]),
            int(record["crc32"]),
        )
    except (ValueError, KeyError, TypeError):  # a torn last line (crash mid-write)
        return None


class StreamedSeries:
    """A series' streamed volume, mapped read-only; ``values(paths)`` checks and returns slots."""

    def __init__(self, series_folder: Path):
        self.folder = volume_folder(series_folder)
        self.slots: dict[str, list[Slot]] = {}
        with open(self.folder / SLOTS, "rb") as fh:
            for line in fh:
                slot = _parse(line)
                if slot is not None:
                    self.slots.setdefault(slot.name, []).append(slot)
        size = (self.folder / PIXELS).stat().st_size
        self._raw = np.memmap(self.folder / PIXELS, dtype=np.uint8, mode="r") if size else np.empty(0, np.uint8)

    def values(self, path: Path) -> np.ndarray:
        """The stored values of the instance file ``path`` (a read-only view), else raises
        ``LookupError`` saying why the slot cannot be used."""
        candidates = self.slots.get(path.name)
        if not candidates:
            raise LookupError("an instance is not in the streamed volume yet")
        st = path.stat()
        for slot in reversed(candidates):  # the latest write of that file first
            if (slot.size, slot.mtime_ns) != (st.st_size, st.st_mtime_ns):
                continue
            if slot.offset + slot.nbytes > len(self._raw):
                raise LookupError("the streamed volume is shorter than its slots say")
            raw = self._raw[slot.offset : slot.offset + slot.nbytes]
            if zlib.crc32(raw) != slot.crc32:
                raise LookupError("a slot of the streamed volume fails its checksum")
            return raw.view(np.dtype(slot.dtype)).reshape(slot.shape)
        raise LookupError("an instance file changed after it was streamed")


def streamed_values(paths: list[Path]) -> tuple[list[np.ndarray | None], str]:
    """The stored values of each instance file in ``paths`` (one series, one folder) from the
    streamed volume, None for each one that must be read from its file instead; and why the
    first such one could not be used ("" when none)."""
    missing: list[np.ndarray | None] = [None] * len(paths)
    folders = {p.parent for p in paths}
    if len(folders) != 1:
        return missing, "the instances are not in one series folder"
    try:
        series = StreamedSeries(folders.pop())
    except FileNotFoundError:
        return missing, "no streamed volume"
    except (OSError, ValueError) as err:
        return missing, f"the streamed volume cannot be read ({err})"
    values: list[np.ndarray | None] = []
    why = ""
    for path in paths:
        try:
            values.append(series.values(path))
        except (LookupError, OSError, ValueError) as err:
            values.append(None)  # this instance only: its file is read, the others come mapped
            why = why or str(err)
    return values, why
