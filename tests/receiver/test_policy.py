"""Association limits, TLS, SIGTERM draining, MPPS wiring and the PostgreSQL index."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.helpers import NodeProcess, wait_for
from tests.receiver.conftest import echoscu, index_count, storescu

CT = Path(get_testdata_file("CT_small.dcm"))


def _open(node: NodeProcess, aet: str, ssl_context: ssl.SSLContext | None = None):
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    tls_args = (ssl_context, None) if ssl_context else None
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, tls_args=tls_args)


def test_per_peer_association_limit(tmp_path):
    with NodeProcess(tmp_path / "n", {"node": {"max_associations_per_peer": 1, "receivers": 2}}) as node:
        first = _open(node, "PYNETDICOM")
        assert first.is_established
        second = _open(node, "PYNETDICOM")
        assert second.is_rejected
        assert second.acceptor.primitive.result == 0x02  # rejected transient: try again later
        other = _open(node, "TESTSCU")  # another peer has its own allowance
        assert other.is_established
        other.release()
        first.release()
        # The slot comes back when the association ends.
        assert wait_for(lambda: _try(node, "PYNETDICOM"), 30)
        assert "peer association limit reached" in node.log_text()


def _try(node: NodeProcess, aet: str) -> bool:
    assoc = _open(node, aet)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_total_association_limit_across_receivers(tmp_path):
    with NodeProcess(tmp_path / "n", {"node": {"max_associations": 2, "receivers": 2}}) as node:
        held = [_open(node, "PYNETDICOM"), _open(node, "TESTSCU")]
        assert all(a.is_established for a in held)
        refused = _open(node, "MODALITY")
        assert refused.is_rejected and refused.acceptor.primitive.result == 0x02
        for a in held:
            a.release()
        assert wait_for(lambda: _try(node, "MODALITY"), 30)
        assert "total association limit reached" in node.log_text()


def test_sigterm_finishes_open_association(tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    assoc = _open(node, "PYNETDICOM")
    assert assoc.is_established
    stopping = threading.Thread(target=node.stop)
    stopping.start()
    # The node stops accepting new associations but keeps serving the open one.
    assert wait_for(lambda: "stopping" in node.log_text(), 30)
    assert assoc.send_c_echo().Status == 0x0000
    assert stopping.is_alive(), "the node must wait for the open association"
    assoc.release()
    stopping.join()
    assert node.proc.returncode == 0


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    return crt, key


@pytest.fixture
def tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    server = _self_signed(tmp_path, "ainode")
    client = _self_signed(tmp_path, "modality")
    return server, client


def _client_context(
    server_crt: Path, client: tuple[Path, Path] | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(server_crt))
    ctx.check_hostname = False
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    if maximum:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
    return ctx


def test_tls_with_client_certificate(tmp_path, tls_files):
    (server_crt, server_key), client = tls_files
    tls = {
        "enabled": True,
        "certificate": str(server_crt),
        "private_key": str(server_key),
        "ca_certificates": str(client[0]),
        "require_client_certificate": True,
    }
    with NodeProcess(tmp_path / "n", {"node": {"tls": tls}}) as node:
        assoc = _open(node, "PYNETDICOM", _client_context(server_crt, client))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # No client certificate: the handshake fails, no association.
        assert not _open(node, "PYNETDICOM", _client_context(server_crt)).is_established
        # Plain TCP to a TLS port: no association either.
        assert not _open(node, "PYNETDICOM").is_established
        # A client capped at TLS 1.1 is refused (1.2 is the minimum).
        try:
            old = _client_context(server_crt, client, maximum=ssl.TLSVersion.TLSv1_1)
        except (ValueError, ssl.SSLError):
            old = None
        if old is not None:
            assert not _open(node, "PYNETDICOM", old).is_established
        # DCMTK as a TLS peer: storescu --enable-tls with its certificate.
        result = storescu(
            node, CT, extra=("--enable-tls", str(client[1]), str(client[0]), "--add-cert-file", str(server_crt))
        )
        assert "Received Store Response (Success)" in result.stderr, result.stderr
        assert index_count(node) == 1


def test_mpps_context_added_when_stage_provides_handlers(tmp_path):
    from node.ingest import mpps

    if not callable(getattr(mpps, "handlers", None)):
        pytest.skip("node.mpps has no handlers() yet")
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    with NodeProcess(tmp_path / "n") as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established and assoc.accepted_contexts
        assoc.release()


def _postgres_available() -> bool:
    try:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.mark.postgres
def test_index_on_postgresql(tmp_path):
    if not _postgres_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = f"ainode_rx_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        with NodeProcess(tmp_path / "n", {"database": {"url": url}, "node": {"receivers": 2}}) as node:
            folder = tmp_path / "mr"
            folder.mkdir()
            for name_ in ("CT_small.dcm", "MR_small.dcm"):
                shutil.copy(get_testdata_file(name_), folder / name_)
            # Two associations at once through two receiver processes into one database.
            runs = [
                subprocess.Popen(
                    ["storescu", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port), str(folder / f)]
                )
                for aet, f in (("STORESCU", "CT_small.dcm"), ("MODALITY", "MR_small.dcm"))
            ]
            assert all(p.wait() == 0 for p in runs)
            again = storescu(node, folder / "CT_small.dcm")  # identical duplicate: Success, no change
            assert "Received Store Response (Success)" in again.stderr
            assert index_count(node) == 2
            assert echoscu(node).returncode == 0
    finally:
        from node.core.db import dispose_engines

        dispose_engines()
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_silent_tls_peer_does_not_block_others(tmp_path, tls_files):
    import socket

    (server_crt, server_key), client = tls_files
    tls = {"enabled": True, "certificate": str(server_crt), "private_key": str(server_key)}
    with NodeProcess(tmp_path / "n", {"node": {"tls": tls, "receivers": 1}}) as node:
        silent = socket.create_connection(("127.0.0.1", node.port))  # connects, never says hello
        try:
            assoc = _open(node, "PYNETDICOM", _client_context(server_crt))
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        finally:
            silent.close()
