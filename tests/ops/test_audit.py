"""The audit trail: PS3.15 A.5 messages, and a slow or dead sink never blocks the node."""

from __future__ import annotations

import os
import socket
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from node.core import audit
from node.core.settings import AuditSettings
from tests.helpers import free_port, wait_for
from tests.ops.conftest import Client, audit_text, make_ct_study, node_with_api, storescu, wait_phase


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
    assert obj.find("ParticipantObjectDetail").get("value") == "7"


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
