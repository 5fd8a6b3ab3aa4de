"""Nothing answered Success is left unindexed (issue 19, item 4).

Values the index's columns cannot hold are fitted when the instance is received (the file keeps
its bytes); journal recovery quarantines the one record the index refuses and indexes the rest;
a journal that cannot be preallocated is said loudly and instances are refused with A700; and
``storage.min_free_bytes`` has a floor. Real PostgreSQL, real DCMTK storescu, real node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, select, text

from node.core.db import init_db
from node.core.settings import MIN_FREE_FLOOR, Settings
from node.index import Instance, Patient
from node.ingest import journal
from node.ingest.index_values import index_values
from node.ingest.quarantine import FOLDER
from node.ingest.wire import file_meta, read_header
from tests.helpers import REPO_ROOT, NodeProcess, wait_for
from tests.receiver.conftest import echoscu, index_count, settled

STORESCU = "/usr/bin/storescu"
NUL_NAME = "Null\x00^Byte"


def _instance(study: str, series: str, number: str = "1", name: str = "Odd^Values", **raw: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID = "CT", "ODD1"
    # Raw values as a modality may send them (the VR's rules broken): written as they are.
    ds.add(DataElement(0x00100010, "PN", name))
    ds.add(DataElement(0x00200013, "IS", number))
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(fp, ds)
    return fp.getvalue()


def _push(node: NodeProcess, *files: Path) -> subprocess.CompletedProcess:
    cmd = [STORESCU, "-v", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True)


def _instance_numbers(url: str) -> dict[str, int | None]:
    engine = create_engine(url)
    with engine.connect() as conn:
        found = dict(conn.execute(select(Instance.sop_instance_uid, Instance.instance_number)).all())
    engine.dispose()
    return found


def _status(node: NodeProcess) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "-c", str(node.config_path), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _header(*elements: DataElement):
    ds = Dataset()
    for element in elements:
        ds.add(element)
    return read_header(memoryview(_encoded(ds)), ExplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken VR rules
@pytest.mark.parametrize(
    "number, indexed", [("2147483647", 2147483647), ("-2147483648", -(2**31)), ("2147483648", None), ("1e3", 1000)]
)
def test_integers_outside_the_column_are_indexed_empty(number, indexed):
    assert index_values(_header(DataElement(0x00200013, "IS", number))).instance["instance_number"] == indexed


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_text_is_fitted_to_its_column():
    long_description = "A" * 80 + "\x00"
    fitted = index_values(
        _header(
            DataElement(0x00081030, "LO", long_description),
            DataElement(0x00100010, "PN", "Line\r\nBreak^\x00Nul"),
            DataElement(0x00180050, "DS", "1e999"),
        )
    )
    assert fitted.study["description"] == "A" * 64  # String(64)
    assert fitted.patient["name"] == "LineBreak^Nul"
    assert fitted.series["slice_thickness"] is None


def test_iso_2022_text_is_decoded_not_taken_as_ascii():
    # 7-bit bytes with escape sequences: only the character set says what they are.
    fitted = index_values(
        _header(
            DataElement(0x00080005, "CS", ["", "ISO 2022 IR 87"]),
            DataElement(0x00100010, "PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        )
    )
    assert fitted.patient["name"] == "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"


def test_odd_values_are_answered_success_and_indexed_on_postgresql(tmp_path, postgres_url):
    study, series = generate_uid(), generate_uid()
    big = _instance(study, series, number="9999999999")  # over PostgreSQL's INTEGER
    nul = _instance(study, series, number="2", name=NUL_NAME)  # PostgreSQL text holds no NUL
    files = [_save(big, tmp_path / "big.dcm"), _save(nul, tmp_path / "nul.dcm")]
    with NodeProcess(tmp_path / "n", {"database": {"url": postgres_url}}) as node:
        result = _push(node, *files)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr.count("Received Store Response (Success)") == 2, result.stderr[-2000:]
        assert index_count(node) == 2, "answered Success but not indexed"
        numbers = _instance_numbers(postgres_url)
        assert numbers == {big.SOPInstanceUID: None, nul.SOPInstanceUID: 2}
        engine = create_engine(postgres_url)
        with engine.connect() as conn:
            assert conn.execute(select(Patient.name)).scalars().all() == ["Odd^Values"]
        engine.dispose()
        # The stored files keep every byte as received; only the index holds fitted values.
        stored = sorted(p.read_bytes() for p in node.storage.rglob("*.dcm") if FOLDER not in p.parts)
        assert any(b"9999999999" in data for data in stored) and any(b"Null\x00^Byte" in data for data in stored)
        assert "not indexed yet" not in node.log_text()


def _poison(url: str, sop_instance_uid: str) -> None:
    """A row PostgreSQL refuses (as it refuses any value out of its type): a trigger raising
    a data exception (SQLSTATE 22003) for one SOP Instance UID."""
    init_db(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.sop_instance_uid = '{sop_instance_uid}' THEN "
                "RAISE EXCEPTION 'value out of range' USING ERRCODE = '22003'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(text("CREATE TRIGGER poison BEFORE INSERT ON instances FOR EACH ROW EXECUTE FUNCTION poison()"))
    engine.dispose()


def test_journal_recovery_quarantines_the_bad_record_and_indexes_its_neighbours(tmp_path, postgres_url):
    study, series = generate_uid(), generate_uid()
    normal = [_instance(study, series, number=str(i)) for i in range(1, 11)]
    odd = _instance(study, series, number="9999999999", name=NUL_NAME)  # fitted, indexed
    poisoned = _instance(study, series, number="12")  # refused by the database
    unreadable = _instance(study, series, number="13")  # its data set names another instance
    _poison(postgres_url, poisoned.SOPInstanceUID)
    node = NodeProcess(tmp_path / "n", {"database": {"url": postgres_url}})
    # What a receiver killed after answering these (before indexing them) leaves in its journal.
    jrnl, _ = journal.Journal.open(node.storage / journal.FOLDER / "r0-journal.wal")
    payloads = {}
    for ds in normal[:5] + [poisoned, odd, unreadable] + normal[5:]:
        meta = file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "STORESCU")
        if ds is unreadable:
            meta = file_meta(CTImageStorage, generate_uid(), ExplicitVRLittleEndian, "STORESCU")
        data = _encoded(ds)
        jrnl.append(meta, data)
        payloads[ds.SOPInstanceUID] = meta + data
    jrnl.close()

    with node:
        numbers = _instance_numbers(postgres_url)
        expected = {ds.SOPInstanceUID for ds in normal + [odd]}
        assert set(numbers) == expected, "the records around the bad one are indexed"
        assert numbers[odd.SOPInstanceUID] is None
        settled(node)  # no journal record left live: the journal is in use, not stranded
        quarantined = sorted((node.storage / FOLDER).glob("*.dcm"))
        assert len(quarantined) == 2
        contents = {p.read_bytes() for p in quarantined}
        assert contents == {payloads[poisoned.SOPInstanceUID], payloads[unreadable.SOPInstanceUID]}
        reasons = [json.loads(p.with_suffix(".json").read_text())["reason"] for p in quarantined]
        assert any("DataError" in r for r in reasons) and any("cannot be read back" in r for r in reasons), reasons
        log = node.log_text()
        assert "answered Success cannot be indexed" in log
        assert "Null" not in log, "patient data in the log"
        assert wait_for(lambda: (node.workdir / "audit.log").read_text().count("quarantined") >= 2, 30)
        alerts = _status(node)["alerts"]
        assert "2 instance(s) answered Success could not be indexed" in alerts["instances_quarantined"]
        # The node keeps receiving into its journal.
        late = _save(_instance(study, series, number="20"), tmp_path / "late.dcm")
        assert "Received Store Response (Success)" in _push(node, late).stderr
        assert index_count(node) == 12


def test_min_free_bytes_zero_is_raised_to_the_floor():
    assert Settings.model_validate({"storage": {"min_free_bytes": 0}}).storage.min_free_bytes == MIN_FREE_FLOOR
    assert Settings.model_validate({"storage": {"min_free_bytes": "1GiB"}}).storage.min_free_bytes == 1024**3


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of a given size (needs root; skipped where mounting is not allowed)."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        if (
            shutil.which("mount") is None
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
            ).returncode
        ):
            pytest.skip("cannot mount a tmpfs here (not root)")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_journal_that_does_not_fit_is_said_and_instances_are_refused(tmp_path, tmpfs):
    """300 MiB free: over the reserve (min_free_bytes 0, raised to the 256 MiB floor), but not
    with a 64 MiB journal preallocated. The node says so at start and refuses with A700."""
    disk = tmpfs("300m")
    overrides = {"storage": {"path": str(disk / "store"), "min_free_bytes": 0}}
    with NodeProcess(tmp_path / "n", overrides) as node:
        path = _save(_instance(generate_uid(), generate_uid()), tmp_path / "one.dcm")
        result = _push(node, path)
        assert "Received Store Response (Refused: OutOfResources)" in result.stderr, result.stderr[-2000:]
        log = node.log_text()
        assert "journal r0-journal.wal unavailable" in log and "min_free_bytes" in log, log[-3000:]
        assert not (node.storage / journal.FOLDER / "r0-journal.wal").exists(), "the journal filled the disk"
        assert "journal_unavailable r0-journal.wal" in _status(node)["alerts"]
        assert echoscu(node).returncode == 0


def test_an_answered_instance_the_database_refuses_is_quarantined_not_retried_forever(tmp_path, postgres_url):
    study, series = generate_uid(), generate_uid()
    poisoned, normal = _instance(study, series, number="1"), _instance(study, series, number="2")
    _poison(postgres_url, poisoned.SOPInstanceUID)
    files = [_save(poisoned, tmp_path / "poisoned.dcm"), _save(normal, tmp_path / "normal.dcm")]
    with NodeProcess(tmp_path / "n", {"database": {"url": postgres_url}}) as node:
        result = _push(node, *files)
        assert result.stderr.count("Received Store Response (Success)") == 2, result.stderr[-2000:]
        assert wait_for(lambda: len(list((node.storage / FOLDER).glob("*.dcm"))) == 1, 120), node.log_text()[-3000:]
        assert set(_instance_numbers(postgres_url)) == {normal.SOPInstanceUID}
        settled(node)  # its journal record is retired: the ring does not fill up behind it
        assert "instances_quarantined" in _status(node)["alerts"]
