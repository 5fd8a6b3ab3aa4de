"""UPS-RS: the Worklist Service of DICOMweb (PS3.18 section 11) on the admin API, and its event
channel on a WebSocket (IHE RAD-109 Open Event Channel).

The same UPS Task Manager as over DIMSE (``node.workflow.manager``: the same rows, state machine,
matching and event outbox), under ``/api/dicomweb``:

- ``POST /workitems{?workitem}`` create (201, Location); ``GET /workitems{?query}`` search;
  ``GET /workitems/{uid}`` retrieve; ``POST /workitems/{uid}{?transaction-uid}`` update;
  ``PUT /workitems/{uid}/state`` change state (Procedure Step State and Transaction UID in the
  body); ``POST /workitems/{uid}/cancelrequest``;
  ``POST|DELETE /workitems/{uid}/subscribers/{aetitle}{?deletionlock}`` subscribe and
  unsubscribe (``uid`` may be the global 1.2.840.10008.5.1.4.34.5 or the filtered global
  1.2.840.10008.5.1.4.34.5.1, whose matching keys are query parameters as for a search);
  ``POST /workitems/1.2.840.10008.5.1.4.34.5/subscribers/{aetitle}/suspend``.
- ``GET /ws/subscribers/{aetitle}`` (WebSocket): the subscriber's events, one DICOM JSON object
  per message, in order, from the durable outbox; each is marked delivered once sent. Events
  queued while no channel was open arrive when one opens.

Bodies and answers are DICOM JSON (``application/dicom+json``); the Transaction UID is never
answered. Each DIMSE status maps to an HTTP status (``HTTP_STATUS``); a warning or failure also
carries a ``Warning: 299 ainode: ...`` header naming the DICOM status (PS3.18 8.x). Reads need a
viewer, changes and the event channel an administrator; changes are audited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket
from fastapi.responses import Response
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from starlette.concurrency import run_in_threadpool

from node.admin.access import Access
from node.core.errors import describe_error
from node.core.settings import Settings
from node.workflow import events, manager, states

log = logging.getLogger("ainode.api")

BASE = "/api/dicomweb"
DICOM_JSON = "application/dicom+json"
# How often an idle event channel looks for new events in the outbox.
CHANNEL_POLL_S = 0.25
_RESERVED = frozenset({"includefield", "limit", "offset", "fuzzymatching", "deletionlock"})
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash, no control
# What a search answers besides the query's own keys (PS3.18 11.9.3: the workitem's identity,
# state and schedule).
_DEFAULT_FIELDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "ProcedureStepState",
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "WorklistLabel",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
    "PatientName",
    "PatientID",
)

# DIMSE status of the UPS services -> HTTP status (PS3.18 11.4-11.11 response tables). Warnings
# answer the operation's success code with a Warning header; unlisted failures of the C3xx
# family are conflicts with the workitem's state; anything else is a server error.
HTTP_STATUS = {
    states.NO_SUCH_UPS: 404,
    manager.DUPLICATE_SOP_INSTANCE: 409,
    manager.MISSING_ATTRIBUTE: 400,
    manager.INVALID_ATTRIBUTE_VALUE: 400,
    manager.NO_SUCH_ACTION: 400,
    states.CREATE_NOT_SCHEDULED: 400,
    states.SCHEDULED_ONLY_BY_N_CREATE: 400,
    states.ACTION_NOT_APPROPRIATE: 400,
    states.RECEIVING_AE_UNKNOWN: 400,
    states.NO_EVENT_REPORTS: 403,
    states.MAY_NO_LONGER_BE_UPDATED: 409,
    states.WRONG_TRANSACTION_UID: 409,
    states.ALREADY_IN_PROGRESS: 409,
    states.FINAL_STATE_NOT_MET: 409,
    states.NOT_YET_IN_PROGRESS: 409,
    states.ALREADY_COMPLETED: 409,
    states.PERFORMER_NOT_CONTACTED: 409,
    states.PERFORMER_WILL_NOT_CANCEL: 409,
    manager.PROCESSING_FAILURE: 500,
}

_TEXTS = {
    states.NO_SUCH_UPS: "no such workitem",
    manager.DUPLICATE_SOP_INSTANCE: "a workitem with this UID exists",
    states.MAY_NO_LONGER_BE_UPDATED: "the workitem may no longer be updated",
    states.WRONG_TRANSACTION_UID: "the correct Transaction UID was not provided",
    states.ALREADY_IN_PROGRESS: "the workitem is already IN PROGRESS",
    states.SCHEDULED_ONLY_BY_N_CREATE: "a workitem becomes SCHEDULED only when created",
    states.FINAL_STATE_NOT_MET: "the final state requirements are not met",
    states.CREATE_NOT_SCHEDULED: "the Procedure Step State of a new workitem must be SCHEDULED",
    states.NOT_YET_IN_PROGRESS: "the workitem is not yet IN PROGRESS",
    states.ALREADY_COMPLETED: "the workitem is already COMPLETED",
    states.ALREADY_CANCELED: "the workitem is already CANCELED",
    states.ALREADY_COMPLETED_WARNING: "the workitem is already COMPLETED",
    states.ACTION_NOT_APPROPRIATE: "the action does not apply to this instance",
    states.RECEIVING_AE_UNKNOWN: "the subscriber AE title is not valid",
}


def http_status(status: int, success: int) -> int:
    """The HTTP status answering a DIMSE status (``success`` for Success and warnings)."""
    if not states.is_failure(status):
        return success
    if status in HTTP_STATUS:
        return HTTP_STATUS[status]
    return 409 if (status & 0xFF00) == 0xC300 else 500


def _warning(answer: manager.Answer) -> str:
    text = answer.comment or _TEXTS.get(answer.status, "")
    # The Warning header is Latin-1 and a quoted string: keep it plain.
    text = re.sub(r'[^\x20-\x7e]|"', "", text)[:200]
    return f'299 ainode "DICOM status 0x{answer.status:04X}{": " + text if text else ""}"'


def _dicom_json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status, headers=headers, media_type=DICOM_JSON)


def _answered(answer: manager.Answer, success: int, headers: dict[str, str] | None = None) -> Response:
    """The HTTP answer to a manager's answer without a data set to return."""
    code = http_status(answer.status, success)
    extra = dict(headers or {}) if code < 300 else {}
    if answer.status != states.SUCCESS:
        extra["Warning"] = _warning(answer)
    if code >= 300:
        detail = answer.comment or _TEXTS.get(answer.status, "") or f"DICOM status 0x{answer.status:04X}"
        return Response(json.dumps({"detail": detail}), code, headers=extra, media_type="application/json")
    return Response(status_code=code, headers=extra)


def _bad(why: str) -> HTTPException:
    return HTTPException(400, why, headers={"Warning": f'299 ainode "{why[:200]}"'})


async def _dataset(request: Request, required: bool = True) -> Dataset:
    """The request body: one DICOM JSON data set (an object, or an array holding one)."""
    body = await request.body()
    if not body.strip():
        if required:
            raise _bad("a DICOM JSON data set is required")
        return Dataset()
    try:
        payload = json.loads(body)
        if isinstance(payload, list):
            if len(payload) != 1:
                raise ValueError("one data set expected")
            payload = payload[0]
        if not isinstance(payload, dict):
            raise ValueError("a DICOM JSON object expected")
        return Dataset.from_json(payload)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise _bad(f"the body is not a DICOM JSON data set: {describe_error(err)}") from None


def _tag(name: str) -> int:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise _bad(f"unknown attribute {name!r}")
    return int(tag)


def _put(ds: Dataset, path: list[str], value: str) -> None:
    """Set a (possibly nested: ``Sequence.Keyword``) matching key from a query parameter."""
    tag = Tag(_tag(path[0]))
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "UN"
    if len(path) > 1:
        if vr != "SQ":
            raise _bad(f"{path[0]} is not a sequence")
        if tag not in ds:
            ds.add_new(tag, "SQ", Sequence([Dataset()]))
        _put(ds[tag].value[0], path[1:], value)
        return
    if vr == "SQ":
        ds.add_new(tag, "SQ", Sequence([]))  # an empty sequence key: return it
        return
    values: Any = value.split("\\") if "\\" in value else value
    if vr in ("US", "UL", "SS", "SL"):
        values = int(value) if value else None
    ds.add_new(tag, vr, values)


def _keys(request: Request) -> Dataset:
    """The matching keys of a search (or filtered subscription) from its query parameters."""
    keys = Dataset()
    for name, value in request.query_params.multi_items():
        if name.lower() in _RESERVED:
            continue
        try:
            _put(keys, name.split("."), value)
        except ValueError as err:
            raise _bad(f"bad value for {name}: {describe_error(err)}") from None
    return keys


def _identifier(request: Request) -> tuple[Dataset, bool]:
    """The C-FIND identifier of a search: its keys, the default fields and ``includefield``; and
    whether every attribute was asked for (``includefield=all``)."""
    identifier = _keys(request)
    every = False
    for field in request.query_params.getlist("includefield"):
        for name in field.split(","):
            name = name.strip()
            if name.lower() == "all":
                every = True
            elif name and Tag(_tag(name)) not in identifier:
                _put(identifier, [name], "")
    for keyword in _DEFAULT_FIELDS:
        if keyword not in identifier:
            _put(identifier, [keyword], "")
    return identifier, every


def _count(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise _bad(f"{name} must be a whole number")
    return int(raw)


def _lock(request: Request) -> str:
    raw = request.query_params.get("deletionlock", "false").lower()
    if raw not in ("true", "false"):
        raise _bad("deletionlock must be true or false")
    return raw.upper()


def router(settings: Settings, access: Access, engine: Any) -> APIRouter:
    """The UPS-RS routes under ``/api/dicomweb`` and the event channel WebSocket."""
    api = APIRouter()
    reader, writer = Depends(access.read), Depends(access.write)
    url, worklist = settings.database.url, settings.node.ae_title

    def changed(request: Request, user: str, what: str, answer: manager.Answer) -> None:
        access.audit_action(request, user, f"UPS-RS {what}: DICOM status 0x{answer.status:04X}", [])

    @api.post(BASE + "/workitems")
    async def create(request: Request, user: str = writer) -> Response:
        """Create Workitem: a new SCHEDULED workitem (201 with its Location; 409 when it exists)."""
        ds = await _dataset(request)
        uid = (
            request.query_params.get("workitem")
            or request.query_params.get("AffectedSOPInstanceUID")
            or str(ds.get("SOPInstanceUID", "") or "")
            or generate_uid()
        )
        answer = await run_in_threadpool(manager.create, url, uid, ds, user[:16], worklist)
        changed(request, user, f"create workitem {manager.short(uid)}", answer)
        location = f"{str(request.base_url).rstrip('/')}{BASE}/workitems/{uid}"
        return _answered(answer, 201, {"Location": location, "Content-Location": location})

    @api.get(BASE + "/workitems")
    async def search(request: Request, user: str = reader) -> Response:
        """Search for Workitems: the same matching as UPS C-FIND (204 when nothing matches)."""
        identifier, every = _identifier(request)
        offset, limit = _count(request, "offset", 0), _count(request, "limit", 1000)
        access.audit_query(user, access.client(request), f"workitems {sorted(request.query_params.keys())}")

        def found() -> list[dict[str, Any]]:
            matches = list(manager.find(url, identifier))[offset : offset + limit]
            if not every:
                return [m.to_json_dict() for m in matches]
            return [
                manager.get(url, str(m.SOPInstanceUID), None).dataset.to_json_dict()  # type: ignore[union-attr]
                for m in matches
            ]

        results = await run_in_threadpool(found)
        return _dicom_json(results) if results else Response(status_code=204)

    @api.get(BASE + "/workitems/{uid}")
    async def retrieve(uid: str, user: str = reader) -> Response:
        """Retrieve Workitem: the whole data set (never the Transaction UID)."""
        answer = await run_in_threadpool(manager.get, url, uid, None)
        if answer.dataset is None:
            return _answered(answer, 200)
        return _dicom_json([answer.dataset.to_json_dict()])

    @api.post(BASE + "/workitems/{uid}")
    async def update(uid: str, request: Request, user: str = writer) -> Response:
        """Update Workitem: a SCHEDULED one, or an IN PROGRESS one with its ``transaction-uid``."""
        mods = await _dataset(request)
        given = request.query_params.get("transaction-uid")
        if given:
            mods.TransactionUID = given
        answer = await run_in_threadpool(manager.set_attributes, url, uid, mods)
        changed(request, user, f"update workitem {manager.short(uid)}", answer)
        return _answered(answer, 200)

    @api.put(BASE + "/workitems/{uid}/state")
    async def change_state(uid: str, request: Request, user: str = writer) -> Response:
        """Change Workitem State: claim (IN PROGRESS with a new Transaction UID), complete or cancel
        (with that Transaction UID); both in the body."""
        info = await _dataset(request)
        if not str(info.get("ProcedureStepState", "") or ""):
            raise _bad("Procedure Step State (0074,1000) is required")
        if not str(info.get("TransactionUID", "") or ""):
            raise _bad("Transaction UID (0008,1195) is required")
        answer = await run_in_threadpool(manager.change_state, url, uid, info, user[:16])
        changed(request, user, f"workitem {manager.short(uid)} to {info.ProcedureStepState}", answer)
        return _answered(answer, 200)

    @api.post(BASE + "/workitems/{uid}/cancelrequest")
    async def cancel_request(uid: str, request: Request, user: str = writer) -> Response:
        """Request Cancellation: a SCHEDULED workitem is canceled, an IN PROGRESS one's performer
        is told (202 Accepted)."""
        info = await _dataset(request, required=False)
        answer = await run_in_threadpool(manager.request_cancel, url, uid, info, user[:16])
        changed(request, user, f"cancel requested for workitem {manager.short(uid)}", answer)
        return _answered(answer, 202)

    def _watch_info(request: Request, uid: str, aetitle: str, with_keys: bool) -> Dataset:
        info = _keys(request) if with_keys and uid == manager.FILTERED_GLOBAL_SUBSCRIPTION else Dataset()
        info.ReceivingAE = aetitle
        info.DeletionLock = _lock(request)
        return info

    @api.post(BASE + "/workitems/{uid}/subscribers/{aetitle}")
    async def subscribe(uid: str, aetitle: str, request: Request, user: str = writer) -> Response:
        """Create Subscription: to one workitem or (well-known UIDs) to all, present and future.
        Events go to the AE title's DIMSE port when it is a peer with one, else (and whenever a
        channel is open) to its WebSocket."""
        info = _watch_info(request, uid, aetitle, with_keys=True)
        answer = await run_in_threadpool(manager.subscribe, url, uid, info, lambda ae: bool(_AE_TITLE.match(ae)))
        changed(request, user, f"subscribe {aetitle}", answer)
        return _answered(answer, 201)

    @api.delete(BASE + "/workitems/{uid}/subscribers/{aetitle}")
    async def unsubscribe(uid: str, aetitle: str, request: Request, user: str = writer) -> Response:
        """Delete Subscription: from one workitem, or (well-known UIDs) from all of them."""
        info = Dataset()
        info.ReceivingAE = aetitle
        answer = await run_in_threadpool(manager.unsubscribe, url, uid, info)
        changed(request, user, f"unsubscribe {aetitle}", answer)
        return _answered(answer, 200)

    @api.post(BASE + "/workitems/{uid}/subscribers/{aetitle}/suspend")
    async def suspend(uid: str, aetitle: str, request: Request, user: str = writer) -> Response:
        """Suspend Global Subscription: no new workitems; the present subscriptions stay."""
        info = Dataset()
        info.ReceivingAE = aetitle
        answer = await run_in_threadpool(manager.suspend_global, url, uid, info)
        changed(request, user, f"suspend global subscription of {aetitle}", answer)
        return _answered(answer, 200)

    @api.websocket(BASE + "/ws/subscribers/{aetitle}")
    async def event_channel(websocket: WebSocket, aetitle: str) -> None:
        """Open Event Channel (RAD-109): the subscriber's events, in order, as DICOM JSON."""
        try:
            user = access.event_channel(websocket)
        except HTTPException as err:
            log.warning("event channel for %s refused (%s)", aetitle, err.status_code)
            await websocket.close(code=1008)
            return
        if not _AE_TITLE.match(aetitle):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        log.info("event channel for %s opened by %s", aetitle, user)
        await _serve_channel(websocket, url, aetitle)

    return api


async def _until_closed(websocket: WebSocket) -> None:
    """Returns when the client closes the socket (what it sends is ignored)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _serve_channel(websocket: WebSocket, url: str, aetitle: str) -> None:
    """Send the subscriber's pending events one by one, each marked delivered once sent, until
    the client goes or a newer channel for the same AE title replaces this one."""
    ticket = events.WEB_CHANNELS.open(aetitle)
    gone = asyncio.ensure_future(_until_closed(websocket))
    sent = 0
    try:
        while not gone.done() and events.WEB_CHANNELS.current(aetitle, ticket):
            batch = await run_in_threadpool(events.pending, url, aetitle, 50)
            for event_id, uid, event_type, info in batch:
                if gone.done() or not events.WEB_CHANNELS.current(aetitle, ticket):
                    break
                message = json.dumps(events.report(uid, event_type, info).to_json_dict(), separators=(",", ":"))
                await websocket.send_text(message)
                await run_in_threadpool(events.delivered, url, event_id)
                sent += 1
            if not batch:
                await asyncio.wait({gone}, timeout=CHANNEL_POLL_S)
    except Exception as err:  # noqa: BLE001 - a send to a vanished client: the event stays pending
        log.info("event channel for %s ended: %s", aetitle, describe_error(err))
    finally:
        events.WEB_CHANNELS.close(aetitle, ticket)
        gone.cancel()
        log.info("event channel for %s closed after %d event(s)", aetitle, sent)
        try:
            await websocket.close()
        except Exception:  # noqa: BLE001 - already closed by the client
            pass
