"""Study completion (timers, MPPS, late arrivals), routing into jobs, and retention, against the database."""

from __future__ import annotations

import logging
from datetime import timedelta

from pydicom.dataset import Dataset
from sqlalchemy import select

from node import assembler, retention
from node.core import audit
from node.core.clock import utcnow
from node.core.db import engine_for, session_scope
from node.core.settings import AuditSettings
from node.index import Instance, Series, Study
from node.ingest import mpps
from node.jobs.table import QUEUED, Job, status_summary
from tests.jobs.conftest import add_study
from tests.ops.atna import assert_valid

CT_RULE = {"name": "ct-count", "match": {"modality": "CT"}, "analyses": ["count-instances"], "priority": "stat"}


def _study(settings, uid):
    with session_scope(engine_for(settings.database.url)) as session:
        study = session.scalar(select(Study).where(Study.study_uid == uid))
        if study is not None:
            session.expunge(study)
        return study


def _jobs(settings):
    with session_scope(engine_for(settings.database.url)) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        for j in jobs:
            session.expunge(j)
        return jobs


def test_quiet_timer_makes_a_study_ready_and_routes_it(make_settings):
    settings = make_settings(rules=[CT_RULE])
    add_study(settings, study_uid="1.2.3.100", age=timedelta(seconds=1))  # quiet 1 s < 2 s setting
    add_study(settings, study_uid="1.2.3.101", age=timedelta(seconds=3))
    assembler.tick(settings)
    assert _study(settings, "1.2.3.100").state == "received"
    waited = _study(settings, "1.2.3.101")
    assert waited.state == "routed" and waited.ready_reason == "quiet-timer"
    jobs = _jobs(settings)
    assert [(j.analysis, j.state, j.priority, j.study_uid) for j in jobs] == [
        ("count-instances", QUEUED, "stat", "1.2.3.101")
    ]
    # Embedded mode: the job table is the queue; "published" only records the task id.
    assert jobs[0].task_id == f"job-{jobs[0].id}-1"


def test_forced_completion_while_instances_keep_coming(make_settings):
    settings = make_settings(timers={"series_quiet_s": 1, "study_quiet_s": 30, "force_complete_s": 5}, rules=[CT_RULE])
    add_study(settings, study_uid="1.2.3.110", age=timedelta(seconds=0), first_age=timedelta(seconds=6))
    assembler.complete_studies(settings)
    assert _study(settings, "1.2.3.110").ready_reason == "forced-complete"


def test_rule_timer_override_applies_to_matching_studies(make_settings):
    fast = dict(CT_RULE, name="fast-ct", timers={"series_quiet_s": 0.5, "study_quiet_s": 0.5, "force_complete_s": 60})
    settings = make_settings(rules=[fast])
    add_study(settings, study_uid="1.2.3.120", age=timedelta(seconds=1))
    add_study(settings, study_uid="1.2.3.121", modality="MR", age=timedelta(seconds=1))
    assembler.complete_studies(settings)
    assert _study(settings, "1.2.3.120").state == "ready"
    assert _study(settings, "1.2.3.121").state == "received"  # global 2 s still applies to MR


def test_unrouted_study_is_logged_without_patient_data_then_removed(make_settings, caplog):
    settings = make_settings(rules=[CT_RULE], storage={"path": "store", "unrouted_retention_h": 0.0001})
    pk = add_study(settings, study_uid="1.2.3.130", modality="MR", age=timedelta(seconds=5))
    with caplog.at_level(logging.INFO):
        assembler.tick(settings)
    assert _study(settings, "1.2.3.130").state == "unrouted"
    text = caplog.text
    assert f"study {pk} unrouted" in text and "modality: 'MR' is not equal to 'CT'" in text
    assert "Test^Patient" not in text and "P-3.130" not in text
    # The retention is 0.36 s: after it the study, its rows and files are gone.
    storage = settings.storage.path
    with session_scope(engine_for(settings.database.url)) as session:
        rel = session.scalars(select(Instance.path)).first()
    (storage / rel).parent.mkdir(parents=True, exist_ok=True)
    (storage / rel).write_bytes(b"x")
    import time

    time.sleep(0.5)
    assert retention.apply_retention(settings)["unrouted"] == 1
    with session_scope(engine_for(settings.database.url)) as session:
        assert session.scalar(select(Study).where(Study.study_uid == "1.2.3.130")) is None
        assert not session.scalars(select(Instance)).all()
    assert not (storage / rel).exists()


def test_retention_keeps_studies_with_pending_jobs(make_settings):
    settings = make_settings(rules=[CT_RULE], storage={"path": "store", "retention_days": 0.000001})
    add_study(settings, study_uid="1.2.3.140", age=timedelta(seconds=5))
    assembler.tick(settings)
    assert _study(settings, "1.2.3.140").state == "routed"
    assert retention.apply_retention(settings) == {"unrouted": 0, "expired": 0, "high_water": 0}
    assert _study(settings, "1.2.3.140") is not None


def test_late_arrival_reruns_the_analysis_and_supersedes(make_settings):
    settings = make_settings(rules=[CT_RULE])
    pk = add_study(settings, study_uid="1.2.3.150", age=timedelta(seconds=5))
    assembler.tick(settings)
    first = _jobs(settings)[0]
    # Same inputs again (e.g. a duplicate store of a known instance): no new job.
    with session_scope(engine_for(settings.database.url)) as session:
        session.get(Study, pk).last_received_at = utcnow()
    assembler.tick(settings)
    assert _study(settings, "1.2.3.150").state == "received"
    with session_scope(engine_for(settings.database.url)) as session:
        session.get(Study, pk).last_received_at = utcnow() - timedelta(seconds=5)
    assembler.tick(settings)
    assert len(_jobs(settings)) == 1
    # A new instance arrives after routing: the study completes again and the job is re-run.
    with session_scope(engine_for(settings.database.url)) as session:
        series = session.scalars(select(Series).where(Series.study_pk == pk)).first()
        session.add(
            Instance(
                sop_instance_uid="1.2.3.150.1.99",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_pk=series.id,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="x/late",
                size_bytes=1,
                sha256="0" * 64,
            )
        )
        series.last_received_at = utcnow()
        session.get(Study, pk).last_received_at = utcnow()
    assembler.tick(settings)
    assert _study(settings, "1.2.3.150").state == "received"
    with session_scope(engine_for(settings.database.url)) as session:
        session.get(Study, pk).last_received_at = utcnow() - timedelta(seconds=5)
    assembler.tick(settings)
    jobs = _jobs(settings)
    assert len(jobs) == 2
    assert jobs[1].supersedes_job_id == first.id and jobs[1].input_fingerprint != first.input_fingerprint


def test_series_level_rule_fires_per_series_on_expected_count(make_settings):
    rule = {"name": "per-series", "level": "series", "match": {"modality": "CT"}, "analyses": ["count-instances"]}
    settings = make_settings(rules=[rule], timers={"series_quiet_s": 60, "study_quiet_s": 120, "force_complete_s": 600})
    pk = add_study(settings, study_uid="1.2.3.160", series=2, instances=2)
    # The data of series 1 says "2 images in acquisition": it is complete without waiting.
    import pydicom
    from pydicom.dataset import FileMetaDataset

    with session_scope(engine_for(settings.database.url)) as session:
        s1 = session.scalars(select(Series).where(Series.study_pk == pk).order_by(Series.id)).first()
        rel = session.scalars(select(Instance.path).where(Instance.series_pk == s1.id)).first()
    ds = Dataset()
    ds.ImagesInAcquisition = 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    path = settings.storage.path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assembler.tick(settings)
    jobs = _jobs(settings)
    assert [(j.level, j.series_uid) for j in jobs] == [("series", "1.2.3.160.1")]
    assert _study(settings, "1.2.3.160").state == "received"


def _mpps_create(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    item = Dataset()
    item.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = [item]
    return ds


def _mpps_completed(series_uid: str, sop_uids: list[str], status: str = "COMPLETED") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    refs = []
    for uid in sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series.ReferencedImageSequence = refs
    ds.PerformedSeriesSequence = [series]
    return ds


def test_mpps_completed_makes_ready_only_when_every_listed_instance_arrived(make_settings):
    settings = make_settings(
        rules=[CT_RULE], timers={"series_quiet_s": 60, "study_quiet_s": 120, "force_complete_s": 600}
    )
    add_study(settings, study_uid="1.2.3.170", instances=3)
    listed = [f"1.2.3.170.1.{i}" for i in (1, 2, 3, 4)]  # the 4th has not arrived yet
    with session_scope(engine_for(settings.database.url)) as session:
        assert mpps.create_step(session, "9.9.1", _mpps_create("1.2.3.170"), "CT01") == mpps.SUCCESS
        assert mpps.create_step(session, "9.9.1", _mpps_create("1.2.3.170"), "CT01") == mpps.DUPLICATE_SOP_INSTANCE
        assert mpps.set_step(session, "9.9.1", _mpps_completed("1.2.3.170.1", listed)) == mpps.SUCCESS
        assert mpps.set_step(session, "9.9.1", _mpps_completed("1.2.3.170.1", listed)) == mpps.MAY_NO_LONGER_BE_UPDATED
        assert mpps.set_step(session, "9.9.404", _mpps_completed("1.2.3.170.1", listed)) == mpps.NO_SUCH_OBJECT_INSTANCE
    assembler.tick(settings)
    assert _study(settings, "1.2.3.170").state == "received"
    with session_scope(engine_for(settings.database.url)) as session:
        series = session.scalar(select(Series).where(Series.series_uid == "1.2.3.170.1"))
        session.add(
            Instance(
                sop_instance_uid=listed[3],
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_pk=series.id,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="x/4",
                size_bytes=1,
                sha256="0" * 64,
            )
        )
    assembler.tick(settings)
    study = _study(settings, "1.2.3.170")
    assert study.state == "routed" and study.ready_reason == "mpps-completed"


def test_mpps_discontinued_leaves_it_to_the_timers(make_settings):
    settings = make_settings(
        rules=[CT_RULE], timers={"series_quiet_s": 60, "study_quiet_s": 120, "force_complete_s": 600}
    )
    add_study(settings, study_uid="1.2.3.180", instances=1)
    with session_scope(engine_for(settings.database.url)) as session:
        mpps.create_step(session, "9.9.2", _mpps_create("1.2.3.180"), "CT01")
        assert mpps.set_step(session, "9.9.2", _mpps_completed("1.2.3.180.1", ["1.2.3.180.1.1"], "DISCONTINUED")) == 0
        bad = _mpps_create("1.2.3.180")
        bad.PerformedProcedureStepStatus = "COMPLETED"
        assert mpps.create_step(session, "9.9.3", bad, "CT01") == mpps.INVALID_ATTRIBUTE_VALUE
    assembler.tick(settings)
    assert _study(settings, "1.2.3.180").state == "received"


def test_status_summary_counts_jobs_and_lists_dead_ones(make_settings):
    settings = make_settings(rules=[CT_RULE])
    add_study(settings, study_uid="1.2.3.190", age=timedelta(seconds=5))
    assembler.tick(settings)
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.scalars(select(Job)).first()
        job.state, job.error, job.attempts = "dead", "RuntimeError: boom (after 3 attempts)", 3
    with session_scope(engine_for(settings.database.url)) as session:
        summary = status_summary(session)
    assert summary["jobs"]["dead"] == 1 and summary["jobs"]["queued"] == 0
    assert summary["dead"][0]["error"].startswith("RuntimeError: boom")


def test_high_water_mark_removes_the_oldest_finished_studies_first(make_settings):
    # A mark no disk is below: every finished study goes, oldest first; one still waiting stays.
    settings = make_settings(
        rules=[CT_RULE], storage={"path": "store", "high_water_mark": 0.000001, "retention_days": 0}
    )
    for uid, age in (("1.2.3.201", 50), ("1.2.3.202", 40)):
        add_study(settings, study_uid=uid, age=timedelta(seconds=age))
    add_study(settings, study_uid="1.2.3.203", age=timedelta(seconds=0))
    assembler.tick(settings)
    with session_scope(engine_for(settings.database.url)) as session:
        for job in session.scalars(select(Job)):
            job.state = "succeeded"
        for study in session.scalars(select(Study).where(Study.state == "routed")):
            study.state = "done"
    assert retention.apply_retention(settings) == {"unrouted": 0, "expired": 0, "high_water": 2}
    assert _study(settings, "1.2.3.201") is None and _study(settings, "1.2.3.202") is None
    assert _study(settings, "1.2.3.203").state == "received"
    # The jobs stay as the record of what ran; they no longer point at removed rows.
    assert {j.study_pk for j in _jobs(settings)} == {None}


def test_a_reopened_study_is_forced_complete_only_after_force_complete_s_from_its_reopening(make_settings):
    settings = make_settings(timers={"series_quiet_s": 1, "study_quiet_s": 30, "force_complete_s": 5}, rules=[CT_RULE])
    # Done long ago (first arrival 60 s back), then a late instance a moment ago.
    pk = add_study(settings, study_uid="1.2.3.160", age=timedelta(seconds=50), first_age=timedelta(seconds=60))
    with session_scope(engine_for(settings.database.url)) as session:
        study = session.get(Study, pk)
        study.state, study.ready_at = "done", utcnow() - timedelta(seconds=45)
        study.last_received_at = utcnow()
    assembler.complete_studies(settings)
    reopened = _study(settings, "1.2.3.160")
    assert reopened.state == "received" and reopened.reopened_at is not None
    # Force-complete counts from the reopening: 5 s later, not at once.
    with session_scope(engine_for(settings.database.url)) as session:
        session.get(Study, pk).reopened_at = utcnow() - timedelta(seconds=6)
    assembler.complete_studies(settings)
    assert _study(settings, "1.2.3.160").ready_reason == "forced-complete"


def test_each_study_retention_removes_is_audited_with_its_patient(make_settings, tmp_path, monkeypatch, caplog):
    """DICOM Study Deleted (PS3.15 A.5.3.6, action D) per removed study, naming the study and its
    patient, valid against the DICOM audit schema; the log still names no patient."""
    settings = make_settings(rules=[CT_RULE], storage={"path": "store", "retention_days": 0.000001})
    add_study(settings, study_uid="1.2.3.210", age=timedelta(seconds=5), instances=4)
    assembler.tick(settings)
    with session_scope(engine_for(settings.database.url)) as session:
        for job in session.scalars(select(Job)):
            job.state = "succeeded"
        session.scalar(select(Study).where(Study.study_uid == "1.2.3.210")).state = "done"
    monkeypatch.setattr(audit, "_trail", None)
    trail = audit.configure(AuditSettings(sink="file", path=tmp_path / "audit.log"), settings.node.ae_title)
    with caplog.at_level(logging.INFO):
        assert retention.apply_retention(settings)["expired"] == 1
    trail.close()
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    message = assert_valid(line)
    event = message.find("EventIdentification")
    assert event.get("EventActionCode") == "D" and event.find("EventID").get("csd-code") == "110105"
    objects = {o.get("ParticipantObjectTypeCodeRole"): o for o in message.findall("ParticipantObjectIdentification")}
    assert objects["3"].get("ParticipantObjectID") == "1.2.3.210"
    assert objects["1"].get("ParticipantObjectID") == "P-.3.210"  # add_study: "P-" + the UID's last 6
    assert objects["1"].find("ParticipantObjectName").text == "Test^Patient"
    assert "retention passed" in event.find("EventOutcomeDescription").text
    assert "Test^Patient" not in caplog.text and "P-.3.210" not in caplog.text
