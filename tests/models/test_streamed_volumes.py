"""Streamed series volumes (node.core.volumes): the analysis maps the pixels decoded at ingest and
gets the file loader's volumes voxel for voxel; anything incomplete, changed or corrupted falls
back to the files.

Every test of ``test_imaging`` and ``test_series_semantics`` (every geometry, transfer syntax,
multi-frame, cine, MONOCHROME1, duplicates, mixed series) runs again here with the loader
wrapped: each load is repeated on a copy of the files whose pixels were streamed, and the two
results must be identical (pixels bit for bit, affine, order, sources, kind, label, note).
"""

from __future__ import annotations

import dataclasses
import shutil
import shutil as sh
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from node import retention
from node.core import volumes
from node.ingest.volume_stream import VolumeStreamer
from tests.models import test_imaging, test_series_semantics
from tests.models.test_imaging import *  # noqa: F403 - every geometry test, run again streamed
from tests.models.test_series_semantics import *  # noqa: F403
from workers.analysis import imaging
from workers.results.sources import SourceImages
from workers.synthetic.phantoms import make_ct_phantom, write_ct_series

_original_load_groups = imaging.load_groups


def _stream(folder: Path, paths: list[Path]) -> bool:
    """Stream the files as the receiver's streamer would; True when every one was streamable."""
    items, every = [], True
    for path in paths:
        try:
            items.append((path, volumes.stored_values(path)))
        except volumes.NotStreamable:
            every = False
    volumes.append(folder, items)
    return every


def _same_volume(streamed, from_files, renamed: dict[Path, Path]) -> None:
    assert streamed.pixels.dtype == from_files.pixels.dtype == np.float32
    assert streamed.pixels.shape == from_files.pixels.shape
    # Bit for bit (NaN, -0.0 included), not merely close.
    assert np.array_equal(streamed.pixels.view(np.uint32), from_files.pixels.view(np.uint32))
    assert np.array_equal(streamed.affine, from_files.affine)
    fields = ("kind", "label", "note", "frame_time_s", "modality", "series_instance_uid", "frame_of_reference_uid")
    assert [getattr(streamed, f) for f in fields] == [getattr(from_files, f) for f in fields]
    assert [dataclasses.replace(s, path=renamed[s.path]) for s in streamed.sources] == from_files.sources


def _checking_load_groups(paths, allow_mixed_series: bool = False):  # noqa: D401
    """``load_groups`` that also loads a streamed copy of the files and compares the two."""
    paths = [Path(p) for p in paths]
    copy = Path(tempfile.mkdtemp(prefix="streamed-"))
    try:
        copies = [copy / f"{n:05d}-{p.name}" for n, p in enumerate(paths)]
        for source, target in zip(paths, copies):
            shutil.copyfile(source, target)
        every = _stream(copy, copies)
        try:
            from_files = _original_load_groups(paths, allow_mixed_series)
        except imaging.SeriesError as err:
            with pytest.raises(imaging.SeriesError):  # refused the same way
                _original_load_groups(copies, allow_mixed_series)
            raise err
        streamed = _original_load_groups(copies, allow_mixed_series)
        if every:
            assert {v.pixels_from for v in streamed} == {"streamed"}
        assert len(streamed) == len(from_files)
        renamed = dict(zip(copies, paths))
        for a, b in zip(streamed, from_files):
            _same_volume(a, b, renamed)
        return from_files
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@pytest.fixture(autouse=True)
def _every_load_compared(monkeypatch):
    monkeypatch.setattr(imaging, "load_groups", _checking_load_groups)
    monkeypatch.setattr(test_imaging, "load_groups", _checking_load_groups)
    monkeypatch.setattr(test_series_semantics, "load_groups", _checking_load_groups)


# --- the streamed volume itself -------------------------------------------------------------


def _ct(tmp_path: Path, **kw) -> list[Path]:
    return write_ct_series(make_ct_phantom(seed=1, shape=(12, 24, 24)), tmp_path / "series", **kw)


def test_a_streamed_series_is_used_and_identical(tmp_path):
    paths = _ct(tmp_path)
    assert _stream(paths[0].parent, list(reversed(paths)))  # arrival order is not slice order
    streamed = _original_load_groups(paths)[0]
    assert streamed.pixels_from == "streamed"
    volumes.remove(paths[0].parent)
    from_files = _original_load_groups(paths)[0]
    assert from_files.pixels_from == "files: no streamed volume"
    _same_volume(streamed, from_files, {p: p for p in paths})


def test_the_writers_take_the_headers_the_streamed_load_read(tmp_path):
    """With streamed pixels the loader reads each header once and the result writers take those
    (prepared as they would prepare a fresh read) instead of reading the files again."""
    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths)
    streamed = _original_load_groups(paths)[0]
    assert len(streamed.headers) == len(paths)
    fresh = SourceImages(streamed.sources).headers  # read from the files
    handed = SourceImages(streamed.sources, streamed.headers)
    for path in paths:
        path.rename(path.with_suffix(".moved"))  # the hand-over must not need the files
    assert handed.headers == fresh
    assert not streamed.headers  # handed over once: a second build reads the files
    volumes.remove(paths[0].parent)
    assert not _original_load_groups([p.with_suffix(".moved") for p in paths])[0].headers  # files: nothing


def test_a_missing_slice_is_read_from_its_file(tmp_path):
    """An instance the streamer has not reached yet (the study was ready first) is read from its
    file; the others still come from the streamed volume, and the volume is the same."""
    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths[:5] + paths[6:])
    volume = _original_load_groups(paths)[0]
    assert volume.pixels_from == "streamed 11/12; files: an instance is not in the streamed volume yet"
    volumes.remove(paths[0].parent)
    _same_volume(volume, _original_load_groups(paths)[0], {p: p for p in paths})


def test_an_instance_changed_after_streaming_falls_back(tmp_path):
    """A re-sent instance written at the same path (recovery rewrites it) no longer matches its
    slot: size and modification time are part of it."""
    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths)
    other = write_ct_series(make_ct_phantom(seed=3, shape=(12, 32, 32)), tmp_path / "other")
    shutil.copyfile(other[4], paths[4])  # a different image size under the streamed name
    volume_or_error = None
    try:
        volume_or_error = _original_load_groups(paths, allow_mixed_series=True)
    except imaging.SeriesError:
        pass
    if volume_or_error is not None:
        assert {v.pixels_from for v in volume_or_error} <= {
            "streamed 11/12; files: an instance file changed after it was streamed",
            "files: an instance file changed after it was streamed",  # the group of that one image
        }


def test_a_corrupted_volume_file_falls_back(tmp_path):
    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths)
    pixels = volumes.volume_folder(paths[0].parent) / volumes.PIXELS
    intact = pixels.read_bytes()
    data = bytearray(intact)
    data[1000] ^= 0xFF
    pixels.write_bytes(bytes(data))
    volume = _original_load_groups(paths)[0]
    assert volume.pixels_from == "streamed 11/12; files: a slot of the streamed volume fails its checksum"
    volumes.remove(paths[0].parent)
    _same_volume(volume, _original_load_groups(paths)[0], {p: p for p in paths})
    _stream(paths[0].parent, paths)
    pixels.write_bytes(intact[: len(intact) // 2])
    volume = _original_load_groups(paths)[0]
    assert volume.pixels_from.endswith("; files: the streamed volume is shorter than its slots say")


def test_a_torn_slot_line_counts_as_missing(tmp_path):
    """A crash while a slot line was written leaves part of a line: that instance is missing."""
    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths[:-1])
    last = volumes.stored_values(paths[-1])
    volumes.append(paths[0].parent, [(paths[-1], last)])
    slots = volumes.volume_folder(paths[0].parent) / volumes.SLOTS
    text = slots.read_bytes()
    slots.write_bytes(text[: len(text) - 20])
    assert _original_load_groups(paths)[0].pixels_from == (
        "streamed 11/12; files: an instance is not in the streamed volume yet"
    )


def test_instances_in_several_folders_are_read_from_files(tmp_path):
    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths)
    moved = tmp_path / "elsewhere" / paths[0].name
    moved.parent.mkdir()
    shutil.copyfile(paths[0], moved)
    volume = _original_load_groups([moved, *paths[1:]])[0]
    assert volume.pixels_from == "files: the instances are not in one series folder"


def test_a_compressed_series_streams_decoded(tmp_path):
    paths = _ct(tmp_path, transfer_syntax="1.2.840.10008.1.2.5")  # RLE Lossless
    assert _stream(paths[0].parent, paths)
    streamed = _original_load_groups(paths)[0]
    assert streamed.pixels_from == "streamed"
    plain = _original_load_groups(_ct(tmp_path / "plain"))[0]
    assert np.array_equal(streamed.pixels, plain.pixels)


def test_the_streamer_thread_streams_what_it_is_given(tmp_path):
    paths = _ct(tmp_path)
    streamer = VolumeStreamer()
    try:
        streamer.submit(paths[:6])
        streamer.submit(paths[6:] + [tmp_path / "series" / "gone.dcm"])
        assert streamer.wait_idle(timeout=600)
    finally:
        streamer.stop()
    assert (streamer.streamed, streamer.skipped) == (len(paths), 1)
    assert _original_load_groups(paths)[0].pixels_from == "streamed"


def test_the_streamer_decodes_while_instances_keep_arriving(tmp_path):
    """No wait for a quiet moment: a study sent in one go is decoded while it arrives, not after
    its last instance (when the analysis is already reading the files)."""
    paths = _ct(tmp_path)
    streamer = VolumeStreamer()
    try:
        streamer.submit(paths[:6])
        arriving = 0
        # Another instance every 20 ms (gone.dcm: skipped), until the first six are streamed.
        while streamer.streamed < 6 and arriving < 30000:
            streamer.submit([tmp_path / "series" / f"gone-{arriving}.dcm"])
            arriving += 1
            time.sleep(0.02)
        assert streamer.streamed == 6, "nothing was decoded while instances kept arriving"
        streamer.submit(paths[6:])
        assert streamer.wait_idle(timeout=600)
    finally:
        streamer.stop()
    assert (streamer.streamed, streamer.skipped) == (len(paths), arriving)


def test_a_killed_streamer_process_is_replaced(tmp_path):
    """The decoding process dies (kill -9): what it owed is read from files, the next instances
    go to a new one, and the receiver's side never blocks."""
    paths = _ct(tmp_path)
    streamer = VolumeStreamer()
    try:
        streamer.submit(paths[:6])
        assert streamer.wait_idle(timeout=600)
        first = streamer._child
        assert first is not None
        first.popen.kill()
        first.popen.wait()
        streamer.submit(paths[6:])
        assert streamer.wait_idle(timeout=600)
        assert streamer._child is not first
    finally:
        streamer.stop()
    assert streamer.streamed == len(paths) and streamer.skipped == 0
    assert _original_load_groups(paths)[0].pixels_from == "streamed"


def test_retention_removes_the_streamed_volume(tmp_path):

    paths = _ct(tmp_path)
    _stream(paths[0].parent, paths)
    retention._unlink(tmp_path, [str(p.relative_to(tmp_path)) for p in paths])
    assert not volumes.volume_folder(paths[0].parent).exists()
    assert not any(p.exists() for p in paths)


def test_the_streamer_leaves_room_for_what_the_receiver_must_keep(tmp_path):
    """Near the storage reserve nothing is streamed: acknowledged instances need the room."""

    paths = _ct(tmp_path)
    streamer = VolumeStreamer(reserve=sh.disk_usage(tmp_path).free)
    try:
        streamer.submit(paths)
        assert streamer.wait_idle(timeout=600)
    finally:
        streamer.stop()
    assert (streamer.streamed, streamer.skipped) == (0, len(paths))
    assert _original_load_groups(paths)[0].pixels_from == "files: no streamed volume"
