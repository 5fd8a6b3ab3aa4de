"""C-ECHO and C-STORE from DCMTK into a running node: stored as sent, indexed, durable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from node.index import Instance, Series, Study
from tests.helpers import REPO_ROOT
from tests.receiver.conftest import echoscu, settled, storescu


def _rows(node) -> list[Instance]:
    settled(node)
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        rows = list(s.scalars(select(Instance)))
    engine.dispose()
    return rows


def test_echoscu_gets_success(node):
    result = echoscu(node)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr


def test_storescu_instance_is_stored_and_indexed(node):
    source = Path(get_testdata_file("CT_small.dcm"))
    result = storescu(node, source)
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr
    rows = _rows(node)
    assert len(rows) == 1
    row = rows[0]
    src = dcmread(source)
    assert row.sop_instance_uid == src.SOPInstanceUID
    assert row.calling_ae == "STORESCU"
    stored = node.storage / row.path
    assert stored.is_file() and stored.stat().st_size == row.size_bytes
    # The path is derived from hashes, not from the UID's text.
    assert src.SOPInstanceUID not in str(row.path)
    got = dcmread(stored)
    assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert (got.pixel_array == src.pixel_array).all()
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        study = s.scalar(select(Study))
        series = s.scalar(select(Series))
        assert study.study_uid == src.StudyInstanceUID and study.instance_count == 1
        assert series.modality == "CT" and series.instance_count == 1
        assert study.patient.patient_id == str(src.PatientID)
    engine.dispose()


def test_no_patient_data_in_logs(node):
    source = Path(get_testdata_file("CT_small.dcm"))
    assert storescu(node, source).returncode == 0
    src = dcmread(source)
    log = node.log_text()
    assert str(src.PatientName) not in log
    assert str(src.PatientID) not in log


def test_ainode_echo_and_send(node, tmp_path):
    env_cmd = [sys.executable, "-m", "node.cli"]
    echo = subprocess.run(
        [*env_cmd, "echo", node.target, "--aet", "TESTSCU"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert echo.returncode == 0, echo.stderr
    folder = tmp_path / "send"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    sent = subprocess.run(
        [*env_cmd, "send", node.target, str(folder), "--aet", "TESTSCU"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert sent.returncode == 0, sent.stderr
    assert len(_rows(node)) == 2
    status = subprocess.run(
        [*env_cmd, "status", "-c", str(node.config_path), "--json"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert '"instances": 2' in status.stdout


def test_sigterm_exits_cleanly(node):
    assert echoscu(node).returncode == 0
    assert node.stop() == 0


def test_sighup_to_the_whole_node_keeps_it_serving(tmp_path):
    """SIGHUP (rule reload) sent to the node's process group must stop neither the main process
    nor the receiver processes, whatever moment it arrives at."""
    import os
    import signal

    from tests.helpers import NodeProcess

    with NodeProcess(tmp_path / "node", {"node": {"receivers": 2}}) as node:
        os.killpg(node.proc.pid, signal.SIGHUP)
        for _ in range(4):  # several associations, so both receivers answer
            assert echoscu(node).returncode == 0
        assert node.proc.poll() is None
        assert node.stop() == 0


def test_mpps_only_from_peers_allowed_to_send_it(tmp_path):
    """A peer whose allow list lacks mpps is refused (0x0124); an allowed one is answered."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    from tests.helpers import NodeProcess

    peers = [
        {"ae_title": "STOREONLY", "hosts": ["127.0.0.1"], "allow": ["echo", "store"]},
        {"ae_title": "MODALITY", "hosts": ["127.0.0.1"], "allow": ["echo", "store", "mpps"]},
    ]
    with NodeProcess(tmp_path / "node", {"peers": peers}) as node:
        answers = {}
        for aet in ("STOREONLY", "MODALITY"):
            scu = AE(ae_title=aet)
            scu.add_requested_context(ModalityPerformedProcedureStep)
            assoc = scu.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            assert assoc.is_established
            step = Dataset()
            step.PerformedProcedureStepStatus = "IN PROGRESS"
            step.Modality = "CT"
            step.ScheduledStepAttributesSequence = []
            status, _ = assoc.send_n_create(step, ModalityPerformedProcedureStep, generate_uid())
            answers[aet] = status.Status
            assoc.release()
        assert answers["STOREONLY"] == 0x0124
        assert answers["MODALITY"] != 0x0124


def test_associations_send_without_nagle_delay(node):
    """Both ends set TCP_NODELAY: a small data set after its command PDU must not wait for a
    delayed ACK (~40 ms per result object otherwise)."""
    import socket
    from types import SimpleNamespace

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node.dispatch.scu import associate
    from node.ingest.receiver import ReusePortServer

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = associate(ae, "127.0.0.1", node.port, ae_title=node.ae_title)
    try:
        assert assoc.is_established
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        assoc.release()
    # The receiver's accept: what its listening socket hands to an association.
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    server = SimpleNamespace(socket=listener, ssl_context=None, ae=SimpleNamespace(acse_timeout=10.0))
    accepted, _ = ReusePortServer.get_request(server)
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert accepted.gettimeout() == 10.0  # no read waits forever: ARTIM until the request is in
    finally:
        for s in (accepted, peer, listener):
            s.close()
