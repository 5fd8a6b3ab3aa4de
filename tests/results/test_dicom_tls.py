"""Delivery and storage commitment over DICOM TLS: to DCMTK's storescp with TLS, and to a pynetdicom
Storage Commitment SCP behind TLS. The certificates (a CA, the PACS's, the node's) are made here."""

from __future__ import annotations

import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from node.core.dicom import STORAGE_COMMITMENT_PUSH
from node.dispatch.commitment import commitment_handlers
from node.dispatch.outbox import deliver_destination
from node.dispatch.table import DELIVERED, PENDING
from tests.helpers import free_port, port_open, wait_for
from tests.pki import OPENSSL, authority, signed
from tests.results.test_dispatcher import KOS_SOP, SEG_SOP, SR_SOP, enqueue, make_settings, results, rows

STORESCP = "/usr/bin/storescp"


@pytest.fixture
def pki(tmp_path):
    """The hospital CA, the PACS's and the node's certificates signed by it; another CA and a
    certificate it signed (a stranger to the hospital)."""
    if not (Path(OPENSSL).exists() and Path(STORESCP).exists()):
        pytest.skip("openssl or DCMTK storescp not installed")
    folder = tmp_path / "pki"
    folder.mkdir()
    ca, other_ca = authority(folder, "hospital-ca"), authority(folder, "other-ca")
    return {
        "ca": ca[0],
        "pacs": signed(folder, "pacs", ca),
        "node": signed(folder, "ainode", ca),
        "other_ca": other_ca[0],
        "stranger": signed(folder, "stranger", other_ca),
    }


class TlsStoreSCP:
    """DCMTK storescp with TLS (its certificate signed by the hospital CA), writing to a folder."""

    def __init__(self, folder: Path, pki: dict, require_client_certificate: bool):
        self.aet, self.port, self.out = "TLSSCP", free_port(), folder
        folder.mkdir()
        crt, key = pki["pacs"]
        peer = ["--add-cert-file", str(pki["ca"]), "--require-peer-cert"]
        command = [STORESCP, "--enable-tls", str(key), str(crt), "--null-passwd"]
        command += peer if require_client_certificate else ["--ignore-peer-cert"]
        command += ["-aet", self.aet, "-od", str(folder), str(self.port)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_for(lambda: port_open(self.port) or self._process.poll() is not None, timeout=30)
        assert self._process.poll() is None, self._process.stderr.read().decode()

    def received(self) -> set[str]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.out.iterdir()}

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


def _destination(scp: TlsStoreSCP, ca: Path, client: tuple[Path, Path]) -> dict:
    """A TLS destination trusting ``ca``, presenting ``client`` (a certificate is required by TLSSettings)."""
    tls = {"enabled": True, "ca_certificates": str(ca), "certificate": str(client[0]), "private_key": str(client[1])}
    return {"name": "pacs", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port, "tls": tls}


def _deliver(settings) -> dict[str, int]:
    return deliver_destination(settings, "pacs")


def _sop_instances(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_delivery_to_storescp_over_tls(tmp_path, ct, pki):
    """Results reach DCMTK over TLS when the node trusts the PACS's CA; not with another CA."""
    scp = TlsStoreSCP(tmp_path / "storescp", pki, require_client_certificate=False)
    try:
        paths = results(ct, tmp_path)
        # Trusting only a CA that did not sign the PACS's certificate: no delivery, a TLS reason.
        untrusting = make_settings(tmp_path, [_destination(scp, pki["other_ca"], pki["node"])])
        enqueue(untrusting, paths, ["pacs"])
        assert _deliver(untrusting)["retry"] == len(paths)
        refused = rows(untrusting)
        assert {r.state for r in refused} == {PENDING}
        assert all(r.reason.startswith("TLS handshake failed: CERTIFICATE_VERIFY_FAILED") for r in refused)
        assert scp.received() == set()

        # Trusting the hospital CA: every object is delivered and arrives in storescp's folder.
        trusting = make_settings(tmp_path, [_destination(scp, pki["ca"], pki["node"])])
        assert wait_for(lambda: _deliver(trusting)["delivered"] == len(paths), timeout=60, interval=0.3)
        assert {r.state for r in rows(trusting)} == {DELIVERED}
        assert scp.received() == _sop_instances(paths)
    finally:
        scp.stop()


def test_mutual_tls_delivery_to_storescp(tmp_path, ct, pki):
    """storescp requiring a client certificate from the hospital CA: a stranger's is refused, the node's works."""
    scp = TlsStoreSCP(tmp_path / "storescp", pki, require_client_certificate=True)
    try:
        paths = results(ct, tmp_path)
        stranger = make_settings(tmp_path, [_destination(scp, pki["ca"], pki["stranger"])])
        enqueue(stranger, paths, ["pacs"])
        assert _deliver(stranger)["retry"] == len(paths)
        assert {r.state for r in rows(stranger)} == {PENDING}
        assert scp.received() == set()

        mutual = make_settings(tmp_path, [_destination(scp, pki["ca"], pki["node"])])
        assert wait_for(lambda: _deliver(mutual)["delivered"] == len(paths), timeout=60, interval=0.3)
        assert {r.state for r in rows(mutual)} == {DELIVERED}
        assert scp.received() == _sop_instances(paths)
    finally:
        scp.stop()


class TlsCommitmentSCP:
    """A PACS behind TLS (client certificate required) that stores, accepts Storage Commitment
    requests and reports every object committed on a new association to the node's listener."""

    def __init__(self, pki: dict, listener_port: int):
        self.aet, self.port, self.listener_port = "TLSPACS", free_port(), listener_port
        self.transactions: list[str] = []
        self.stored: set[str] = set()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(*pki["pacs"])
        context.load_verify_locations(pki["ca"])
        context.verify_mode = ssl.CERT_REQUIRED
        ae = AE(ae_title=self.aet)
        for sop_class in (SEG_SOP, SR_SOP, KOS_SOP):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(StorageCommitmentPushModel)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)]
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=context
        )

    def _on_store(self, event):  # noqa: ANN001
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _on_action(self, event):  # noqa: ANN001
        request = event.action_information
        self.transactions.append(str(request.TransactionUID))
        threading.Thread(target=self._report, args=(request,), daemon=True).start()
        return 0x0000, None

    def _report(self, request: Dataset) -> None:
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        report.ReferencedSOPSequence = list(request.ReferencedSOPSequence)
        ae = AE(ae_title=self.aet)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", self.listener_port, ae_title="AINODE")
        if assoc.is_established:
            assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            assoc.release()

    def stop(self) -> None:
        self._server.shutdown()


def test_storage_commitment_over_tls(tmp_path, ct, pki):
    """The N-ACTION goes over TLS with the node's certificate, as the delivery did; the report is recorded."""
    listener_port = free_port()
    pacs = TlsCommitmentSCP(pki, listener_port)
    crt, key = pki["node"]
    tls = {"enabled": True, "ca_certificates": str(pki["ca"]), "certificate": str(crt), "private_key": str(key)}
    settings = make_settings(
        tmp_path,
        [
            {
                "name": "pacs",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.port,
                "tls": tls,
                "storage_commitment": True,
            }
        ],
    )
    listener = AE(ae_title="AINODE")
    listener.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", listener_port), block=False, evt_handlers=commitment_handlers(settings)
    )
    try:
        paths = results(ct, tmp_path)
        enqueue(settings, paths, ["pacs"])
        assert _deliver(settings)["delivered"] == len(paths)
        assert pacs.stored == _sop_instances(paths)
        assert len(pacs.transactions) == 1, [r.reason for r in rows(settings)]
        assert wait_for(lambda: {r.commitment for r in rows(settings)} == {"committed"}, timeout=60)
        assert {r.transaction_uid for r in rows(settings)} == set(pacs.transactions)
    finally:
        server.shutdown()
        pacs.stop()
