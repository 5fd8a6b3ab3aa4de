"""Reports to the RIS: ORU^R01 over MLLP to python-hl7's server, FHIR R4 to Medplum's router.

The SR the real writers produce is read back into an ORU and a transaction Bundle; the peers
parse and validate what arrives. Critical findings, corrections, NAKs and a RIS that is down
go through the same durable outbox as DICOM deliveries.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from node.core.db import init_db, session_scope
from node.core.settings import Settings
from node.dispatch.outbox import deliver_destination, enqueue_results, status_summary
from node.dispatch.report import ReportContext, report_id
from node.dispatch.table import DELIVERED, FAILED, PENDING, Delivery, DestinationHealth
from tests.helpers import NodeProcess, wait_for
from tests.results.ris_peers import FhirServer, MllpRis
from tests.results.synthetic import NODULE, detection_findings, volume_of, write_ct_series
from workers.analysis.findings import Detection
from workers.analysis.models import segmentation
from workers.results import ResultContext, write_results
from workers.synthetic import phantoms

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
CHINESE = "Wang^XiaoDong=王^小東"
JOB_KEY = "chest-ai/ct-nodules/study/1.2.3"
ACSN = ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")


def make_settings(tmp_path: Path, ris_port: int, fhir_url: str, **ris: object) -> Settings:
    common = {"retry_initial_s": 0, "retry_max_s": 0, "ris": {"max_refusals": 2, "answer_timeout_s": 10, **ris}}
    return Settings.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path}/ainode.db"},
            "rules": [
                {
                    "name": "chest-ai",
                    "analyses": ["ct-nodules"],
                    "destinations": ["ris", "fhir"],
                    "critical": [{"finding": "Nodule", "min_probability": 0.9}],
                }
            ],
            "destinations": [
                {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris_port, **common},
                {"name": "fhir", "type": "fhir", "url": fhir_url, **common},
            ],
        }
    )


def study_results(tmp_path: Path, name: str, extra_nodules: int = 0, critical: bool = True) -> list:
    """Results the real writers make for a CT whose patient has ``name`` (UTF-8)."""
    paths, hu, ids = write_ct_series(tmp_path / "ct")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName, ds.AccessionNumber = "ISO_IR 192", name, "ACC-7781"
        ds.save_as(path)
    findings = detection_findings(volume_of(paths, hu, ids))
    if not critical:
        for detection in findings.detections:
            detection.score = min(detection.score, 0.6)
    for n in range(extra_nodules):
        findings.detections.append(
            Detection(
                "nodule",
                NODULE,
                (2, 30.0, 30.0 + n),
                ((2, 29.0, 29.0 + n), (2, 31.0, 31.0 + n)),
                score=0.6,
                tracking_id=f"nodule-x{n}",
            )
        )
    return list(write_results(findings, ResultContext(job_key=JOB_KEY, output_dir=tmp_path / "out")))


def enqueue(settings: Settings, objects: list, correction: bool = False, job_id: int = 1) -> list[int]:
    with session_scope(init_db(settings.database.url)) as session:
        context = ReportContext(JOB_KEY, "ct-nodules", "chest-ai", correction=correction)
        return enqueue_results(session, job_id, objects, ["ris", "fhir"], settings=settings, report=context)


def orus(ris: MllpRis) -> list:
    """The ORU^R01 messages the RIS received, in order."""
    return [m for m in ris.messages if str(m.segment("MSH")[9]).startswith("ORU")]


def rows(settings: Settings, destination: str) -> list[Delivery]:
    with session_scope(init_db(settings.database.url)) as session:
        found = list(session.scalars(select(Delivery).where(Delivery.destination == destination)))
        session.expunge_all()
        return found


def rearm(settings: Settings) -> None:
    """Make every waiting row due now (the tests do not wait for backoff)."""
    with session_scope(init_db(settings.database.url)) as session:
        session.execute(update(Delivery).values(next_attempt_at=Delivery.created_at))
        session.execute(update(Delivery).where(Delivery.state == DELIVERED).values(state=PENDING))


@pytest.fixture
def fhir(tmp_path):
    server = FhirServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def ris():
    server = MllpRis().start()
    yield server
    server.stop()


def test_critical_study_reaches_ris_and_fhir_once_each(tmp_path, ris, fhir):
    settings = make_settings(tmp_path, ris.port, fhir.base)
    order = fhir.create(
        {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "priority": "routine",
            "subject": {"display": "the study's patient"},
            "identifier": [{"type": {"coding": [{"system": ACSN[0], "code": ACSN[1]}]}, "value": "ACC-7781"}],
        }
    )
    enqueue(settings, study_results(tmp_path, JAPANESE))
    # Only the SR goes to a RIS: one row per RIS destination.
    assert [r.kind for r in rows(settings, "ris")] == ["sr"] and len(rows(settings, "fhir")) == 1
    assert deliver_destination(settings, "ris")["delivered"] == 1
    assert deliver_destination(settings, "fhir")["delivered"] == 1

    # The ORU, then the change-order that makes the order STAT.
    oru, omg = ris.messages
    assert str(omg.segment("MSH")[9]) == "OMG^O19^OMG_O19" and str(omg.segment("ORC")[1]) == "XO"
    assert str(omg.segment("ORC")[2]) == "ACC-7781" and str(omg.segment("TQ1")[9]).startswith("S")
    assert rows(settings, "ris")[0].reason == "priority raised to STAT"
    assert fhir.read(f"ServiceRequest/{order['id']}")["priority"] == "stat"
    assert rows(settings, "fhir")[0].reason == "priority raised to stat"
    assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(oru.segment("MSH")[12]) == "2.5.1"
    names = str(oru.segment("PID")[5]).split("~")
    assert (
        names[0].startswith("Yamada^Tarou")
        and names[1].startswith("山田^太郎")
        and names[2].startswith("やまだ^たろう")
    )
    assert str(oru.segment("OBR")[2]) == "ACC-7781" and str(oru.segment("OBR")[25]) == "P"
    assert str(oru.segment("TQ1")[9]).startswith("S")  # the order's priority raised to STAT
    flagged = [o for o in oru.segments("OBX") if str(o[8]) == "AA"]
    probabilities = [o for o in oru.segments("OBX") if str(o[3]).startswith("122157")]
    assert flagged and {str(o[4]) for o in flagged} == {"1"}  # only the 0.91 nodule is critical
    assert [str(o[5]) for o in probabilities] == ["0.91", "0.55", "0.12"]
    assert all(str(o[6]) == "1^no units^UCUM" for o in probabilities)

    (report,) = fhir.search("DiagnosticReport", identifier=f"urn:ainode:report|{report_id(JOB_KEY)}")
    assert report["status"] == "preliminary" and report["basedOn"][0]["identifier"]["value"] == "ACC-7781"
    observations = fhir.search("Observation", subject=report["subject"]["reference"])
    assert len(observations) == len(report["result"]) == 3
    critical = [o for o in observations if o.get("interpretation")]
    assert len(critical) == 1 and critical[0]["interpretation"][0]["coding"][0]["code"] == "AA"
    (patient,) = fhir.search("Patient", identifier="urn:ainode:patient-id|PID-42")
    assert [n.get("family") for n in patient["name"]] == ["Yamada", "山田", "やまだ"]


def test_resend_does_not_duplicate_and_a_rerun_corrects(tmp_path, ris, fhir):
    settings = make_settings(tmp_path, ris.port, fhir.base)
    objects = study_results(tmp_path, CHINESE)
    enqueue(settings, objects)
    deliver_destination(settings, "fhir")
    rearm(settings)
    deliver_destination(settings, "fhir")  # the same report again: conditional writes, no duplicate
    assert len(fhir.search("DiagnosticReport")) == 1 and len(fhir.search("Observation")) == 3
    assert len(fhir.search("Patient")) == 1
    enqueue(settings, objects, correction=True, job_id=2)
    rearm(settings)
    deliver_destination(settings, "ris")
    deliver_destination(settings, "fhir")
    (report,) = fhir.search("DiagnosticReport")
    assert report["status"] == "corrected" and len(fhir.search("Observation")) == 3
    assert str(orus(ris)[-1].segment("OBR")[25]) == "C"
    assert str(orus(ris)[-1].segment("PID")[5]).split("~")[1].startswith("王^小東")


def test_a_large_report_goes_in_steps_to_a_server_with_a_transaction_limit(tmp_path, fhir):
    settings = make_settings(tmp_path, 9, fhir.base)
    enqueue(settings, study_results(tmp_path, JAPANESE, extra_nodules=12))
    assert deliver_destination(settings, "fhir")["delivered"] == 1
    (report,) = fhir.search("DiagnosticReport")
    assert len(report["result"]) == 15 and len(fhir.search("Observation", _count="100")) == 15
    assert all(ref["reference"].startswith("Observation/") for ref in report["result"])


def test_nak_is_retried_then_failed_with_the_peers_text(tmp_path):
    ris = MllpRis(ack_code="AE", ack_text="order ACC-7781 unknown").start()
    try:
        settings = make_settings(tmp_path, ris.port, "http://127.0.0.1:9/fhir")
        enqueue(settings, study_results(tmp_path, JAPANESE))
        deliver_destination(settings, "ris")
        (row,) = rows(settings, "ris")
        assert row.state == PENDING and "order ACC-7781 unknown" in row.reason
        rearm(settings)
        deliver_destination(settings, "ris")
        (row,) = rows(settings, "ris")
        assert row.state == FAILED and row.reason == "RIS answered AE: order ACC-7781 unknown"
        with session_scope(init_db(settings.database.url)) as session:
            failures = status_summary(session)["destinations"]["ris"]["recent_failures"]
        assert failures[0]["reason"] == row.reason
        assert len(ris.messages) == 2  # no change-order for a report the RIS refused
    finally:
        ris.stop()


def test_rejected_message_fails_at_once(tmp_path):
    ris = MllpRis(ack_code="AR", ack_text="unsupported message type").start()
    try:
        settings = make_settings(tmp_path, ris.port, "http://127.0.0.1:9/fhir")
        enqueue(settings, study_results(tmp_path, JAPANESE))
        deliver_destination(settings, "ris")
        (row,) = rows(settings, "ris")
        assert row.state == FAILED and "unsupported message type" in row.reason
    finally:
        ris.stop()


def test_ris_down_then_back_gets_every_report_once(tmp_path):
    ris = MllpRis()  # not started: the port refuses connections
    settings = make_settings(tmp_path, ris.port, "http://127.0.0.1:9/fhir")
    enqueue(settings, study_results(tmp_path, JAPANESE))
    for _ in range(3):
        rearm_breaker = deliver_destination(settings, "ris")
        assert rearm_breaker["retry"] in (0, 1)
        with session_scope(init_db(settings.database.url)) as session:
            session.execute(update(Delivery).values(next_attempt_at=Delivery.created_at))
            session.execute(update(DestinationHealth).values(open_until=None))
    (row,) = rows(settings, "ris")
    assert row.state == PENDING and row.last_status == "link"
    ris.start()
    try:
        assert deliver_destination(settings, "ris")["delivered"] == 1
        assert deliver_destination(settings, "ris")["delivered"] == 0
        assert len(orus(ris)) == 1
    finally:
        ris.stop()


def test_critical_reports_go_out_ahead_of_routine_ones(tmp_path, ris):
    settings = make_settings(tmp_path, ris.port, "http://127.0.0.1:9/fhir")
    enqueue(settings, study_results(tmp_path / "routine", "Routine^Case", critical=False), job_id=1)
    enqueue(settings, study_results(tmp_path / "critical", "Critical^Case"), job_id=2)
    assert deliver_destination(settings, "ris")["delivered"] == 2
    first, second = orus(ris)
    assert str(first.segment("PID")[5]).startswith("Critical^Case") and str(first.segment("TQ1")[9]).startswith("S")
    assert str(second.segment("PID")[5]).startswith("Routine^Case")
    assert not [o for o in second.segments("OBX") if str(o[8]) == "AA"]


@pytest.mark.slow
@pytest.mark.skipif(not segmentation.WEIGHTS.exists(), reason="ct-segmentation weights not trained yet")
def test_a_real_node_reports_a_critical_measurement_to_ris_and_fhir(tmp_path, ris, fhir):
    """storescu → ainode serve → ct-segmentation → SR → ORU^R01 and FHIR Bundle, critical flagged."""
    phantom = phantoms.make_ct_phantom(4243, shape=(48, 64, 64))
    files = phantoms.write_ct_series(phantom, tmp_path / "study")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName, ds.AccessionNumber = "ISO_IR 192", CHINESE, "ACC-9001"
        ds.save_as(path)
    common = {"retry_initial_s": 0.5, "retry_max_s": 2}
    node = NodeProcess(
        tmp_path / "node",
        {
            "destinations": [
                {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port, **common},
                {"name": "fhir", "type": "fhir", "url": fhir.base, **common},
            ],
            "rules": [
                {
                    "name": "ct-seg",
                    "match": {"modality": "CT"},
                    "analyses": ["ct-segmentation"],
                    "destinations": ["ris", "fhir"],
                    # Any liver volume over 1 ml is "critical" here: the flag's path is what is tested.
                    "critical": [{"measurement": "Volume", "above": 1}],
                }
            ],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    with node:
        subprocess.run(
            [
                "/usr/bin/storescu",
                "-aet",
                "STORESCU",
                "-aec",
                node.ae_title,
                "127.0.0.1",
                str(node.port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
        )
        assert wait_for(lambda: ris.messages and fhir.search("DiagnosticReport"), timeout=600, interval=1.0), (
            node.log_text()[-4000:]
        )
    (oru,) = orus(ris)
    assert str(oru.segment("PID")[5]).split("~")[1].startswith("王^小東")
    assert str(oru.segment("OBR")[2]) == "ACC-9001" and str(oru.segment("OBR")[4]).startswith("ct-segmentation")
    volumes = [o for o in oru.segments("OBX") if "Volume" in str(o[3])]
    assert volumes and all(str(o[8]) == "AA" for o in volumes if float(str(o[5])) > 1)
    assert str(oru.segment("TQ1")[9]).startswith("S")
    (report,) = fhir.search("DiagnosticReport")
    assert report["code"]["coding"][0]["code"] == "ct-segmentation" and report["status"] == "preliminary"
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-9001"
