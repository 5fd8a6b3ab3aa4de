"""kill -9 of `ainode serve` in the middle of a 300-instance push loses nothing acknowledged."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from node.index import Instance
from tests.helpers import NodeProcess, wait_for
from tests.receiver.conftest import settled


def _series(n: int) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.PatientName, ds.InstanceNumber = "CT", "CRASH1", "Kill^Nine", i + 1
        ds.Rows = ds.Columns = 128
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (128, 128), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _push(port: int, datasets: list[Dataset], acked: list[str], stop_on_failure: bool = True) -> None:
    """Send in order over one association; record each SOP Instance UID answered Success."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        return
    for ds in datasets:
        if not assoc.is_established:
            break
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) == 0x0000:
            acked.append(ds.SOPInstanceUID)
        elif stop_on_failure:
            break
    if assoc.is_established:
        assoc.release()


def _data_set_sha(path) -> str:
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.slow
def test_kill_minus_nine_during_push(tmp_path):
    datasets = _series(300)
    node = NodeProcess(tmp_path / "n", {"node": {"receivers": 2}}).start()
    acked: list[str] = []
    sender = threading.Thread(target=_push, args=(node.port, datasets, acked))
    sender.start()
    assert wait_for(lambda: len(acked) >= 100 or not sender.is_alive(), 300)
    node.kill()  # SIGKILL to the node and its receivers, mid-push
    sender.join()
    acknowledged = set(acked)
    assert 100 <= len(acknowledged) < 300, "the kill should land mid-push"

    node.start()
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    engine.dispose()
    # Every acknowledged instance is indexed and on disk, complete.
    missing = acknowledged - rows.keys()
    assert not missing, f"{len(missing)} acknowledged instances lost"
    for row in rows.values():
        path = node.storage / row.path
        assert path.is_file() and path.stat().st_size == row.size_bytes
        assert _data_set_sha(path) == row.sha256, "a stored file is not what its row says"
    # No half-written files anywhere in the store (temp files were cleaned at start).
    assert not list((node.storage / ".incoming").iterdir())
    for path in node.storage.rglob("*.dcm"):
        _data_set_sha(path)  # every file left parses up to its end

    # The sender retries what was not acknowledged: all of it succeeds.
    retry = [ds for ds in datasets if ds.SOPInstanceUID not in acknowledged]
    again: list[str] = []
    _push(node.port, retry, again, stop_on_failure=False)
    assert len(again) == len(retry)
    settled(node)
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        assert len(list(s.scalars(select(Instance.id)))) == 300
    engine.dispose()
    assert node.stop() == 0


def _multiframe(frames: int) -> Dataset:
    """One large instance (512x512 16-bit frames): received straight into a file, not the journal."""
    ds = _series(1)[0]
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(3).integers(0, 4096, (frames, 512, 512), dtype=np.uint16).tobytes()
    return ds


@pytest.mark.slow
def test_kill_minus_nine_between_success_and_index_row(tmp_path):
    """Success answers wait for durability, not for the index row: kill the node while every
    answered instance is still unindexed (the index is locked), restart, and each is indexed
    from the journal or the landing folder, placed, and taken up by the later stages."""
    import sqlite3

    datasets = _series(40)
    big = _multiframe(40)  # 20 MiB: over the journal's per-instance limit
    big.StudyInstanceUID, big.SeriesInstanceUID = datasets[0].StudyInstanceUID, generate_uid()
    overrides = {"node": {"receivers": 1}, "timers": {"series_quiet_s": 1, "study_quiet_s": 1}}
    node = NodeProcess(tmp_path / "n", overrides).start()
    lock = sqlite3.connect(node.database_url.split("///", 1)[1], timeout=30, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the index takes no writes: rows cannot be committed
    try:
        acked: list[str] = []
        _push(node.port, datasets + [big], acked)
        assert len(acked) == 41, "every instance is answered Success without its index row"
        assert lock.execute("select count(*) from instances").fetchone()[0] == 0
        assert list((node.storage / ".landed").iterdir()), "the large instance waits in the landing folder"
    finally:
        node.kill()  # SIGKILL: the receivers die with their answered, unindexed instances
        lock.execute("ROLLBACK")
        lock.close()

    node.start()  # the node indexes what it finds before it listens again
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance))}
    assert rows.keys() == set(acked), "every acknowledged instance is indexed after the restart"
    log = node.log_text()
    assert "40 instance(s) answered before a restart were indexed from journal" in log, log[-3000:]
    assert "1 instance(s) answered before a restart were indexed from the landing folder" in log
    for ds in datasets + [big]:
        row = rows[ds.SOPInstanceUID]
        path = node.storage / row.path
        assert path.is_file() and path.stat().st_size == row.size_bytes
        assert _data_set_sha(path) == row.sha256
    settled(node)
    assert not list((node.storage / ".landed").iterdir())
    # ...and taken up by the next stages: the study completes on its quiet timer.
    from node.index import Study

    def study_state() -> str:
        with Session(engine) as s:
            return s.scalar(select(Study.state).where(Study.study_uid == datasets[0].StudyInstanceUID))

    assert wait_for(lambda: study_state() != "received", 60), study_state()
    with Session(engine) as s:
        study = s.scalar(select(Study).where(Study.study_uid == datasets[0].StudyInstanceUID))
        assert study.instance_count == 41
    engine.dispose()
    assert node.stop() == 0
