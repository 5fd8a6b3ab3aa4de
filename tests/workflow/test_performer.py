"""The node as UPS Task Performer (IHE AIW-I): a RIS schedules a workitem for a study only the
PACS (Orthanc) holds; the node claims it, retrieves the study (C-MOVE or C-GET), analyses it,
stores the results back and lists them in the Output Information Sequence; a watcher with a
global subscription sees SCHEDULED → IN PROGRESS → COMPLETED. A pushed study's job is a
workitem too. A node killed with a workitem IN PROGRESS completes it after its restart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPush
from sqlalchemy import select

from node.core.db import engine_for, session_scope
from node.core.settings import Settings
from node.jobs.table import Job
from node.workflow.manager import GLOBAL_SUBSCRIPTION
from node.workflow.performer import Performer, input_studies, order_of
from node.workflow.table import Workitem
from tests.helpers import NodeProcess, wait_for
from tests.results.synthetic import write_ct_series
from tests.results.test_end_to_end import result_series
from tests.workflow.conftest import RIS, Watcher, connect, node_config, push_to_orthanc, source_of, status, subscribe
from workers.analysis.models import segmentation
from workers.synthetic import phantoms

ACCESSION = "ACC-UPS-7"


def start_node(tmp_path: Path, pacs, node_port: int, watcher: Watcher, method: str = "c-move", **extra) -> NodeProcess:
    """`ainode serve` performing workitems: the PACS as its one source (``method``) and destination."""
    overrides = node_config(watcher.port)
    workflow = {**overrides["workflow"], **extra.pop("workflow", {})}
    overrides.update(
        {
            "node": {"port": node_port},
            "sources": [source_of(pacs, method)],
            "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
            **extra,
        }
    )
    overrides["workflow"] = workflow
    # The modality pushes, the PACS sends what the node moves (C-MOVE) to it.
    overrides["peers"] += [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in ("CT01", pacs.aet)]
    return NodeProcess(tmp_path / "node", overrides).start()


def ai_workitem(study_uid: str, code: str, scheme: str = "99AINODE", retrieve_ae: str = "") -> Dataset:
    """The N-CREATE a RIS sends (IHE AIW-I): the analysis' code, the input study, the order."""
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Test^Performer", "P-PERF-1"
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "HIGH"
    ds.ProcedureStepLabel = "AI analysis"
    ds.WorklistLabel = "AI"
    ds.ScheduledProcedureStepStartDateTime = "20261205090000"
    ds.InputReadinessState = "READY"
    item = Dataset()
    if len(code) > 16:
        item.LongCodeValue = code  # a Code Value is at most 16 characters (SH)
    else:
        item.CodeValue = code
    item.CodingSchemeDesignator, item.CodeMeaning = scheme, code
    ds.ScheduledWorkitemCodeSequence = Sequence([item])
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.TypeOfInstances = "DICOM"
    if retrieve_ae:
        where = Dataset()
        where.RetrieveAETitle = retrieve_ae
        study.DICOMRetrievalSequence = Sequence([where])
    ds.InputInformationSequence = Sequence([study])
    request = Dataset()
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = ACCESSION
    request.RequestedProcedureID = "RP-7"
    request.RequestedProcedureDescription = "CT abdomen AI"
    ds.ReferencedRequestSequence = Sequence([request])
    return ds


def schedule(node: NodeProcess, ds: Dataset, subscribe_globally: bool = True) -> str:
    """The watcher subscribes globally, then the RIS creates the workitem; its UID."""
    uid = generate_uid()
    assoc = connect(node, RIS)
    try:
        if subscribe_globally:
            assert subscribe(assoc, GLOBAL_SUBSCRIPTION) == 0x0000
        answer, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, uid)
        assert status(answer) == 0x0000
    finally:
        assoc.release()
    return uid


def n_get(node: NodeProcess, uid: str) -> Dataset:
    assoc = connect(node, RIS)
    try:
        answer, ds = assoc.send_n_get([], UnifiedProcedureStepPush, uid)
        assert status(answer) == 0x0000
        return ds
    finally:
        assoc.release()


def final(watcher: Watcher, uid: str, node: NodeProcess, timeout: float = 600) -> list[str]:
    """The states the watcher saw, once it saw a final one."""
    ended = wait_for(lambda: {"COMPLETED", "CANCELED"} & set(watcher.states(uid)), timeout=timeout, interval=0.5)
    assert ended, f"{watcher.states(uid)}\n{node.log_text()[-4000:]}"
    return watcher.states(uid)


def phantom_study_in_pacs(tmp_path: Path, pacs) -> tuple[str, list[Path]]:
    """A 48-slice CT phantom (within ct-segmentation's intended use) in Orthanc only."""
    phantom = phantoms.make_ct_phantom(4242, shape=(48, 64, 64))
    files = phantoms.write_ct_series(phantom, tmp_path / "study")
    push_to_orthanc(pacs, files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


@pytest.mark.skipif(not segmentation.WEIGHTS.exists(), reason="ct-segmentation weights not trained yet")
@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_workitem_for_a_study_only_the_pacs_holds_is_retrieved_analysed_and_completed(
    tmp_path, pacs, node_port, method
):
    study_uid, files = phantom_study_in_pacs(tmp_path, pacs)
    watcher = Watcher().start()
    node = start_node(tmp_path, pacs, node_port, watcher, method)
    try:
        uid = schedule(node, ai_workitem(study_uid, "ct-segmentation", retrieve_ae=pacs.aet))
        seen = final(watcher, uid, node)
        assert seen == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], node.log_text()[-4000:]
        assert 3 in watcher.kinds(uid)  # Progress reports came between
        ds = n_get(node, uid)
        with session_scope(engine_for(node.database_url)) as s:
            row = s.scalar(select(Workitem).where(Workitem.sop_instance_uid == uid))
            job = s.get(Job, row.job_id)
            assert (job.state, job.analysis) == ("succeeded", "ct-segmentation")
    finally:
        node.stop()
        watcher.stop()
    performed = ds.UnifiedProcedureStepPerformedProcedureSequence[0]
    assert performed.PerformedProcedureStepStartDateTime and performed.PerformedProcedureStepEndDateTime
    listed = {}
    for item in performed.OutputInformationSequence:
        assert item.StudyInstanceUID == study_uid and item.SeriesInstanceUID
        assert item.DICOMRetrievalSequence[0].RetrieveAETitle == pacs.aet
        for ref in item.ReferencedSOPSequence:
            listed[ref.ReferencedSOPInstanceUID] = (item.SeriesInstanceUID, ref.ReferencedSOPClassUID)
    # Exactly the results Orthanc holds (every instance of the study that is not an input).
    inputs = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    series = result_series(pacs, study_uid)
    assert {"SEG", "SR"} <= set(series)
    in_pacs = {}
    for modality, ids in series.items():
        for orthanc_id in ids:
            tags = pacs.get_json(f"/instances/{orthanc_id}/simplified-tags")
            if tags["SOPInstanceUID"] not in inputs:
                in_pacs[tags["SOPInstanceUID"]] = (tags["SeriesInstanceUID"], tags["SOPClassUID"])
                assert tags.get("AccessionNumber") == ACCESSION, modality  # the order flowed into results
    assert listed == in_pacs
    assert ds.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 100


def test_not_applicable_cancels_the_workitem_with_a_reason(tmp_path, pacs, node_port, study_in_pacs):
    study_uid, _ = study_in_pacs
    watcher = Watcher().start()
    node = start_node(tmp_path, pacs, node_port, watcher, "c-get")
    try:
        # A frontal chest radiograph classifier, asked of a CT: outside its intended use.
        uid = schedule(node, ai_workitem(study_uid, "nodule-classification"))
        assert final(watcher, uid, node) == ["SCHEDULED", "IN PROGRESS", "CANCELED"]
        ds = n_get(node, uid)
    finally:
        node.stop()
        watcher.stop()
    progress = ds.ProcedureStepProgressInformationSequence[0]
    assert progress.ReasonForCancellation.startswith("not applicable")
    code = progress.ProcedureStepDiscontinuationReasonCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("NOT-APPLICABLE", "99AINODE")
    reports = [info for kind, u, info in watcher.events if u == uid and kind == 1]
    assert reports[-1].ReasonForCancellation.startswith("not applicable")


def test_an_unknown_code_is_left_for_other_performers(tmp_path, pacs, node_port, study_in_pacs):
    study_uid, _ = study_in_pacs
    watcher = Watcher().start()
    node = start_node(tmp_path, pacs, node_port, watcher)
    try:
        uid = schedule(node, ai_workitem(study_uid, "NOT-OURS", scheme="99RIS"))
        # A mapped code on an INCOMPLETE input waits too.
        waiting = ai_workitem(study_uid, "ct-segmentation")
        waiting.InputReadinessState = "INCOMPLETE"
        other = schedule(node, waiting, subscribe_globally=False)
        assert wait_for(lambda: watcher.states(other) == ["SCHEDULED"], timeout=30)
        assert not wait_for(lambda: len(watcher.states(uid)) > 1 or len(watcher.states(other)) > 1, timeout=5)
        assert str(n_get(node, uid).ProcedureStepState) == "SCHEDULED"
    finally:
        node.stop()
        watcher.stop()


def test_a_pushed_studys_job_is_a_workitem_the_watcher_sees_complete(tmp_path, pacs, node_port):

    watcher = Watcher().start()
    rules = [{"name": "count", "match": {"modality": "CT"}, "analyses": ["count-instances"], "destinations": ["pacs"]}]
    node = start_node(tmp_path, pacs, node_port, watcher, rules=rules)
    try:
        assoc = connect(node, RIS)
        assert subscribe(assoc, GLOBAL_SUBSCRIPTION) == 0x0000
        assoc.release()
        paths, _, _ = write_ct_series(tmp_path / "ct")
        subprocess.run(
            ["/usr/bin/storescu", "-aet", "CT01", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, paths)],
            check=True,
            capture_output=True,
        )

        def mirrored() -> list[str]:
            with session_scope(engine_for(node.database_url)) as s:
                return [w.sop_instance_uid for w in s.scalars(select(Workitem).where(Workitem.job_id.is_not(None)))]

        assert wait_for(lambda: mirrored(), timeout=120), node.log_text()[-3000:]
        uid = mirrored()[0]
        assert final(watcher, uid, node, timeout=120) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
        ds = n_get(node, uid)
        assert ds.ScheduledWorkitemCodeSequence[0].CodeValue == "count-instances"  # 15 characters
        assert ds.InputInformationSequence[0].StudyInstanceUID == str(
            pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
        )
        assert len(mirrored()) == 1  # one workitem per job, however many passes ran
    finally:
        node.stop()
        watcher.stop()


def test_kill_9_with_a_workitem_in_progress_completes_after_restart(tmp_path, pacs, node_port, study_in_pacs):
    study_uid, _ = study_in_pacs
    watcher = Watcher().start()
    record = tmp_path / "record.txt"
    codes = [
        {
            "code_value": "SLOW",
            "coding_scheme_designator": "99RIS",
            "analysis": "sleep",
            "params": {"seconds": 6, "record": str(record)},
        }
    ]
    node = start_node(tmp_path, pacs, node_port, watcher, "c-get", workflow={"analysis_codes": codes})
    try:
        uid = schedule(node, ai_workitem(study_uid, "SLOW", scheme="99RIS"))

        def running() -> bool:
            with session_scope(engine_for(node.database_url)) as s:
                row = s.scalar(select(Workitem).where(Workitem.sop_instance_uid == uid))
                job = s.get(Job, row.job_id) if row.job_id else None
                return job is not None and job.state == "running"

        assert wait_for(running, timeout=120, interval=0.2), node.log_text()[-3000:]
        node.kill()
        assert "COMPLETED" not in watcher.states(uid)
        node.start()
        assert final(watcher, uid, node, timeout=300) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
        assert str(n_get(node, uid).ProcedureStepState) == "COMPLETED"
        with session_scope(engine_for(node.database_url)) as s:
            assert s.scalar(select(Job.state).where(Job.key.like("ups-%"))) == "succeeded"
    finally:
        node.stop()
        watcher.stop()
    assert record.read_text().count("\n") >= 1  # the analysis ran to its end (re-run after the kill)


def test_codes_inputs_and_order_are_read_from_the_workitem(tmp_path):

    settings = Settings.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path}/x.db"},
            "workflow": {
                "analysis_codes": [
                    {"code_value": "AI-CT-SEG", "coding_scheme_designator": "99RIS", "analysis": "ct-segmentation"}
                ]
            },
        }
    )
    performer = Performer(settings, ["ct-segmentation", "nodule-classification"])
    assert performer.analysis_for(ai_workitem("1.2.3", "AI-CT-SEG", scheme="99RIS")) == "ct-segmentation"
    assert performer.analysis_for(ai_workitem("1.2.3", "nodule-classification")) == "nodule-classification"
    assert performer.analysis_for(ai_workitem("1.2.3", "AI-CT-SEG")) is None  # another scheme's code
    assert performer.code_for("ct-segmentation").CodeValue == "AI-CT-SEG"  # the RIS's code first
    assert performer.code_for("nodule-classification").LongCodeValue == "nodule-classification"
    ds = ai_workitem("1.2.3", "ct-segmentation", retrieve_ae="PACS1")
    extra = Dataset()
    extra.StudyInstanceUID, extra.RetrieveAETitle = "1.2.4", "PACS2"
    ds.InputInformationSequence.append(extra)
    ds.InputInformationSequence.append(ds.InputInformationSequence[0])  # named twice: once
    assert input_studies(ds) == [("1.2.3", "PACS1"), ("1.2.4", "PACS2")]
    assert order_of(ds) == {
        "accession_number": ACCESSION,
        "requested_procedure_id": "RP-7",
        "requested_procedure_description": "CT abdomen AI",
    }


def test_request_cancel_of_a_workitem_in_progress_cancels_it_with_a_reason(tmp_path, pacs, node_port, study_in_pacs):
    study_uid, _ = study_in_pacs
    watcher = Watcher().start()
    codes = [
        {"code_value": "SLOW", "coding_scheme_designator": "99RIS", "analysis": "sleep", "params": {"seconds": 60}}
    ]
    node = start_node(tmp_path, pacs, node_port, watcher, "c-get", workflow={"analysis_codes": codes})
    try:
        uid = schedule(node, ai_workitem(study_uid, "SLOW", scheme="99RIS"))
        assert wait_for(lambda: "IN PROGRESS" in watcher.states(uid), timeout=120), node.log_text()[-3000:]
        assoc = connect(node, RIS)
        info = Dataset()
        info.ReasonForCancellation = "ordered in error"
        answer, _ = assoc.send_n_action(info, 2, UnifiedProcedureStepPush, uid)
        assoc.release()
        assert status(answer) == 0x0000
        assert final(watcher, uid, node, timeout=120) == ["SCHEDULED", "IN PROGRESS", "CANCELED"]
        progress = n_get(node, uid).ProcedureStepProgressInformationSequence[0]
        assert progress.ReasonForCancellation == "canceled at the scheduler's request"
        assert progress.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110513"
    finally:
        node.stop()
        watcher.stop()
