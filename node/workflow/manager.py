"""The UPS Task Manager's operations on the durable rows (UPS Push, Pull and Watch as an SCP).

Each operation is one database transaction: it reads the workitem, asks ``states`` what the
request does, writes the new row and the N-EVENT-REPORTs it owes to subscribers
(``table.UpsEvent``) together, and returns the DIMSE status (and data set) to answer. A change
is written only if the row's version is still the one read: of two performers claiming the same
workitem at once, the second one finds it IN PROGRESS (C302), whichever process serves it.

No patient data is logged: workitems are named by their SOP Instance UID's short hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from node.core.clock import utcnow
from node.core.db import database_session
from node.workflow import match, states
from node.workflow.table import GLOBAL, PENDING, Subscription, UpsEvent, Workitem

log = logging.getLogger("ainode.workflow")

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
# The well-known UPS instances a watcher subscribes to for every workitem (PS3.4 CC.3.1).
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"
WELL_KNOWN = (GLOBAL_SUBSCRIPTION, FILTERED_GLOBAL_SUBSCRIPTION)

# General DIMSE statuses (PS3.7 C) the UPS services also answer.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION = 0x0123

TRANSACTION_UID = Tag(0x0008, 0x1195)
# N-CREATE: Type 1 attributes (a value is required) and Type 2 (present, may be empty) of the
# UPS Push N-CREATE (PS3.4 CC.2.5.1.3, Table CC.2.5-3) the node checks.
CREATE_TYPE_1 = (
    "ProcedureStepState",
    "ScheduledProcedureStepPriority",
    "ProcedureStepLabel",
    "ScheduledProcedureStepStartDateTime",
    "InputReadinessState",
)
CREATE_TYPE_2 = (
    "PatientName",
    "PatientID",
    "ScheduledWorkitemCodeSequence",
    "InputInformationSequence",
)
PRIORITIES = ("HIGH", "MEDIUM", "LOW")
READINESS = ("READY", "UNAVAILABLE", "INCOMPLETE")
_CONFLICT_TRIES = 8


def short(uid: str) -> str:
    """A workitem's name in the logs: a short hash of its UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


@dataclass
class Answer:
    """What a DIMSE handler answers: the status and, when there is one, a data set."""

    status: int
    dataset: Dataset | None = None
    comment: str = ""


@dataclass
class _Change:
    """What an operation decided for a workitem: the new columns and the events it owes."""

    answer: Answer
    values: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[int, Dataset]] = field(default_factory=list)


class _Conflict(Exception):
    """The row changed since it was read (another process wrote it first)."""


# --- data sets ---------------------------------------------------------------------------------


def load(row: Workitem) -> Dataset:
    """The workitem's data set (Transaction UID never in it)."""
    return Dataset.from_json(row.dataset or "{}")


def dump(ds: Dataset) -> str:
    """DICOM JSON of a data set, the Transaction UID left out."""
    ds = _without_transaction_uid(ds)
    return json.dumps(ds.to_json_dict(), separators=(",", ":"))


def _without_transaction_uid(ds: Dataset) -> Dataset:
    copy = Dataset()
    for elem in ds:
        if elem.tag != TRANSACTION_UID:
            copy.add(elem)
    return copy


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _columns(ds: Dataset) -> dict[str, Any]:
    return {
        "patient_id": _text(ds, "PatientID")[:64],
        "scheduled_start": _text(ds, "ScheduledProcedureStepStartDateTime")[:26],
    }


def final_state_met(ds: Dataset, requested: str) -> bool:
    """The final state requirements of Table CC.2.5-3 for COMPLETED (the UPS Performed Procedure
    Sequence with its start and end date-times, and the Output Information Sequence present).
    CANCELED: the node fills the Procedure Step Cancellation DateTime itself, so it is always met."""
    if requested != states.COMPLETED:
        return True
    performed = ds.get("UnifiedProcedureStepPerformedProcedureSequence")
    if not performed:
        return False
    item = performed[0]
    return (
        bool(_text(item, "PerformedProcedureStepStartDateTime"))
        and bool(_text(item, "PerformedProcedureStepEndDateTime"))
        and "OutputInformationSequence" in item
    )


def _mark_canceled(ds: Dataset, reason: str = "") -> None:
    progress = ds.get("ProcedureStepProgressInformationSequence")
    if not progress:
        ds.ProcedureStepProgressInformationSequence = Sequence([Dataset()])
        progress = ds.ProcedureStepProgressInformationSequence
    item = progress[0]
    if not _text(item, "ProcedureStepCancellationDateTime"):
        item.ProcedureStepCancellationDateTime = utcnow().strftime("%Y%m%d%H%M%S")
    if reason and not _text(item, "ReasonForCancellation"):
        item.ReasonForCancellation = reason[:1024]


def state_report(ds: Dataset, state: str) -> Dataset:
    """The Event Information of a UPS State Report (Table CC.2.4-1)."""
    info = Dataset()
    info.ProcedureStepState = state
    info.InputReadinessState = _text(ds, "InputReadinessState") or "READY"
    if state == states.CANCELED:
        item = (ds.get("ProcedureStepProgressInformationSequence") or [Dataset()])[0]
        if _text(item, "ReasonForCancellation"):
            info.ReasonForCancellation = _text(item, "ReasonForCancellation")
    return info


# --- the one way a workitem is changed ---------------------------------------------------------


def _owed(session: Session, uid: str, events: list[tuple[int, Dataset]]) -> None:
    """Queue each event for every subscriber of the workitem, in order (same transaction)."""
    if not events:
        return
    subscribers = session.scalars(
        select(Subscription.ae_title).where(Subscription.workitem_uid == uid).order_by(Subscription.id)
    ).all()
    for ae in subscribers:
        for event_type, info in events:
            _queue(session, ae, uid, event_type, info)


def _queue(session: Session, ae: str, uid: str, event_type: int, info: Dataset) -> None:
    session.add(
        UpsEvent(
            subscriber_ae=ae,
            workitem_uid=uid,
            event_type=event_type,
            info=json.dumps(info.to_json_dict(), separators=(",", ":")),
            state=PENDING,
        )
    )


def _mutate(url: str, uid: str, decide: Callable[[Workitem, Dataset], _Change]) -> Answer:
    """Read the workitem, decide, write the change if the row is still as read (else again)."""
    for _ in range(_CONFLICT_TRIES):
        try:
            with database_session(url) as session:
                row = session.scalar(select(Workitem).where(Workitem.sop_instance_uid == uid))
                if row is None:
                    return Answer(states.NO_SUCH_UPS, comment="no such workitem")
                change = decide(row, load(row))
                if change.values:
                    values = {**change.values, "version": row.version + 1, "updated_at": utcnow()}
                    moved = session.execute(
                        update(Workitem)
                        .where(Workitem.id == row.id, Workitem.version == row.version)
                        .values(**values)
                        .execution_options(synchronize_session=False)
                    ).rowcount
                    if moved != 1:
                        raise _Conflict
                _owed(session, uid, change.events)
                return change.answer
        except (_Conflict, OperationalError):
            continue  # another process wrote it first (or held the lock): read it again
    log.error("workitem %s: %d conflicting updates in a row", short(uid), _CONFLICT_TRIES)
    return Answer(PROCESSING_FAILURE, comment="too many concurrent updates")


# --- UPS Push: N-CREATE, N-SET, N-GET, N-ACTION Request Cancel ---------------------------------


def check_create(ds: Dataset) -> Answer | None:
    """The N-CREATE's data set against Table CC.2.5-3: None when it may be created."""
    for keyword in CREATE_TYPE_1:
        if not _text(ds, keyword):
            return Answer(MISSING_ATTRIBUTE, comment=f"{keyword} is required")
    for keyword in CREATE_TYPE_2:
        if keyword not in ds:
            return Answer(MISSING_ATTRIBUTE, comment=f"{keyword} must be present")
    status = states.create_state(_text(ds, "ProcedureStepState"))
    if status != states.SUCCESS:
        return Answer(status, comment="Procedure Step State must be SCHEDULED")
    if _text(ds, "ScheduledProcedureStepPriority") not in PRIORITIES:
        return Answer(INVALID_ATTRIBUTE_VALUE, comment="priority must be HIGH, MEDIUM or LOW")
    if _text(ds, "InputReadinessState") not in READINESS:
        return Answer(INVALID_ATTRIBUTE_VALUE, comment="Input Readiness State not READY, UNAVAILABLE, INCOMPLETE")
    if not match.valid_datetime(_text(ds, "ScheduledProcedureStepStartDateTime")):
        return Answer(INVALID_ATTRIBUTE_VALUE, comment="Scheduled Procedure Step Start DateTime is not a DT")
    return None


def create(
    url: str, uid: str, ds: Dataset, calling_ae: str, default_worklist: str, job_id: int | None = None
) -> Answer:
    """UPS Push N-CREATE: a new SCHEDULED workitem; global subscribers are subscribed to it and
    told (UPS State Report SCHEDULED). ``job_id``: the node's own workitem for a job it queued
    (at most one per job: a second is refused as a duplicate)."""
    problem = check_create(ds)
    if problem is not None:
        return problem
    ds = _without_transaction_uid(ds)  # a Transaction UID is the performer's, given when it claims
    if not _text(ds, "WorklistLabel"):
        ds.WorklistLabel = default_worklist  # Type 2 the SCP fills (PS3.4 CC.2.5.1.3.1)
    ds.SOPClassUID = UPS_PUSH
    ds.SOPInstanceUID = uid
    try:
        with database_session(url) as session:
            session.add(
                Workitem(
                    sop_instance_uid=uid,
                    state=states.SCHEDULED,
                    dataset=dump(ds),
                    creator_ae=calling_ae[:16],
                    job_id=job_id,
                    **_columns(ds),
                )
            )
            session.flush()
            _subscribe_global_watchers(session, uid, ds)
            _owed(session, uid, [(states.EVENT_STATE_REPORT, state_report(ds, states.SCHEDULED))])
    except IntegrityError:
        return Answer(DUPLICATE_SOP_INSTANCE, comment="a workitem with this UID exists")
    log.info("workitem %s created (SCHEDULED) by %s", short(uid), calling_ae)
    return Answer(states.SUCCESS, ds)


def _subscribe_global_watchers(session: Session, uid: str, ds: Dataset) -> None:
    watchers = session.scalars(select(Subscription).where(Subscription.workitem_uid == GLOBAL)).all()
    for watcher in watchers:
        if watcher.filter and not match.matches(ds, Dataset.from_json(watcher.filter)):
            continue
        session.add(Subscription(ae_title=watcher.ae_title, workitem_uid=uid, deletion_lock=watcher.deletion_lock))


def get(url: str, uid: str, tags: list[Any] | None) -> Answer:
    """UPS N-GET: the requested attributes (all when none are named); never the Transaction UID."""
    with database_session(url) as session:
        row = session.scalar(select(Workitem).where(Workitem.sop_instance_uid == uid))
        if row is None:
            return Answer(states.NO_SUCH_UPS, comment="no such workitem")
        ds = load(row)
    if not tags:
        return Answer(states.SUCCESS, ds)
    answer = Dataset()
    for tag in tags:
        tag = Tag(tag)
        if tag == TRANSACTION_UID:
            continue
        if tag in ds:
            answer.add(ds[tag])
    return Answer(states.SUCCESS, answer)


def set_attributes(url: str, uid: str, mods: Dataset) -> Answer:
    """UPS N-SET: change a SCHEDULED workitem, or an IN PROGRESS one with its Transaction UID."""
    given = _text(mods, "TransactionUID")

    def decide(row: Workitem, ds: Dataset) -> _Change:
        status = states.may_set(row.state, row.transaction_uid, given)
        if status != states.SUCCESS:
            return _Change(Answer(status))
        asked = _text(mods, "ProcedureStepState")
        if asked and asked != row.state:
            # The state changes only by N-ACTION (and becomes SCHEDULED only by N-CREATE).
            if asked == states.SCHEDULED:
                return _Change(Answer(states.SCHEDULED_ONLY_BY_N_CREATE))
            return _Change(Answer(INVALID_ATTRIBUTE_VALUE, comment="the state changes by N-ACTION only"))
        for elem in mods:
            if elem.tag in (TRANSACTION_UID, Tag("SOPInstanceUID"), Tag("SOPClassUID")):
                continue
            ds[elem.tag] = elem
        events = []
        if "ProcedureStepProgressInformationSequence" in mods and row.state == states.IN_PROGRESS:
            info = Dataset()
            info.ProcedureStepProgressInformationSequence = ds.ProcedureStepProgressInformationSequence
            events.append((states.EVENT_PROGRESS_REPORT, info))
        return _Change(Answer(states.SUCCESS), {"dataset": dump(ds), **_columns(ds)}, events)

    return _mutate(url, uid, decide)


def request_cancel(url: str, uid: str, info: Dataset, calling_ae: str) -> Answer:
    """UPS Push N-ACTION Request Cancel: a SCHEDULED workitem is canceled at once; an IN PROGRESS
    one's performer and watchers are told (UPS Cancel Requested) and its performer decides."""
    reason = _text(info, "ReasonForCancellation")

    def decide(row: Workitem, ds: Dataset) -> _Change:
        outcome = states.request_cancel(row.state)
        if states.is_failure(outcome.status) or not (outcome.changed or outcome.cancel_requested):
            return _Change(Answer(outcome.status))
        if outcome.cancel_requested:
            notice = Dataset()
            notice.RequestingAE = calling_ae
            for keyword in ("ReasonForCancellation", "ContactDisplayName", "ContactURI"):
                if _text(info, keyword):
                    setattr(notice, keyword, _text(info, keyword))
            return _Change(
                Answer(states.SUCCESS), {"cancel_requested": True}, [(states.EVENT_CANCEL_REQUESTED, notice)]
            )
        _mark_canceled(ds, reason)
        return _Change(Answer(outcome.status), _state_values(ds, outcome.state), _reports(ds, outcome))

    answer = _mutate(url, uid, decide)
    log.info("workitem %s: cancel requested by %s, answer 0x%04X", short(uid), calling_ae, answer.status)
    return answer


def _state_values(ds: Dataset, state: str) -> dict[str, Any]:
    ds.ProcedureStepState = state
    values: dict[str, Any] = {"state": state, "dataset": dump(ds)}
    if state in states.FINAL_STATES:
        values["finished_at"] = utcnow()
    return values


def _reports(ds: Dataset, outcome: states.Outcome) -> list[tuple[int, Dataset]]:
    return [(states.EVENT_STATE_REPORT, state_report(ds, state)) for state in outcome.reports]


# --- UPS Pull: N-ACTION Change State -----------------------------------------------------------


def change_state(url: str, uid: str, info: Dataset, calling_ae: str) -> Answer:
    """UPS Pull N-ACTION Change State: claim (IN PROGRESS with a new Transaction UID), complete or
    cancel (with the Transaction UID it was claimed with)."""
    requested = _text(info, "ProcedureStepState")
    given = _text(info, "TransactionUID")
    if requested not in states.STATES:
        return Answer(INVALID_ATTRIBUTE_VALUE, comment="Procedure Step State is not a UPS state")

    def decide(row: Workitem, ds: Dataset) -> _Change:
        if requested == states.IN_PROGRESS and row.state == states.SCHEDULED and not given:
            return _Change(Answer(MISSING_ATTRIBUTE, comment="a claim needs a Transaction UID"))
        outcome = states.change_state(row.state, requested, row.transaction_uid, given, final_state_met(ds, requested))
        if not outcome.changed:
            return _Change(Answer(outcome.status))
        if outcome.state == states.CANCELED:
            _mark_canceled(ds)
        values = _state_values(ds, outcome.state)
        if outcome.state == states.IN_PROGRESS:
            values.update(transaction_uid=given, performer_ae=calling_ae[:16])
        return _Change(Answer(outcome.status), values, _reports(ds, outcome))

    answer = _mutate(url, uid, decide)
    log.info("workitem %s: %s asked for %s, answer 0x%04X", short(uid), calling_ae, requested, answer.status)
    return answer


# --- UPS Watch: subscribe, unsubscribe, suspend ------------------------------------------------


def subscribe(url: str, uid: str, info: Dataset, known: Callable[[str], bool]) -> Answer:
    """UPS Watch N-ACTION Subscribe: to one workitem (an initial UPS State Report follows), or to
    every workitem (the well-known UIDs: existing ones now, new ones when created)."""
    receiving = _text(info, "ReceivingAE")
    if not receiving:
        return Answer(MISSING_ATTRIBUTE, comment="Receiving AE is required")
    if not known(receiving):
        return Answer(states.RECEIVING_AE_UNKNOWN, comment="Receiving AE is not a peer with a port")
    lock = _text(info, "DeletionLock").upper() == "TRUE"
    keys = _matching_keys(info) if uid == FILTERED_GLOBAL_SUBSCRIPTION else None
    with database_session(url) as session:
        if uid in WELL_KNOWN:
            _upsert(session, receiving, GLOBAL, lock, dump(keys) if keys is not None else "")
            rows = session.scalars(select(Workitem).where(Workitem.state.in_((states.SCHEDULED, states.IN_PROGRESS))))
            for row in rows:
                ds = load(row)
                if keys is None or match.matches(ds, keys):
                    _upsert(session, receiving, row.sop_instance_uid, lock)
                    _queue(
                        session, receiving, row.sop_instance_uid, states.EVENT_STATE_REPORT, state_report(ds, row.state)
                    )
        else:
            row = session.scalar(select(Workitem).where(Workitem.sop_instance_uid == uid))
            if row is None:
                return Answer(states.NO_SUCH_UPS, comment="no such workitem")
            _upsert(session, receiving, uid, lock)
            _queue(session, receiving, uid, states.EVENT_STATE_REPORT, state_report(load(row), row.state))
    log.info("watcher %s subscribed to %s", receiving, "every workitem" if uid in WELL_KNOWN else short(uid))
    return Answer(states.SUCCESS)


def _matching_keys(info: Dataset) -> Dataset:
    keys = Dataset()
    for elem in info:
        if elem.keyword not in ("ReceivingAE", "DeletionLock"):
            keys.add(elem)
    return keys


def _upsert(session: Session, ae: str, uid: str, lock: bool, keys: str = "") -> None:
    row = session.scalar(select(Subscription).where(Subscription.ae_title == ae, Subscription.workitem_uid == uid))
    if row is None:
        session.add(Subscription(ae_title=ae, workitem_uid=uid, deletion_lock=lock, filter=keys))
        session.flush()
    else:
        row.deletion_lock, row.filter = lock, keys


def unsubscribe(url: str, uid: str, info: Dataset) -> Answer:
    """UPS Watch N-ACTION Unsubscribe: from one workitem, or (well-known UIDs) from all of them."""
    receiving = _text(info, "ReceivingAE")
    if not receiving:
        return Answer(MISSING_ATTRIBUTE, comment="Receiving AE is required")
    with database_session(url) as session:
        query = delete(Subscription).where(Subscription.ae_title == receiving)
        # Events still owed to it are no longer wanted (and would keep a final workitem forever).
        owed = delete(UpsEvent).where(UpsEvent.subscriber_ae == receiving, UpsEvent.state == PENDING)
        if uid not in WELL_KNOWN:
            if session.scalar(select(Workitem.id).where(Workitem.sop_instance_uid == uid)) is None:
                return Answer(states.NO_SUCH_UPS, comment="no such workitem")
            query = query.where(Subscription.workitem_uid == uid)
            owed = owed.where(UpsEvent.workitem_uid == uid)
        session.execute(query)
        session.execute(owed)
    log.info("watcher %s unsubscribed from %s", receiving, "every workitem" if uid in WELL_KNOWN else short(uid))
    return Answer(states.SUCCESS)


def suspend_global(url: str, uid: str, info: Dataset) -> Answer:
    """UPS Watch N-ACTION Suspend Global Subscription: no new workitems, the present ones kept."""
    receiving = _text(info, "ReceivingAE")
    if uid not in WELL_KNOWN:
        return Answer(states.ACTION_NOT_APPROPRIATE, comment="suspend applies to the global subscription")
    if not receiving:
        return Answer(MISSING_ATTRIBUTE, comment="Receiving AE is required")
    with database_session(url) as session:
        session.execute(
            delete(Subscription).where(Subscription.ae_title == receiving, Subscription.workitem_uid == GLOBAL)
        )
    return Answer(states.SUCCESS)


# --- UPS Pull (and Watch): C-FIND --------------------------------------------------------------


def find(url: str, identifier: Dataset) -> Iterator[Dataset]:
    """The workitems matching a C-FIND identifier, each as the identifier's keys filled in."""
    query = select(Workitem).order_by(Workitem.id)
    state = _text(identifier, "ProcedureStepState")
    if state and not match.has_wildcards(state) and identifier["ProcedureStepState"].VM == 1:
        query = query.where(Workitem.state == state)
    patient_id = _text(identifier, "PatientID")
    if patient_id and not match.has_wildcards(patient_id) and identifier["PatientID"].VM == 1:
        query = query.where(Workitem.patient_id == patient_id)
    with database_session(url) as session:
        rows = [(row.sop_instance_uid, row.dataset) for row in session.scalars(query)]
    for _uid, text in rows:
        ds = Dataset.from_json(text)
        if match.matches(ds, identifier):
            yield match.answer(ds, identifier)


# --- retention ---------------------------------------------------------------------------------


def purge_final(url: str, keep_hours: float) -> int:
    """Delete COMPLETED and CANCELED workitems older than ``keep_hours`` that no watcher holds a
    deletion lock on, with their subscriptions and delivered events; how many were deleted."""
    cutoff = utcnow() - timedelta(hours=keep_hours)
    with database_session(url) as session:
        locked = select(Subscription.workitem_uid).where(Subscription.deletion_lock.is_(True))
        pending = select(UpsEvent.workitem_uid).where(UpsEvent.state == PENDING)
        old = session.scalars(
            select(Workitem.sop_instance_uid).where(
                Workitem.state.in_(states.FINAL_STATES),
                Workitem.finished_at < cutoff,
                Workitem.sop_instance_uid.not_in(locked),
                Workitem.sop_instance_uid.not_in(pending),
            )
        ).all()
        if not old:
            return 0
        session.execute(delete(Subscription).where(Subscription.workitem_uid.in_(old)))
        session.execute(delete(UpsEvent).where(UpsEvent.workitem_uid.in_(old)))
        session.execute(delete(Workitem).where(Workitem.sop_instance_uid.in_(old)))
    log.info("%d final workitem(s) older than %.0f h deleted", len(old), keep_hours)
    return len(old)
