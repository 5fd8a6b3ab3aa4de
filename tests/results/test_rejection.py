"""Issue 15, item 5: IHE IOCM rejection notes, the object (dciodvfy, exact references) and which
results a re-run withdraws where (the outbox rows); the node-level test is
tests/jobs/test_iocm_rejection.py."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import select

from node.core.db import init_db, session_scope
from node.core.settings import CapabilityProfile, Settings
from node.dispatch.outbox import enqueue_results
from node.dispatch.table import DELIVERED, PENDING, Delivery
from node.jobs.lifecycle import queue_job
from tests.results.synthetic import detection_findings, segmentation_findings
from tests.results.validators import dciodvfy_errors
from workers.results import ResultContext, write_results
from workers.results.rejection import write_rejection_note
from workers.tasks import reject_superseded

ALL_PROFILES = [CapabilityProfile(), CapabilityProfile(seg=False, secondary_capture=True)]


def test_a_rejection_note_of_every_result_kind_is_valid_and_lists_exactly_them(ct, tmp_path):
    volume, ids = ct
    ctx = ResultContext(job_key="first", output_dir=tmp_path / "first", destinations=ALL_PROFILES)
    written = write_results(segmentation_findings(volume), ctx) + write_results(detection_findings(volume), ctx)
    assert {w.kind for w in written} == {"seg", "sr", "kos", "gsps", "sc", "derived"}
    note = write_rejection_note([w.path for w in written], ResultContext("again", tmp_path / "again"), "threshold")
    assert note.kind == "rejection"
    assert dciodvfy_errors(note.path) == []
    ds = pydicom.dcmread(note.path)
    assert ds.StudyInstanceUID == ids["study"] and ds.PatientID == ids["patient_id"]
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001",
        "DCM",
        "Rejected for Quality Reasons",
    )
    listed = {
        (series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    headers = [pydicom.dcmread(w.path, stop_before_pixels=True) for w in written]
    expected = {(h.SeriesInstanceUID, h.SOPInstanceUID) for h in headers}
    assert listed == expected
    referenced = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in ds.ContentSequence if "ReferencedSOPSequence" in i
    }
    assert referenced == {w.sop_instance_uid for w in written}
    # Written again: the same note (a re-delivery is idempotent at the PACS).
    again = write_rejection_note([w.path for w in written], ResultContext("again", tmp_path / "2"), "threshold")
    assert again.sop_instance_uid == note.sop_instance_uid


def test_a_re_run_rejects_what_it_superseded_once_where_it_was_acknowledged(ct, tmp_path):
    volume, _ = ct
    settings = Settings.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path}/ainode.db"},
            "storage": {"path": str(tmp_path / "store")},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                {
                    "name": "viewer",
                    "ae_title": "VIEWER",
                    "host": "127.0.0.1",
                    "port": 4243,
                    "capabilities": {"rejection_notes": False},
                },
            ],
        }
    )
    engine = init_db(settings.database.url)
    names = ["pacs", "viewer"]

    def run(supersedes: int | None, outputs_key: str):
        """A job of the same key; its results written with ``outputs_key`` (the UIDs' seed)."""
        with session_scope(engine) as session:
            job = queue_job(
                session,
                settings,
                key="study/rule/threshold",
                analysis="threshold",
                params={},
                destinations=names,
                supersedes=supersedes,
            )
            session.flush()
            ctx = ResultContext(job_key=outputs_key, output_dir=tmp_path / outputs_key)
            outputs = write_results(segmentation_findings(volume), ctx)
            notes = reject_superseded(settings, session, job, outputs)
            enqueue_results(session, job.id, outputs, names, settings=settings)
            session.flush()
            return job.id, outputs, notes

    def deliver_all():
        with session_scope(engine) as session:
            for row in session.scalars(select(Delivery)):
                row.state = DELIVERED

    def rows():
        with session_scope(engine) as session:
            return [
                (r.id, r.destination, r.kind, r.sop_instance_uid, r.rejected_by, r.state, r.path)
                for r in session.scalars(select(Delivery).order_by(Delivery.id))
            ]

    first_id, first, notes = run(None, "a")
    assert notes == []
    deliver_all()
    # The same inputs and model again: the same UIDs, nothing superseded.
    second_id, same, notes = run(first_id, "a")
    assert notes == [] and {o.sop_instance_uid for o in same} == {o.sop_instance_uid for o in first}
    # New inputs: new UIDs; the PACS gets one note of exactly the first results, the viewer none.
    third_id, third, notes = run(second_id, "c")
    assert len(notes) == 1
    [note] = [r for r in rows() if r[2] == "rejection"]
    assert note[0] == notes[0] and note[1] == "pacs" and note[5] == PENDING
    first_uids = {o.sop_instance_uid for o in first}
    assert {r[3] for r in rows() if r[4] == note[3]} == first_uids
    assert all(r[1] == "pacs" for r in rows() if r[4])
    ds = pydicom.dcmread(note[6])
    assert {
        i.ReferencedSOPInstanceUID
        for s in ds.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    } == first_uids
    deliver_all()
    # Another re-run: only the third job's results are withdrawn (the first's already were).
    _, fourth, notes = run(third_id, "d")
    assert len(notes) == 1
    [latest] = [r for r in rows() if r[0] == notes[0]]
    assert {r[3] for r in rows() if r[4] == latest[3]} == {o.sop_instance_uid for o in third}
    # Back to the first inputs: the first results stand again and are sent again.
    with session_scope(engine) as session:
        enqueue_results(session, 99, first, names, settings=settings)
    again = [r for r in rows() if r[3] in first_uids and r[1] == "pacs"]
    assert again and all(r[4] == "" and r[5] == PENDING for r in again)
    assert Path(note[6]).parent == tmp_path / "store" / "results" / f"job-{third_id}"
