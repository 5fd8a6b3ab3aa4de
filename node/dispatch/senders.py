"""Senders: one per destination type, each sending a batch of outbox rows and reporting an outcome per row.

``dicom``: C-STORE on one association (TLS when configured). ``dicomweb``: one STOW-RS request (dicomweb-client).
``hl7`` (``node.dispatch.hl7``) and ``fhir`` (``node.dispatch.fhir``): the SR's report to a RIS.
A sender raises ``LinkDown`` when the destination could not be reached at all; otherwise it
classifies each object's answer: delivered, retry (transient) or failed (permanent)
(``node.dispatch.link``).
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.core.dicom import SUCCESS
from node.core.settings import Destination, Settings
from node.dispatch.fhir import send_fhir_batch
from node.dispatch.hl7 import send_hl7_batch
from node.dispatch.link import LinkDown, Outcome, Progress, Sender, tls_context, tls_failure
from node.dispatch.scu import associate
from node.dispatch.table import DELIVERED, FAILED, PENDING, Delivery


def classify_dimse_status(status: int) -> Outcome:
    """A C-STORE status by class (PS3.4 B.2.3 and PS3.7 C): success, retry or permanent."""
    code = f"0x{status:04X}"
    if status == SUCCESS:
        return Outcome(DELIVERED, code)
    if status in (0x0001, 0x0107, 0x0116) or (status & 0xF000) == 0xB000:
        return Outcome(DELIVERED, code, "warning")
    if (status & 0xFF00) == 0xA700 or status in (0x0210, 0x0211, 0x0212, 0x0213):
        return Outcome(PENDING, code, "out of resources (A7xx): will retry")
    if (status & 0xFF00) == 0xA900:
        return Outcome(FAILED, code, "data set does not match SOP class (A9xx)")
    if (status & 0xF000) == 0xC000:
        return Outcome(FAILED, code, "cannot understand (Cxxx)")
    return Outcome(FAILED, code, "refused")


def send_dicom(
    dest: Destination,
    rows: list[Delivery],
    calling_ae: str,
    settings: Settings | None = None,
    progress: Progress | None = None,
) -> dict[int, Outcome]:
    """C-STORE every row's file on one association; Explicit VR Little Endian, one context per SOP class.

    ``progress`` is called after each answered object, so its outcome is recorded at once (a
    sender killed mid-batch re-sends only what was in flight).
    """
    ae = AE(ae_title=calling_ae)
    timeouts = settings.node if settings else None
    ae.acse_timeout = timeouts.acse_timeout_s if timeouts else 30
    ae.dimse_timeout = timeouts.dimse_timeout_s if timeouts else 60
    ae.network_timeout = timeouts.network_timeout_s if timeouts else 60
    for sop_class in sorted({r.sop_class_uid for r in rows}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    # Verification too: a peer refusing every result SOP class still gets an association, so the
    # refusal is recorded per object as permanent instead of looking like a link failure.
    ae.add_requested_context("1.2.840.10008.1.1")
    kwargs: dict[str, Any] = {"ae_title": dest.ae_title}
    if dest.tls.enabled:
        kwargs["tls_args"] = (tls_context(dest), dest.host)
    assoc = associate(ae, dest.host, dest.port, **kwargs)
    if not assoc.is_established:
        why = (
            "association rejected"
            if assoc.is_rejected
            else "association aborted"
            if assoc.is_aborted
            else "connection failed"
        )
        if dest.tls.enabled:
            why = tls_failure(dest) or why
        raise LinkDown(f"{why} ({dest.ae_title}@{dest.host}:{dest.port})")
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    outcomes: dict[int, Outcome] = {}
    try:
        for row in rows:
            if row.sop_class_uid not in accepted:
                outcomes[row.id] = Outcome(
                    FAILED, "no-context", f"destination does not accept SOP class {row.sop_class_uid}"
                )
                continue
            if not Path(row.path).exists():
                outcomes[row.id] = Outcome(FAILED, "missing", f"result file is gone: {row.path}")
                continue
            if not assoc.is_established:
                break  # the peer went away between two objects: the rest count as not sent
            try:
                status = assoc.send_c_store(Path(row.path))
            except RuntimeError:  # pynetdicom: the association ended as this request started
                status = None
            if not status or "Status" not in status:
                # No response: the association died mid-transfer; this and the rest retry.
                outcomes[row.id] = Outcome(PENDING, "no-response", "association lost during C-STORE")
                break
            outcomes[row.id] = classify_dimse_status(int(status.Status))
            if progress is not None:
                progress(row, outcomes[row.id])
    finally:
        if assoc.is_established:
            assoc.release()
    for row in rows:
        outcomes.setdefault(row.id, Outcome(PENDING, "not-sent", "association ended before this object"))
    if all(o.status in ("no-response", "not-sent", "no-context", "missing") for o in outcomes.values()) and any(
        o.status in ("no-response", "not-sent") for o in outcomes.values()
    ):
        raise LinkDown("association lost before any object was acknowledged")
    return outcomes


def _stow_failures(response: Dataset | None) -> dict[str, str]:
    """SOP Instance UID → failure reason from a STOW-RS response's Failed SOP Sequence (PS3.18 10.5.3)."""
    failed = {}
    for item in getattr(response, "FailedSOPSequence", None) or []:
        uid = str(getattr(item, "ReferencedSOPInstanceUID", ""))
        reason = getattr(item, "FailureReason", None)
        failed[uid] = f"0x{int(reason):04X}" if reason not in (None, "") else "failed"
    return failed


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The DICOM JSON body of a STOW-RS answer, or None when it has none (or not JSON)."""
    if response is None or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


class DestinationSession(requests.Session):
    """A requests session whose own CA file is used even when REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE is set.

    requests lets those variables override ``Session.verify`` (psf/requests#3829); a destination's
    configured CA must win, or a private PACS certificate is refused on hosts that set them.
    """

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001, ANN201, D102
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and isinstance(self.verify, str):
            settings["verify"] = self.verify
        return settings


def stow_client(dest: Destination) -> DICOMwebClient:
    """A dicomweb-client for the destination: basic auth, its CA and client certificate, no retries.

    The outbox owns retrying (backoff, breaker), so the client's own retry loop is turned off.
    """
    session = DestinationSession()
    if dest.username:
        session.auth = (dest.username, dest.password or "")
    if dest.tls.ca_certificates:
        session.verify = str(dest.tls.ca_certificates)
    if dest.tls.certificate and dest.tls.private_key:
        session.cert = (str(dest.tls.certificate), str(dest.tls.private_key))
    # A chunk size above any batch: some servers (Orthanc among them) refuse chunked STOW-RS bodies.
    client = DICOMwebClient(url=dest.url.rstrip("/"), session=session, timeout=120, chunk_size=2**40)
    client.set_http_retry_params(retry=False)
    return client


def send_dicomweb(dest: Destination, rows: list[Delivery]) -> dict[int, Outcome]:
    """STOW-RS all rows in one request to ``<url>/studies`` (dicomweb-client) and classify the answer.

    200: all delivered. 202 and 409: the instances in the Failed SOP Sequence failed, the others
    are delivered (409 with no sequence: all failed). 408, 429, 5xx and no answer: ``LinkDown``
    (retried). Any other 4xx (401 wrong password, 415, ...): failed for good with the reason.
    """
    present = [r for r in rows if Path(r.path).exists()]
    outcomes = {r.id: Outcome(FAILED, "missing", f"result file is gone: {r.path}") for r in rows if r not in present}
    if not present:
        return outcomes
    datasets = [dcmread(r.path) for r in present]
    try:
        answer = stow_client(dest).store_instances(datasets)
        code = 200
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else 0
        answer = _response_dataset(err.response)
        if code in (408, 429) or code >= 500 or code == 0:
            raise LinkDown(f"STOW-RS answered HTTP {code}") from None
    except (requests.RequestException, OSError) as err:
        raise LinkDown(f"STOW-RS request failed: {type(err).__name__}: {err}") from None
    failures = _stow_failures(answer)
    stored = {str(getattr(i, "ReferencedSOPInstanceUID", "")) for i in getattr(answer, "ReferencedSOPSequence", [])}
    if failures and code == 200:
        code = 202  # dicomweb-client hides the status; a Failed SOP Sequence on success means 202
    for row in present:
        uid = row.sop_instance_uid
        if uid in failures:
            reason = f"STOW-RS refused the instance: failure reason {failures[uid]}"
            outcomes[row.id] = Outcome(FAILED, f"HTTP {code}", reason)
        elif code in (200, 202) or (code == 409 and uid in stored):
            outcomes[row.id] = Outcome(DELIVERED, f"HTTP {code}")
        else:
            outcomes[row.id] = Outcome(
                FAILED, f"HTTP {code}", f"STOW-RS refused the request: HTTP {code} {_phrase(code)}"
            )
    return outcomes


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def send_dicom_batch(
    dest: Destination, rows: list[Delivery], settings: Settings, progress: Progress | None = None
) -> dict[int, Outcome]:
    """The ``dicom`` sender: C-STORE as the node's AE title."""
    return send_dicom(dest, rows, settings.node.ae_title, settings, progress)


def send_dicomweb_batch(
    dest: Destination, rows: list[Delivery], settings: Settings, progress: Progress | None = None
) -> dict[int, Outcome]:
    """The ``dicomweb`` sender: STOW-RS (one request; outcomes known only at its end)."""
    return send_dicomweb(dest, rows)


# One sender per destination type (core.settings.Destination.type).
SENDERS: dict[str, Sender] = {
    "dicom": send_dicom_batch,
    "dicomweb": send_dicomweb_batch,
    "hl7": send_hl7_batch,
    "fhir": send_fhir_batch,
}
