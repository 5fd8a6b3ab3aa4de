"""STOW-RS delivery to a real DICOMweb peer: Orthanc's DICOMweb plugin over HTTPS with basic auth."""

from __future__ import annotations

import io

import pydicom
import pytest

from node.dispatch.outbox import deliver_due
from node.dispatch.table import DELIVERED, FAILED, PENDING
from tests.results.peers import Orthanc
from tests.results.test_dispatcher import enqueue, make_settings, results, rows, run_until_settled

USERS = {"ainode": "s3cret-Pa55"}


@pytest.fixture
def pacs(tmp_path):
    """Orthanc with DICOMweb at /dicom-web/, HTTPS (self-signed) and a registered user."""
    server = Orthanc(tmp_path / "orthanc", dicomweb=True, https=True, users=USERS).start()
    yield server
    server.stop()


def web_destination(pacs: Orthanc, password: str = USERS["ainode"]) -> dict:
    return {
        "name": "web",
        "type": "dicomweb",
        "url": pacs.dicomweb_url,
        "username": "ainode",
        "password": password,
        "tls": {"ca_certificates": str(pacs.ca_file)},
    }


def stored_uids(pacs: Orthanc) -> set[str]:
    """SOP Instance UIDs Orthanc holds, read back through its REST API."""
    return {pacs.instance_tags(i)["SOPInstanceUID"] for i in pacs.instances()}


def test_results_are_stored_in_orthanc_over_https_with_authentication(ct, tmp_path, pacs):
    settings = make_settings(tmp_path, [web_destination(pacs)])
    paths = results(ct, tmp_path)
    enqueue(settings, paths, ["web"])
    assert run_until_settled(settings)
    assert {r.state for r in rows(settings)} == {DELIVERED}
    assert {r.last_status for r in rows(settings)} == {"HTTP 200"}
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in paths}
    assert stored_uids(pacs) == set(sent)
    # The objects arrive whole: Orthanc's copy of the SEG has the node's frames and segments.
    for orthanc_id in pacs.instances():
        copy = pydicom.dcmread(io.BytesIO(pacs.instance_file(orthanc_id)))
        original = pydicom.dcmread(sent[copy.SOPInstanceUID])
        assert copy.SOPClassUID == original.SOPClassUID
        if "PixelData" in original:
            assert copy.PixelData == original.PixelData


def test_wrong_password_fails_with_the_reason(ct, tmp_path, pacs):
    settings = make_settings(tmp_path, [web_destination(pacs, password="wrong")])
    paths = results(ct, tmp_path)
    enqueue(settings, paths, ["web"])
    assert run_until_settled(settings)
    assert {r.state for r in rows(settings)} == {FAILED}
    assert {r.reason for r in rows(settings)} == {"STOW-RS refused the request: HTTP 401 Unauthorized"}
    assert pacs.instances() == []


def test_untrusted_certificate_is_not_sent_to(ct, tmp_path, pacs):
    dest = web_destination(pacs) | {"tls": {}}  # the system's CAs do not know Orthanc's certificate
    settings = make_settings(tmp_path, [dest | {"retry_initial_s": 60}])
    enqueue(settings, results(ct, tmp_path), ["web"])
    deliver_due(settings)
    assert {(r.state, r.last_status) for r in rows(settings)} == {(PENDING, "link")}
    assert "SSLError" in rows(settings)[0].reason
    assert pacs.instances() == []


def test_orthanc_down_is_retried_until_it_is_back(ct, tmp_path):
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, https=True, users=USERS).start()
    pacs.stop(keep_tls=True)  # HTTPS answers, Orthanc behind it is down
    settings = make_settings(tmp_path, [web_destination(pacs)])
    paths = results(ct, tmp_path)
    enqueue(settings, paths, ["web"])
    deliver_due(settings)
    assert {(r.state, r.last_status) for r in rows(settings)} == {(PENDING, "link")}
    assert "STOW-RS request failed" in rows(settings)[0].reason
    pacs.start()
    try:
        assert run_until_settled(settings)
        assert {r.state for r in rows(settings)} == {DELIVERED}
        assert max(r.attempts for r in rows(settings)) >= 2
        assert stored_uids(pacs) == {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    finally:
        pacs.stop()
