"""Bad input gets a precise DICOM answer, nothing is half-written, and the node keeps serving."""

from __future__ import annotations

import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from node.core.settings import MIN_FREE_FLOOR
from node.index import Instance
from node.ingest import journal
from tests.helpers import NodeProcess
from tests.receiver.conftest import echoscu, index_count, settled, store_file, stored_files, storescu

CT = Path(get_testdata_file("CT_small.dcm"))


def _variant(folder: Path, name: str, meta_uid: str | None = None, **changes) -> Path:
    """CT_small with some attributes changed (and the file meta's instance UID, if given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(CT)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPInstanceUID = meta_uid or ds.SOPInstanceUID
        out = folder / name
        ds.save_as(out, enforce_file_format=False)
    return out


def _instance_rows(node) -> list[Instance]:
    settled(node)
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        rows = list(s.scalars(select(Instance)))
    engine.dispose()
    return rows


def _nothing_written(node) -> None:
    assert stored_files(node) == [], "a file was left in the store"
    assert index_count(node) == 0, "an index row was written"


def test_unknown_calling_ae_is_rejected_permanently(node):
    result = storescu(node, CT, aet="INTRUDER")
    assert result.returncode != 0
    assert "Rejected Permanent" in result.stderr and "Calling AE Title Not Recognized" in result.stderr
    assert "association rejected: unknown calling AE 'INTRUDER'" in node.log_text()
    _nothing_written(node)
    assert echoscu(node).returncode == 0  # still serving


def test_known_ae_from_another_address_is_rejected(tmp_path):
    peers = [{"ae_title": "STORESCU", "hosts": ["10.9.9.9"]}, {"ae_title": "ECHOSCU", "hosts": ["127.0.0.0/8"]}]
    with NodeProcess(tmp_path / "n", {"peers": peers}) as node:
        result = storescu(node, CT)
        assert "Rejected Permanent" in result.stderr
        assert "from address 127.0.0.1 not allowed" in node.log_text()
        _nothing_written(node)
        assert echoscu(node).returncode == 0  # a CIDR network entry admits ECHOSCU


def test_peer_without_store_permission_is_refused(tmp_path):
    peers = [
        {"ae_title": "STORESCU", "hosts": ["127.0.0.1"], "allow": ["echo"]},
        {"ae_title": "PYNETDICOM", "hosts": ["127.0.0.1"], "allow": ["echo"]},
    ]
    with NodeProcess(tmp_path / "n", {"peers": peers}) as node:
        assert store_file(node, CT) == 0x0124
        _nothing_written(node)


@pytest.mark.parametrize("bad_uid", ["../x", "..", "1.2.abc", "1.2." + "3" * 62, "1..2", "1.2."])
def test_bad_sop_instance_uid_fails_without_writing(node, tmp_path, bad_uid):
    path = _variant(tmp_path, "bad.dcm", SOPInstanceUID=bad_uid)
    result = storescu(node, path)
    assert "Received Store Response (Error" in result.stderr, result.stderr
    _nothing_written(node)
    assert echoscu(node).returncode == 0


def test_bad_study_uid_in_data_set_fails(node, tmp_path):
    path = _variant(tmp_path, "bad.dcm", StudyInstanceUID="../../etc")
    assert store_file(node, path) == 0xC001
    _nothing_written(node)


def test_sop_uid_mismatch_is_a900(node, tmp_path):
    path = _variant(tmp_path, "mismatch.dcm", meta_uid=generate_uid())
    assert store_file(node, path) == 0xA900
    _nothing_written(node)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.02])
def test_truncated_data_set_is_c000(node, tmp_path, keep):
    data = CT.read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    assert store_file(node, path) == 0xC000
    _nothing_written(node)
    assert store_file(node, CT) == 0x0000  # the association and the node keep working


def test_free_space_under_reserve_is_a700(tmp_path):
    with NodeProcess(tmp_path / "n", {"storage": {"min_free_bytes": "1000TiB"}}) as node:
        assert store_file(node, CT) == 0xA700
        _nothing_written(node)
        assert "A700" in node.log_text()


def _big_ct(folder: Path, rows: int = 512) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "ENOSPC1", "Full^Disk"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (rows, rows), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    out = folder / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs with room for the journal and the reserve floor, plus 768 KiB: a real disk that
    fills up (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size = (MIN_FREE_FLOOR + journal.DEFAULT_SIZE) // 1024 + 768
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_filling_up_is_a700(tmp_path, small_tmpfs):
    # min_free_bytes 0 is raised to the floor: the reserve is what keeps room to place what the
    # journal answered (with 0, answered instances found no room and were never indexed).
    overrides = {"storage": {"path": str(small_tmpfs / "store"), "min_free_bytes": 0}}
    with NodeProcess(tmp_path / "n", overrides) as node:
        first, second = _big_ct(tmp_path), _big_ct(tmp_path)  # 512 KiB each: the second cannot fit
        assert store_file(node, first) == 0x0000
        assert store_file(node, second) == 0xA700
        files = stored_files(node)
        assert len(files) == 1 and not list((node.storage / ".incoming").iterdir()), files
        assert index_count(node) == 1
        assert echoscu(node).returncode == 0


def test_identical_duplicate_changes_nothing(node):
    assert store_file(node, CT) == 0x0000
    (row,) = _instance_rows(node)
    stored = node.storage / row.path
    before = stored.stat()
    assert store_file(node, CT) == 0x0000
    (again,) = _instance_rows(node)
    after = stored.stat()
    assert (again.id, again.sha256, again.received_at) == (row.id, row.sha256, row.received_at)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(stored_files(node)) == 1


def test_duplicate_with_different_bytes_keep_first(node, tmp_path):
    assert store_file(node, CT) == 0x0000
    (row,) = _instance_rows(node)
    original = (node.storage / row.path).read_bytes()
    changed = _variant(tmp_path, "changed.dcm", SeriesDescription="CHANGED")
    assert store_file(node, changed) == 0xB006  # warning: the first copy was kept
    (after,) = _instance_rows(node)
    assert (after.path, after.sha256) == (row.path, row.sha256)
    assert (node.storage / row.path).read_bytes() == original
    assert len(stored_files(node)) == 1
    assert "first copy kept" in node.log_text()


def test_duplicate_with_different_bytes_replace(tmp_path):
    with NodeProcess(tmp_path / "n", {"node": {"duplicate_policy": "replace"}}) as node:
        assert store_file(node, CT) == 0x0000
        (row,) = _instance_rows(node)
        changed = _variant(tmp_path, "changed.dcm", SeriesDescription="CHANGED")
        assert store_file(node, changed) == 0x0000
        (after,) = _instance_rows(node)
        assert after.id == row.id and after.sha256 != row.sha256
        assert not (node.storage / row.path).exists()
        assert dcmread(node.storage / after.path).SeriesDescription == "CHANGED"
        assert len(stored_files(node)) == 1
        assert "replaced the stored copy" in node.log_text()
