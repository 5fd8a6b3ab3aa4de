"""UPS-RS (PS3.18 section 11) against a real node: httpx as the RIS, performer and watcher over
DICOMweb, and websocket-client as the watcher's event channel (IHE RAD-109)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterator

import httpx
import pytest
import websocket
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.admin.passwords import hash_password
from tests.helpers import NodeProcess, wait_for
from tests.workflow.conftest import WATCHER, Watcher, final_state, workitem

BASE = "/api/dicomweb"
GLOBAL = "1.2.840.10008.5.1.4.34.5"
FILTERED = "1.2.840.10008.5.1.4.34.5.1"
VIEWER, VIEWER_PASSWORD = "reader", "reader-password-1"
TRANSACTION_UID_TAG = "00081195"
STATE_TAG = "00741000"


@pytest.fixture(scope="module")
def dimse_watcher() -> Iterator[Watcher]:
    """A watcher that is also a peer with a DIMSE port (WATCHER)."""
    w = Watcher().start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, dimse_watcher) -> Iterator[NodeProcess]:
    users = [{"name": VIEWER, "role": "viewer", "password_hash": hash_password(VIEWER_PASSWORD)}]
    peers = [{"ae_title": WATCHER, "hosts": ["127.0.0.1"], "allow": ["echo", "ups"], "port": dimse_watcher.port}]
    config = {
        "api": {"users": users, "token": "ups-rs-test-token-0123456789"},
        "workflow": {"event_retry_s": 0.3, "event_retry_max_s": 1.0},
        "peers": peers,
    }
    with NodeProcess(tmp_path_factory.mktemp("upsrs") / "node", config) as n:
        assert wait_for(lambda: api_up(n), 120), n.log_text()[-3000:]
        yield n


def api_up(node: NodeProcess) -> bool:
    try:
        return httpx.get(node.api_base + "/api/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def admin(node) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {node.api_token}"}
    with httpx.Client(base_url=node.api_base + BASE, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def viewer(node) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node.api_base + BASE, auth=(VIEWER, VIEWER_PASSWORD), timeout=60) as client:
        yield client


def as_json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict())


def create(admin: httpx.Client, ds: Dataset | None = None) -> str:
    uid = generate_uid()
    answer = admin.post("/workitems", params={"workitem": uid}, content=as_json(ds or workitem()), headers=JSON)
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"].endswith(f"{BASE}/workitems/{uid}")
    return uid


JSON = {"Content-Type": "application/dicom+json"}


def state(admin: httpx.Client, uid: str, value: str, transaction: str | None) -> httpx.Response:
    body: dict[str, Any] = {STATE_TAG: {"vr": "CS", "Value": [value]}}
    if transaction is not None:
        body[TRANSACTION_UID_TAG] = {"vr": "UI", "Value": [transaction]}
    return admin.put(f"/workitems/{uid}/state", content=json.dumps(body), headers=JSON)


def dicom_status(answer: httpx.Response) -> str:
    """The DICOM status the Warning header names ('' without one)."""
    warning = answer.headers.get("warning", "")
    return warning.split("DICOM status 0x", 1)[1][:4] if "DICOM status 0x" in warning else ""


def channel(node: NodeProcess, ae_title: str, token: str | None = None) -> websocket.WebSocket:
    url = node.api_base.replace("http", "ws", 1) + f"{BASE}/ws/subscribers/{ae_title}"
    return websocket.create_connection(url, header=[f"Authorization: Bearer {token or node.api_token}"], timeout=60)


def receive(ws: websocket.WebSocket, uid: str, count: int) -> list[Dataset]:
    """The next ``count`` events about ``uid`` (events about other workitems are skipped)."""
    out = []
    while len(out) < count:
        ds = Dataset.from_json(json.loads(ws.recv()))
        if str(ds.AffectedSOPInstanceUID) == uid:
            out.append(ds)
    return out


def pending_events(node: NodeProcess, ae_title: str) -> int:
    with sqlite3.connect(node.database_url.removeprefix("sqlite:///")) as db:
        return db.execute(
            "SELECT COUNT(*) FROM ups_events WHERE subscriber_ae = ? AND state = 'pending'", (ae_title,)
        ).fetchone()[0]


def test_create_search_retrieve_update(admin):
    uid = create(admin, workitem(patient_id="P-RS-1"))
    again = admin.post("/workitems", params={"workitem": uid}, content=as_json(workitem()), headers=JSON)
    assert again.status_code == 409 and dicom_status(again) == "0111"

    found = admin.get("/workitems", params={"PatientID": "P-RS-1", "ProcedureStepState": "SCHEDULED"})
    assert found.status_code == 200 and found.headers["content-type"].startswith("application/dicom+json")
    items = [Dataset.from_json(d) for d in found.json()]
    assert [str(d.SOPInstanceUID) for d in items] == [uid]
    assert str(items[0].ProcedureStepLabel) == "CT organ segmentation"  # a default field
    coded = admin.get(
        "/workitems", params={"ScheduledWorkitemCodeSequence.CodeValue": "AI-CT-SEG", "PatientID": "P-RS-1"}
    )
    assert [d["00080018"]["Value"][0] for d in coded.json()] == [uid]
    assert admin.get("/workitems", params={"PatientID": "NOBODY"}).status_code == 204
    assert admin.get("/workitems", params={"NoSuchKeyword": "x"}).status_code == 400

    got = admin.get(f"/workitems/{uid}")
    assert got.status_code == 200
    ds = Dataset.from_json(got.json()[0])
    assert str(ds.PatientID) == "P-RS-1" and str(ds.ProcedureStepState) == "SCHEDULED"

    mods = Dataset()
    mods.ProcedureStepLabel = "CT organ segmentation, v2"
    assert admin.post(f"/workitems/{uid}", content=as_json(mods), headers=JSON).status_code == 200
    assert Dataset.from_json(admin.get(f"/workitems/{uid}").json()[0]).ProcedureStepLabel == "CT organ segmentation, v2"


def test_a_workitem_from_scheduled_to_completed_on_the_event_channel(node, admin):
    assert admin.post(f"/workitems/{GLOBAL}/subscribers/WEBWATCH").status_code == 201
    ws = channel(node, "WEBWATCH")
    try:
        uid = create(admin, workitem(patient_id="P-RS-FLOW"))
        transaction = generate_uid()
        assert state(admin, uid, "IN PROGRESS", transaction).status_code == 200
        # The Transaction UID is never answered: not by retrieve, not by search.
        assert TRANSACTION_UID_TAG not in admin.get(f"/workitems/{uid}").json()[0]
        searched = admin.get("/workitems", params={"PatientID": "P-RS-FLOW", "includefield": "all"})
        assert all(TRANSACTION_UID_TAG not in d for d in searched.json())
        asked = admin.get("/workitems", params={"PatientID": "P-RS-FLOW", "TransactionUID": ""})
        assert all(not d.get(TRANSACTION_UID_TAG, {}).get("Value") for d in asked.json())
        # Update an IN PROGRESS workitem: only with its Transaction UID.
        mods = final_state(transaction)
        del mods.TransactionUID
        refused = admin.post(f"/workitems/{uid}", content=as_json(mods), headers=JSON)
        assert refused.status_code == 409 and dicom_status(refused) == "C301"
        updated = admin.post(
            f"/workitems/{uid}", params={"transaction-uid": transaction}, content=as_json(mods), headers=JSON
        )
        assert updated.status_code == 200, updated.text
        assert state(admin, uid, "COMPLETED", transaction).status_code == 200

        reports = receive(ws, uid, 3)
        assert [str(r.ProcedureStepState) for r in reports] == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
        assert all(int(r.EventTypeID) == 1 for r in reports)
        assert all(str(r.AffectedSOPClassUID) == "1.2.840.10008.5.1.4.34.6.1" for r in reports)
    finally:
        ws.close()
    assert admin.delete(f"/workitems/{GLOBAL}/subscribers/WEBWATCH").status_code == 200


def test_every_state_violation_has_its_http_status(admin):
    bad = workitem()
    bad.ProcedureStepState = "IN PROGRESS"
    answer = admin.post("/workitems", content=as_json(bad), headers=JSON)
    assert (answer.status_code, dicom_status(answer)) == (400, "C309")
    incomplete = workitem()
    del incomplete.ProcedureStepLabel
    answer = admin.post("/workitems", content=as_json(incomplete), headers=JSON)
    assert (answer.status_code, dicom_status(answer)) == (400, "0120")
    assert admin.post("/workitems", content=b"not json", headers=JSON).status_code == 400

    uid = create(admin)
    assert state(admin, uid, "IN PROGRESS", None).status_code == 400  # no Transaction UID
    answer = state(admin, uid, "SCHEDULED", generate_uid())
    assert (answer.status_code, dicom_status(answer)) == (400, "C303")
    answer = state(admin, uid, "COMPLETED", generate_uid())
    assert (answer.status_code, dicom_status(answer)) == (409, "C310")
    transaction = generate_uid()
    assert state(admin, uid, "IN PROGRESS", transaction).status_code == 200
    answer = state(admin, uid, "IN PROGRESS", generate_uid())
    assert (answer.status_code, dicom_status(answer)) == (409, "C302")
    answer = state(admin, uid, "COMPLETED", generate_uid())
    assert (answer.status_code, dicom_status(answer)) == (409, "C301")
    answer = state(admin, uid, "COMPLETED", transaction)
    assert (answer.status_code, dicom_status(answer)) == (409, "C304")  # final state requirements
    assert state(admin, uid, "CANCELED", transaction).status_code == 200
    answer = state(admin, uid, "CANCELED", transaction)
    assert (answer.status_code, dicom_status(answer)) == (200, "B304")  # a repeat: a warning
    mods = Dataset()
    mods.ProcedureStepLabel = "too late"
    answer = admin.post(
        f"/workitems/{uid}", params={"transaction-uid": transaction}, content=as_json(mods), headers=JSON
    )
    assert (answer.status_code, dicom_status(answer)) == (409, "C300")

    done = create(admin)
    assert state(admin, done, "IN PROGRESS", transaction).status_code == 200
    admin.post(
        f"/workitems/{done}",
        params={"transaction-uid": transaction},
        content=as_json(final_state(transaction)),
        headers=JSON,
    )
    assert state(admin, done, "COMPLETED", transaction).status_code == 200
    answer = admin.post(f"/workitems/{done}/cancelrequest")
    assert (answer.status_code, dicom_status(answer)) == (409, "C311")

    scheduled = create(admin)
    assert admin.post(f"/workitems/{scheduled}/cancelrequest").status_code == 202
    got = Dataset.from_json(admin.get(f"/workitems/{scheduled}").json()[0])
    assert str(got.ProcedureStepState) == "CANCELED"
    answer = admin.post(f"/workitems/{scheduled}/cancelrequest")
    assert (answer.status_code, dicom_status(answer)) == (202, "B304")

    unknown = generate_uid()
    for answer in (
        admin.get(f"/workitems/{unknown}"),
        state(admin, unknown, "IN PROGRESS", generate_uid()),
        admin.post(f"/workitems/{unknown}/cancelrequest"),
        admin.post(f"/workitems/{unknown}", content=as_json(mods), headers=JSON),
        admin.post(f"/workitems/{unknown}/subscribers/WEBWATCH"),
    ):
        assert (answer.status_code, dicom_status(answer)) == (404, "C307")
    answer = admin.post(f"/workitems/{scheduled}/subscribers/WEBWATCH/suspend")
    assert (answer.status_code, dicom_status(answer)) == (400, "C314")
    answer = admin.post(f"/workitems/{GLOBAL}/subscribers/{'X' * 17}")
    assert (answer.status_code, dicom_status(answer)) == (400, "C308")
    assert admin.post(f"/workitems/{GLOBAL}/subscribers/WEBWATCH", params={"deletionlock": "maybe"}).status_code == 400


def test_a_closed_channel_gets_the_events_it_missed_when_reopened(node, admin):
    uid = create(admin, workitem(patient_id="P-RS-LATE"))
    assert admin.post(f"/workitems/{uid}/subscribers/LATECOMER").status_code == 201
    ws = channel(node, "LATECOMER")
    assert [str(r.ProcedureStepState) for r in receive(ws, uid, 1)] == ["SCHEDULED"]  # the initial report
    ws.close()
    assert wait_for(lambda: pending_events(node, "LATECOMER") == 0)

    transaction = generate_uid()
    assert state(admin, uid, "IN PROGRESS", transaction).status_code == 200
    reason = Dataset()
    reason.ReasonForCancellation = "patient left"
    assert admin.post(f"/workitems/{uid}/cancelrequest", content=as_json(reason), headers=JSON).status_code == 202
    assert pending_events(node, "LATECOMER") == 2  # kept while no channel is open

    ws = channel(node, "LATECOMER")
    try:
        claimed, cancel = receive(ws, uid, 2)
        assert (int(claimed.EventTypeID), str(claimed.ProcedureStepState)) == (1, "IN PROGRESS")
        assert int(cancel.EventTypeID) == 2 and str(cancel.ReasonForCancellation) == "patient left"
    finally:
        ws.close()
    assert wait_for(lambda: pending_events(node, "LATECOMER") == 0)

    assert admin.delete(f"/workitems/{uid}/subscribers/LATECOMER").status_code == 200
    assert state(admin, uid, "CANCELED", transaction).status_code == 200
    assert pending_events(node, "LATECOMER") == 0  # unsubscribed: nothing more owed


def test_a_filtered_global_subscription_takes_only_matching_workitems(node, admin):
    answer = admin.post(f"/workitems/{FILTERED}/subscribers/CTONLY", params={"PatientID": "P-RS-CT"})
    assert answer.status_code == 201
    wanted = create(admin, workitem(patient_id="P-RS-CT"))
    other = create(admin, workitem(patient_id="P-RS-MR"))
    ws = channel(node, "CTONLY")
    try:
        assert str(receive(ws, wanted, 1)[0].ProcedureStepState) == "SCHEDULED"
    finally:
        ws.close()
    with sqlite3.connect(node.database_url.removeprefix("sqlite:///")) as db:
        about = {r[0] for r in db.execute("SELECT workitem_uid FROM ups_events WHERE subscriber_ae = 'CTONLY'")}
    assert wanted in about and other not in about
    assert admin.post(f"/workitems/{GLOBAL}/subscribers/CTONLY/suspend").status_code == 200


def test_a_viewer_searches_and_retrieves_but_changes_nothing(node, admin, viewer):
    uid = create(admin, workitem(patient_id="P-RS-VIEW"))
    assert viewer.get("/workitems", params={"PatientID": "P-RS-VIEW"}).status_code == 200
    assert viewer.get(f"/workitems/{uid}").status_code == 200
    assert viewer.post("/workitems", content=as_json(workitem()), headers=JSON).status_code == 403
    assert state(viewer, uid, "IN PROGRESS", generate_uid()).status_code == 403
    assert viewer.post(f"/workitems/{uid}/cancelrequest").status_code == 403
    assert viewer.post(f"/workitems/{uid}/subscribers/SPY").status_code == 403
    assert viewer.delete(f"/workitems/{GLOBAL}/subscribers/WEBWATCH").status_code == 403
    assert str(Dataset.from_json(admin.get(f"/workitems/{uid}").json()[0]).ProcedureStepState) == "SCHEDULED"
    # The event channel takes events off the outbox: an administrator's; no login, no channel.
    url = node.api_base.replace("http", "ws", 1) + f"{BASE}/ws/subscribers/WEBWATCH"
    for header in ([], ["Authorization: Basic cmVhZGVyOnJlYWRlci1wYXNzd29yZC0x"], ["Authorization: Bearer wrong"]):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, header=header, timeout=60)
        assert refused.value.status_code == 403  # the handshake is refused before the socket opens
    assert httpx.get(node.api_base + BASE + "/workitems").status_code == 401
    # A page on another site (DNS rebinding) gets no channel either, even with the token.
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            url, header=[f"Authorization: Bearer {node.api_token}"], host="evil.example", timeout=60
        )
    assert refused.value.status_code == 421


def test_a_dimse_watcher_with_an_open_channel_gets_its_events_there(node, admin, dimse_watcher):
    uid = create(admin, workitem(patient_id="P-RS-BOTH"))
    assert admin.post(f"/workitems/{uid}/subscribers/{WATCHER}").status_code == 201
    assert wait_for(lambda: dimse_watcher.states(uid) == ["SCHEDULED"])  # no channel: by N-EVENT-REPORT
    ws = channel(node, WATCHER)
    try:
        transaction = generate_uid()
        assert state(admin, uid, "IN PROGRESS", transaction).status_code == 200
        assert str(receive(ws, uid, 1)[0].ProcedureStepState) == "IN PROGRESS"  # the channel takes it
    finally:
        ws.close()
    assert state(admin, uid, "CANCELED", transaction).status_code == 200
    # Channel closed: DIMSE again; the IN PROGRESS report went to the channel only.
    assert wait_for(lambda: dimse_watcher.states(uid)[-1:] == ["CANCELED"])
    assert dimse_watcher.states(uid) == ["SCHEDULED", "CANCELED"]
