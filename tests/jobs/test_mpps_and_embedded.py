"""MPPS over a real association (pynetdicom SCU) and the embedded broker + in-process worker."""

from __future__ import annotations

from datetime import timedelta

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select

from node import assembler
from node.core.db import engine_for, session_scope
from node.index import Study
from node.ingest import mpps
from node.jobs import embedded as node_jobs
from node.jobs.table import Job
from tests.helpers import free_port, wait_for
from tests.jobs.conftest import add_study
from tests.jobs.test_completion_and_routing import CT_RULE, _mpps_completed, _mpps_create


def _state(settings, uid):
    with session_scope(engine_for(settings.database.url)) as session:
        return session.scalar(select(Study.state).where(Study.study_uid == uid))


def test_mpps_scp_over_dicom_makes_the_study_ready(make_settings):
    settings = make_settings(
        rules=[CT_RULE], timers={"series_quiet_s": 300, "study_quiet_s": 600, "force_complete_s": 900}
    )
    add_study(settings, study_uid="1.2.5.1", instances=2)
    scp = AE(ae_title="AINODE")
    scp.add_supported_context(ModalityPerformedProcedureStep)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=mpps.handlers(settings))
    try:
        scu = AE(ae_title="CT01")
        scu.add_requested_context(ModalityPerformedProcedureStep)
        assoc = scu.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        step_uid = generate_uid()
        status, _ = assoc.send_n_create(_mpps_create("1.2.5.1"), ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0x0000
        status, _ = assoc.send_n_create(_mpps_create("1.2.5.1"), ModalityPerformedProcedureStep, step_uid)
        assert status.Status == mpps.DUPLICATE_SOP_INSTANCE
        assembler.tick(settings)
        assert _state(settings, "1.2.5.1") == "received"  # IN PROGRESS: still acquiring
        done = _mpps_completed("1.2.5.1.1", ["1.2.5.1.1.1", "1.2.5.1.1.2"])
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0x0000
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == mpps.NO_SUCH_OBJECT_INSTANCE
        assoc.release()
    finally:
        server.shutdown()
    assembler.tick(settings)  # long before the 600 s quiet timer
    assert _state(settings, "1.2.5.1") == "routed"
    with session_scope(engine_for(settings.database.url)) as session:
        step = session.scalar(select(mpps.PerformedProcedureStep))
        assert step.status == "COMPLETED" and step.calling_ae == "CT01" and step.applied


def _job(settings, job_id):
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def test_embedded_worker_runs_jobs_without_a_broker(make_settings, caplog):
    settings = make_settings(
        rules=[
            CT_RULE,
            {"name": "hang", "match": {"modality": "MR"}, "analyses": [{"name": "sleep", "params": {"seconds": 60}}]},
        ],
        analyses=[{"name": "sleep", "soft_time_limit_s": 1, "time_limit_s": 3}],
    )
    with caplog.at_level("WARNING", logger="ainode.jobs"):
        stops = node_jobs.start_services(settings)
    assert "no broker configured: using the embedded broker" in caplog.text
    try:
        add_study(settings, study_uid="1.2.5.2", age=timedelta(seconds=10))
        add_study(settings, study_uid="1.2.5.3", modality="MR", age=timedelta(seconds=10))
        assembler.tick(settings)
        with session_scope(engine_for(settings.database.url)) as session:
            ids = {j.study_uid: j.id for j in session.scalars(select(Job))}
        assert wait_for(lambda: _job(settings, ids["1.2.5.2"]).state == "succeeded", 120)
        assert wait_for(lambda: _job(settings, ids["1.2.5.3"]).state == "failed", 120)
        assert _job(settings, ids["1.2.5.3"]).error == "soft time limit of 1 s exceeded; the analysis was stopped"
    finally:
        for stop in stops:
            stop()
