"""The node as deployed: `ainode serve` receiving from DCMTK storescu / pynetdicom (MPPS), a real
Redis and `ainode worker`, and kill -9 of the node between the last acknowledgement and job creation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep
from sqlalchemy import create_engine, text

from tests.helpers import NodeProcess, wait_for
from tests.jobs.conftest import ROOT, Worker, env_for_children

pytestmark = pytest.mark.slow

RULES = [{"name": "ct-count", "match": {"modality": "CT"}, "analyses": ["count-instances"]}]


def make_ct_study(folder: Path, n: int = 5) -> list[Dataset]:
    """A small synthetic CT series written to folder (and returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality, ds.InstanceNumber = "E2E^Patient", "E2E1", "CT", i + 1
        ds.StudyDescription, ds.SliceThickness = "CT E2E", 1.0
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((16, 16), i, dtype=np.uint16).tobytes()
        pydicom.dcmwrite(folder / f"{i:03d}.dcm", ds, enforce_file_format=True)
        out.append(ds)
    return out


def storescu(node: NodeProcess, folder: Path) -> None:
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
        check=True,
        capture_output=True,
        timeout=300,
    )


def query(node: NodeProcess, sql: str, **params) -> list[tuple]:
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params).all()]
    finally:
        engine.dispose()


def job_states(node: NodeProcess, study_uid: str) -> list[tuple]:
    return query(node, "SELECT state, attempts, result FROM jobs WHERE study_uid = :u", u=study_uid)


def test_study_from_storescu_is_routed_and_run_by_a_worker(tmp_path, redis_server):
    node = NodeProcess(
        tmp_path / "node",
        {"broker": {"url": redis_server.url}, "rules": RULES, "timers": {"series_quiet_s": 1, "study_quiet_s": 2}},
    )
    with node:
        worker = Worker(node.config_path)
        try:
            study = make_ct_study(tmp_path / "study", 5)
            storescu(node, tmp_path / "study")
            uid = study[0].StudyInstanceUID
            assert wait_for(lambda: [s for s, *_ in job_states(node, uid)] == ["succeeded"], 180), (
                node.log_text()[-3000:] + worker.output()[-3000:]
            )
            [(state, attempts, result)] = job_states(node, uid)
            assert attempts == 1 and '"instances": 5' in result
            assert query(node, "SELECT state, ready_reason FROM studies WHERE study_uid = :u", u=uid) == [
                ("done", "quiet-timer")
            ]
        finally:
            worker.stop()
    assert "E2E^Patient" not in node.log_text() and "E2E1" not in node.log_text()


def test_mpps_completed_makes_the_study_ready_before_the_quiet_timer(tmp_path):
    # Quiet timers of 10 minutes: only MPPS can make this study ready while the test runs.
    node = NodeProcess(
        tmp_path / "node",
        {"rules": RULES, "timers": {"series_quiet_s": 600, "study_quiet_s": 600, "force_complete_s": 3600}},
    )
    with node:
        study = make_ct_study(tmp_path / "study", 4)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        step = generate_uid()
        create = Dataset()
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        item = Dataset()
        item.StudyInstanceUID = study[0].StudyInstanceUID
        create.ScheduledStepAttributesSequence = [item]
        assert assoc.send_n_create(create, ModalityPerformedProcedureStep, step)[0].Status == 0
        for ds in study:
            assert assoc.send_c_store(ds).Status == 0
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        series = Dataset()
        series.SeriesInstanceUID = study[0].SeriesInstanceUID
        refs = []
        for ds in study:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            refs.append(ref)
        series.ReferencedImageSequence = refs
        done.PerformedSeriesSequence = [series]
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, step)[0].Status == 0
        assoc.release()
        uid = study[0].StudyInstanceUID
        assert wait_for(lambda: [s for s, *_ in job_states(node, uid)] == ["succeeded"], 180), node.log_text()[-3000:]
        assert query(node, "SELECT ready_reason FROM studies WHERE study_uid = :u", u=uid) == [("mpps-completed",)]


def test_node_killed_after_the_last_ack_still_processes_the_study(tmp_path):
    node = NodeProcess(tmp_path / "node", {"rules": RULES, "timers": {"series_quiet_s": 5, "study_quiet_s": 8}})
    node.start()
    try:
        study = make_ct_study(tmp_path / "study", 3)
        storescu(node, tmp_path / "study")
        node.kill()  # kill -9: every instance was acknowledged, the quiet timer has not fired
        uid = study[0].StudyInstanceUID
        # Success means durable (the receiver's journal); the index row may trail the answer by
        # a batch, so at this point 0-3 rows exist, and no job does.
        assert query(node, "SELECT count(*) FROM instances")[0][0] <= 3
        assert job_states(node, uid) == []
        node.start()  # indexes whatever the kill left in the journal, then the timers run
        assert wait_for(lambda: [s for s, *_ in job_states(node, uid)] == ["succeeded"], 180), node.log_text()[-3000:]
        assert query(node, "SELECT count(*) FROM instances") == [(3,)]
        [(state, attempts, result)] = job_states(node, uid)
        assert '"instances": 3' in result
    finally:
        node.stop()


def test_rules_reload_on_sighup_without_restarting_the_node(tmp_path):
    import signal

    import yaml

    node = NodeProcess(
        tmp_path / "node",
        {
            "rules": [{"name": "mr-only", "match": {"modality": "MR"}, "analyses": ["count-instances"]}],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    with node:
        # The port opens before the stages start; SIGHUP is handled once the rules are in force.
        assert wait_for(lambda: "rules in force" in node.log_text(), 120), node.log_text()[-3000:]
        config = yaml.safe_load(node.config_path.read_text())
        # An invalid edit: the node logs each error with its line and keeps the rules in force.
        config["rules"].append({"name": "broken", "level": "sometimes", "analyses": ["count-instances"]})
        node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        node.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "rules not reloaded" in node.log_text(), 60), node.log_text()[-3000:]
        assert f"{node.config_path}:" in node.log_text() and "rules[1].level" in node.log_text()
        config["rules"][1] = {"name": "ct-now", "match": {"modality": "CT"}, "analyses": ["count-instances"]}
        node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        node.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "rules reloaded" in node.log_text(), 60), node.log_text()[-3000:]
        assert node.proc.poll() is None
        study = make_ct_study(tmp_path / "study", 2)
        storescu(node, tmp_path / "study")
        uid = study[0].StudyInstanceUID
        assert wait_for(lambda: [s for s, *_ in job_states(node, uid)] == ["succeeded"], 180), node.log_text()[-3000:]
        assert query(node, "SELECT rule FROM jobs WHERE study_uid = :u", u=uid) == [("ct-now",)]
        status = subprocess.run(
            [sys.executable, "-m", "node.cli", "status", "-c", str(node.config_path), "--json"],
            cwd=ROOT,
            env=env_for_children(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = json.loads(status.stdout)
        assert report["jobs"]["jobs"]["succeeded"] == 1 and report["assembler"]["studies_done"] == 1


def test_node_killed_mid_job_reruns_it_after_restart(tmp_path):
    # Embedded worker, a one-hour heartbeat timeout: the re-run comes from knowing the old
    # process is gone, not from waiting out the timeout.
    record = tmp_path / "completions.txt"
    node = NodeProcess(
        tmp_path / "node",
        {
            "rules": [
                {
                    "name": "ct-sleep",
                    "match": {"modality": "CT"},
                    "analyses": [{"name": "sleep", "params": {"seconds": 4, "record": str(record)}}],
                }
            ],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
            "jobs": {"heartbeat_timeout_s": 3600},
        },
    )
    node.start()
    try:
        study = make_ct_study(tmp_path / "study", 2)
        storescu(node, tmp_path / "study")
        uid = study[0].StudyInstanceUID
        assert wait_for(lambda: [s for s, *_ in job_states(node, uid)] == ["running"], 180), node.log_text()[-3000:]
        node.kill()
        node.start()
        assert wait_for(lambda: [s for s, *_ in job_states(node, uid)] == ["succeeded"], 180), node.log_text()[-3000:]
        [(state, attempts, result)] = job_states(node, uid)
        assert attempts == 2 and len(record.read_text().splitlines()) == 1
    finally:
        node.stop()
