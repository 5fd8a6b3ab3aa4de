"""The audit trail: PS3.15 A.5 messages, and a slow or dead sink never blocks the node."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from node.core import audit
from node.core.settings import AuditSettings
from tests.helpers import free_port, wait_for
from tests.ops.atna import TlsSyslogReceiver, assert_valid, schema_errors
from tests.ops.conftest import Client, audit_text, make_ct_study, node_with_api, storescu, wait_phase
from tests.pki import authority, signed


def test_messages_follow_the_dicom_audit_schema_shape(tmp_path: Path):
    trail = audit.AuditTrail(AuditSettings(sink="file", path=tmp_path / "audit.log"), "AINODE")
    event = audit.AuditEvent(
        audit.INSTANCES_TRANSFERRED,
        "C",
        audit.SUCCESS,
        participants=[
            audit.Participant("CT01", False, "127.0.0.1", audit.ROLE_SOURCE),
            audit.Participant("AINODE", True, "", audit.ROLE_DESTINATION),
        ],
        study_uids=["1.2.3.4"],
        instance_count=7,
    )
    assert trail.record(event)
    trail.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 1
    root = ET.fromstring(lines[0])
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "C" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.find("EventID").get("csd-code") == "110104"
    roles = [p.find("RoleIDCode").get("csd-code") for p in root.findall("ActiveParticipant")]
    assert roles == ["110153", "110152"]
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "AINODE"
    obj = root.find("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == "1.2.3.4"
    assert obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert base64.b64decode(obj.find("ParticipantObjectDetail").get("value")) == b"7"
    assert_valid(lines[0])


def _record_many(trail: audit.AuditTrail, n: int, done: threading.Event) -> None:
    for i in range(n):
        trail.record(audit.AuditEvent(audit.QUERY, query_text=f"q{i}"))
    done.set()


def test_a_fifo_nobody_reads_neither_blocks_nor_loses_what_fits(tmp_path: Path):
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    trail = audit.AuditTrail(AuditSettings(sink="file", path=fifo), queue_size=100)
    done = threading.Event()
    threading.Thread(target=_record_many, args=(trail, 250, done), daemon=True).start()
    # record() returns for every message even though the sink cannot take one: the queue holds
    # 100 (one more is with the writer), the rest are dropped and counted.
    assert done.wait(120)
    assert trail.written == 0
    assert trail.dropped >= 149 and trail.dropped + trail.pending() <= 250
    # A reader appears: what was queued is written, whole lines only.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    chunks = []
    assert wait_for(lambda: chunks.append(_read_all(reader)) or trail.written >= 100, 60), trail.written
    chunks.append(_read_all(reader))
    trail.close()
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == trail.written and all(ET.fromstring(line).tag == "AuditMessage" for line in lines)
    os.close(reader)


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_full_fifo_does_not_block_the_caller(tmp_path: Path):
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the pipe fills
    trail = audit.AuditTrail(AuditSettings(sink="file", path=fifo), queue_size=50)
    done = threading.Event()
    threading.Thread(target=_record_many, args=(trail, 2000, done), daemon=True).start()
    assert done.wait(120)
    assert trail.dropped > 0 and trail.written < 2000
    trail.close(timeout=0.2)
    os.close(reader)


def test_unreachable_syslog_does_not_block(tmp_path: Path):
    trail = audit.AuditTrail(AuditSettings(sink="syslog", syslog_address=str(tmp_path / "no-such.sock")), queue_size=20)
    done = threading.Event()
    threading.Thread(target=_record_many, args=(trail, 100, done), daemon=True).start()
    assert done.wait(120)
    assert trail.written == 0 and trail.dropped >= 79
    trail.close(timeout=0.2)


def test_syslog_over_udp_receives_rfc5424_messages():
    port = free_port()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", port))
    server.settimeout(60)
    trail = audit.AuditTrail(AuditSettings(sink="syslog", syslog_address=f"127.0.0.1:{port}"))
    trail.record(audit.AuditEvent(audit.APPLICATION_ACTIVITY, event_type=audit.APPLICATION_START))
    data = server.recv(65536).decode()
    trail.close()
    server.close()
    assert data.startswith("<110>1 ") and "<AuditMessage>" in data and 'csd-code="110120"' in data


@pytest.mark.slow
def test_node_receives_while_its_audit_fifo_is_blocked(tmp_path: Path):
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read
    os.write(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), b"x" * 65536)  # the pipe is already full
    node = node_with_api(tmp_path / "node", {"audit": {"sink": "file", "path": str(fifo)}})
    try:
        with node:
            client = Client(node.config["api"]["port"])
            assert wait_for(client.up, 120), node.log_text()[-2000:]
            for n in range(2):
                folder = tmp_path / f"study{n}"
                uid = make_ct_study(folder, 4)
                assert storescu(node, folder).returncode == 0
                assert wait_phase(client, uid, ("done",))["instances"] == 4
            # Audited actions answer too, although their messages cannot be written.
            assert client.call("GET", "/api/studies", token="bad")[0] == 401
            assert "audit sink file unavailable" in node.log_text()
    finally:
        os.close(reader)


def _mark_ready(node, study_uid: str) -> None:
    """A completed study, written into the running node's index the way the assembler leaves it."""
    from datetime import datetime, timezone

    from sqlalchemy import update

    from node.core.db import dispose_engines, engine_for, session_scope
    from node.index import Study
    from tests.jobs.conftest import add_study, settings_from

    settings = settings_from(node.config_path)
    add_study(settings, study_uid=study_uid, state="routed")
    with session_scope(engine_for(settings.database.url)) as s:
        s.execute(update(Study).where(Study.study_uid == study_uid).values(ready_at=datetime.now(timezone.utc)))
    dispose_engines()


def _imports_of(node, study_uid: str) -> list[str]:
    return [
        line
        for line in audit_text(node).splitlines()
        if study_uid in line and 'csd-code="110104"' in line and 'EventActionCode="C"' in line
    ]


def test_a_study_completed_just_before_a_stop_is_audited_once(tmp_path: Path):
    """The node's last audit pass runs at the stop, after the other stages: a study that completed
    between the last periodic pass and SIGTERM is reported by that run, and not again after a restart;
    one that completes after the restart, before the new run's first pass, is the new run's."""
    node = node_with_api(tmp_path / "node")
    api_up = Client(node.config["api"]["port"]).up  # the API starts after the periodic tasks
    with node:
        assert wait_for(api_up, 120), node.log_text()[-3000:]
        _mark_ready(node, "1.2.3.900")
        assert node.stop() == 0
        assert len(_imports_of(node, "1.2.3.900")) == 1, audit_text(node)[-3000:]
        node.start()
        assert wait_for(api_up, 120), node.log_text()[-3000:]
        _mark_ready(node, "1.2.3.901")
        assert wait_for(lambda: _imports_of(node, "1.2.3.901"), 120), audit_text(node)[-3000:]
    assert len(_imports_of(node, "1.2.3.900")) == 1
    assert len(_imports_of(node, "1.2.3.901")) == 1


# --- every message kind against the DICOM audit message schema (PS3.15 A.5.1) ---------------------

PATIENT = audit.PatientIdentity("OPS0001", "Ops^Patient", "HOSPITAL")
# Event ID -> whether PS3.15 A.5.3 asks for a Patient participant object.
KINDS = {
    "110100": False,  # Application Activity
    "110103": True,  # DICOM Instances Accessed
    "110104": True,  # DICOM Instances Transferred
    "110105": True,  # DICOM Study Deleted
    "110110": True,  # Patient Record
    "110112": False,  # Query
    "110113": False,  # Security Alert
    "110114": False,  # User Authentication
}


def _emit_every_kind() -> None:
    """One call of each helper the node's stages use (the arguments they pass)."""
    audit.application_activity(True, "AINODE")
    audit.application_activity(False, "AINODE", user="operator")
    audit.instances_transferred(
        imported=True, study_uid="1.2.3.4", instances=5, source_ae="CT01", source_host="", destination_ae="AINODE",
        patient=PATIENT,
    )  # fmt: skip
    audit.instances_transferred(
        imported=False, study_uid="1.2.3.4", instances=2, source_ae="AINODE", source_host="ainode.hospital",
        destination_ae="PACS", destination_host="10.0.0.5", patient=PATIENT,
    )  # fmt: skip
    audit.instances_transferred(
        imported=True, study_uid="1.2.3.4", instances=1, source_ae="CT01", source_host="", destination_ae="AINODE",
        outcome=audit.SERIOUS_FAILURE, reason="answered instance quarantined <not indexed> & kept",
        patient=audit.PatientIdentity("P&<1>"),
    )  # fmt: skip
    audit.instances_accessed(user="dashboard", address="127.0.0.1", study_uid="1.2.3.4", patient=PATIENT)
    audit.study_deleted(study_uid="1.2.3.4", instances=5, node_ae="AINODE", reason="retention: retention passed",
                        patient=PATIENT)  # fmt: skip
    audit.patient_record(
        study_uid="1.2.3.4", attributes=["PatientName"], source_ae="CT01", node_ae="AINODE", patient=PATIENT
    )
    audit.query(user="api-client", address="127.0.0.1", text="GET /api/studies?patient=<x>&modality=CT")
    audit.security_alert(
        audit.SOFTWARE_CONFIGURATION, user="api-client", address="::1", detail="rules reloaded", study_uids=["1.2.3"]
    )
    audit.security_alert(audit.NODE_AUTHENTICATION, user="STRANGER", address="10.1.2.3", outcome=audit.MINOR_FAILURE)
    audit.user_authentication(user="api-client", address="127.0.0.1", success=False)
    audit.user_authentication(user="dashboard", address="127.0.0.1", success=True)


def _check_kinds(messages: list[str]) -> None:
    """Every message is schema-valid; every kind appears; the Patient is named where asked."""
    seen = set()
    for xml in messages:
        root = assert_valid(xml)
        event = root.find("EventIdentification/EventID").get("csd-code")
        seen.add(event)
        patients = [
            o
            for o in root.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCode") == "1" and o.get("ParticipantObjectTypeCodeRole") == "1"
        ]
        if KINDS[event]:
            assert len(patients) == 1, xml
            assert patients[0].find("ParticipantObjectIDTypeCode").get("csd-code") == "2"  # Patient Number
        else:
            assert patients == [], xml
    assert seen == set(KINDS)


def test_every_message_kind_is_valid_against_the_dicom_audit_schema(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(audit, "_trail", None)
    trail = audit.configure(AuditSettings(sink="file", path=tmp_path / "audit.log"), "AINODE")
    _emit_every_kind()
    trail.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 13
    _check_kinds(lines)
    transferred = ET.fromstring(lines[2])
    patient = [
        o for o in transferred.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectTypeCode") == "1"
    ]
    assert patient[0].get("ParticipantObjectID") == "OPS0001^^^HOSPITAL"  # HL7 CX
    assert patient[0].find("ParticipantObjectName").text == "Ops^Patient"
    deleted = ET.fromstring(lines[6]).find("EventIdentification")
    assert deleted.get("EventActionCode") == "D" and deleted.find("EventID").get("csd-code") == "110105"
    query = ET.fromstring(lines[8]).find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert base64.b64decode(query.text) == b"GET /api/studies?patient=<x>&modality=CT"


def test_the_schema_rejects_what_the_standard_does_not_allow():
    """The validator is not blind: each mutation of a valid message is refused."""
    good = audit.AuditEvent(
        audit.QUERY, participants=[audit.Participant("api-client", True, "127.0.0.1")], query_text="q"
    ).xml("AINODE")
    assert_valid(good)
    participant = re.search(r"<ActiveParticipant.*?</ActiveParticipant>", good)[0]
    source = re.search(r"<AuditSourceIdentification.*?</AuditSourceIdentification>", good)[0]
    bad = {
        "no ActiveParticipant": audit.AuditEvent(audit.QUERY, query_text="q").xml("AINODE"),
        "query not base64": good.replace("<ParticipantObjectQuery>cQ==", "<ParticipantObjectQuery>q q"),
        "unknown action": good.replace('EventActionCode="E"', 'EventActionCode="X"'),
        "outcome 2": good.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="2"'),
        "no EventDateTime": re.sub(r' EventDateTime="[^"]*"', "", good),
        "EventID without codeSystemName": good.replace(
            'codeSystemName="DCM" originalText="Query"', 'originalText="Query"'
        ),
        "source before participant": good.replace(participant, "#").replace(source, participant).replace("#", source),
    }
    for why, xml in bad.items():
        assert schema_errors(xml), why


# --- RFC 5425: syslog over TLS to an ATNA repository ---------------------------------------------


@pytest.fixture
def atna_pki(tmp_path: Path) -> dict[str, Any]:
    """The hospital CA, the repository's and the node's certificates signed by it, and a
    certificate from another CA."""
    folder = tmp_path / "pki"
    folder.mkdir()
    ca, other = authority(folder, "hospital-ca"), authority(folder, "other-ca")
    return {
        "ca": ca[0],
        "arr": signed(folder, "arr", ca),
        "node": signed(folder, "ainode", ca),
        "stranger": signed(folder, "stranger", other),
    }


def _tls_settings(port: int, pki: dict[str, Any], client: bool = True) -> AuditSettings:
    extra = {"tls_certificate": pki["node"][0], "tls_private_key": pki["node"][1]} if client else {}
    return AuditSettings(sink="syslog-tls", syslog_address=f"127.0.0.1:{port}", tls_ca=pki["ca"], **extra)


def test_tls_syslog_sends_octet_counted_rfc5424_frames_over_mutual_tls(tmp_path: Path, atna_pki, monkeypatch):
    port = free_port()
    receiver = TlsSyslogReceiver(port, *atna_pki["arr"], client_ca=atna_pki["ca"]).start()
    monkeypatch.setattr(audit, "_trail", None)
    trail = audit.configure(_tls_settings(port, atna_pki), "AINODE")
    try:
        _emit_every_kind()
        assert wait_for(lambda: len(receiver.frames) >= 13, 60), receiver.frames
        assert receiver.connections == 1  # one connection carries them all
    finally:
        trail.close()
        receiver.stop()
    messages = receiver.messages()
    assert len(messages) == 13
    for m in messages:
        assert (m.pri, m.app, m.msgid, m.structured_data) == (110, "ainode", "IHE+RFC-3881", "-")
        assert m.procid == str(os.getpid()) and m.hostname == socket.gethostname()
    _check_kinds(receiver.audit_messages())


def test_tls_syslog_verifies_the_repository_and_presents_the_node(tmp_path: Path, atna_pki):
    """A repository whose certificate the hospital CA did not sign gets nothing; nor does one that
    requires a client certificate from a node configured without one; the messages wait."""
    for certificate, settings in (
        (atna_pki["stranger"], lambda port: _tls_settings(port, atna_pki)),
        (atna_pki["arr"], lambda port: _tls_settings(port, atna_pki, client=False)),
    ):
        port = free_port()
        receiver = TlsSyslogReceiver(port, *certificate, client_ca=atna_pki["ca"]).start()
        trail = audit.AuditTrail(settings(port))
        trail.record(audit.AuditEvent(audit.APPLICATION_ACTIVITY, participants=[audit.Participant("AINODE", False)]))
        assert wait_for(lambda: trail.sink_down_since is not None, 60)
        time.sleep(1.5)  # a retry or two
        assert trail.written == 0 and receiver.frames == []
        assert receiver.connections == 0 and receiver.handshake_failures >= 1
        trail.close(timeout=0.2)
        receiver.stop()


def test_tls_syslog_keeps_messages_while_the_repository_is_down(tmp_path: Path, atna_pki):
    """The repository goes away: the node notices the closed connection, keeps the messages
    recorded meanwhile, reconnects when the repository is back and delivers each once, in order."""
    port = free_port()
    receiver = TlsSyslogReceiver(port, *atna_pki["arr"], client_ca=atna_pki["ca"]).start()
    trail = audit.AuditTrail(_tls_settings(port, atna_pki))
    try:
        for n in range(3):
            trail.record(audit.AuditEvent(audit.QUERY, participants=[audit.Participant("u", True)], query_text=f"a{n}"))
        assert wait_for(lambda: len(receiver.frames) == 3, 60)
        receiver.stop()
        for n in range(20):
            trail.record(audit.AuditEvent(audit.QUERY, participants=[audit.Participant("u", True)], query_text=f"b{n}"))
        assert wait_for(lambda: trail.sink_down_since is not None, 60)
        time.sleep(2)
        assert len(receiver.frames) == 3
        back = TlsSyslogReceiver(port, *atna_pki["arr"], client_ca=atna_pki["ca"]).start()
        assert wait_for(lambda: len(back.frames) >= 20, 60), len(back.frames)
        time.sleep(0.5)
    finally:
        trail.close()
        receiver.stop()
    back.stop()
    queries = [
        base64.b64decode(assert_valid(xml).find("ParticipantObjectIdentification/ParticipantObjectQuery").text).decode()
        for xml in back.audit_messages()
    ]
    assert queries == [f"b{n}" for n in range(20)]
    assert trail.dropped == 0 and trail.written == 23


def _auth_failures(messages: list[str]) -> int:
    return sum('csd-code="110114"' in m and 'EventOutcomeIndicator="4"' in m for m in messages)


def test_the_node_sends_its_audit_trail_to_a_tls_repository(tmp_path: Path, atna_pki):
    """``ainode serve`` with ``audit.sink: syslog-tls`` and mutual TLS: the repository gets the
    node's messages, schema-valid, the import naming its patient; while the repository is down
    the node keeps what it audits and delivers it once the repository is back. The node's log
    names no patient."""
    port = free_port()
    receiver = TlsSyslogReceiver(port, *atna_pki["arr"], client_ca=atna_pki["ca"]).start()
    tls = {
        "sink": "syslog-tls",
        "syslog_address": f"127.0.0.1:{port}",
        "tls_ca": str(atna_pki["ca"]),
        "tls_certificate": str(atna_pki["node"][0]),
        "tls_private_key": str(atna_pki["node"][1]),
    }
    node = node_with_api(tmp_path / "node", {"audit": tls})
    back = None
    try:
        with node:
            client = Client(node.config["api"]["port"])
            assert wait_for(client.up, 120), node.log_text()[-3000:]
            uid = make_ct_study(tmp_path / "study", 3)
            assert storescu(node, tmp_path / "study").returncode == 0
            assert wait_phase(client, uid, ("done",))["instances"] == 3

            def imported() -> list[str]:
                return [m for m in receiver.audit_messages() if uid in m and 'csd-code="110104"' in m]

            assert wait_for(imported, 120), receiver.audit_messages()[-3:]
            assert "<ParticipantObjectName>Ops^Patient</ParticipantObjectName>" in imported()[0]
            assert 'ParticipantObjectID="OPS0001"' in imported()[0]
            # Viewing the study page is DICOM Instances Accessed, naming the patient too.
            client.get(f"/api/studies/{uid}")

            def accessed() -> list[str]:
                return [m for m in receiver.audit_messages() if uid in m and 'csd-code="110103"' in m]

            assert wait_for(accessed, 60), receiver.audit_messages()[-3:]
            assert "<ParticipantObjectName>Ops^Patient</ParticipantObjectName>" in accessed()[0]

            receiver.stop()  # the repository goes away
            for _ in range(2):
                assert client.call("GET", "/api/studies", token="bad")[0] == 401
            assert wait_for(lambda: "audit sink syslog-tls unavailable" in node.log_text(), 60), node.log_text()[-2000:]
            assert _auth_failures(receiver.audit_messages()) == 0
            back = TlsSyslogReceiver(port, *atna_pki["arr"], client_ca=atna_pki["ca"]).start()
            assert wait_for(lambda: _auth_failures(back.audit_messages()) == 2, 60), back.audit_messages()
        # The stop is audited too (Application Stop), to the repository that is back.
        assert wait_for(lambda: any('csd-code="110121"' in m for m in back.audit_messages()), 30)
    finally:
        receiver.stop()
        if back is not None:
            back.stop()
    messages = receiver.audit_messages() + back.audit_messages()
    for xml in messages:
        assert_valid(xml)
    assert any('csd-code="110120"' in m for m in receiver.audit_messages())  # Application Start
    assert "Ops^Patient" not in node.log_text() and "OPS0001" not in node.log_text()


def test_tls_settings_are_checked_when_read():
    with pytest.raises(ValueError, match="host:port"):
        AuditSettings(sink="syslog-tls")  # the default address is the local /dev/log
    with pytest.raises(ValueError, match="go together"):
        AuditSettings(sink="syslog-tls", syslog_address="arr:6514", tls_certificate=Path("node.crt"))
    assert AuditSettings(sink="syslog-tls", syslog_address="arr.hospital:6514").tls_ca is None
