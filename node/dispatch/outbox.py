"""Dispatcher: the durable outbox of result objects and their delivery to the destinations.

A result file is written by the result writers and recorded here (one ``Delivery`` row per object
and destination) before anything is sent, so a crash or restart loses nothing. ``deliver`` claims
due rows of one destination with a lease, sends them on one association (C-STORE) or request
(STOW-RS), and records the outcome by status class:

- success and warnings (0000, Bxxx): delivered;
- connection failures, association rejects/aborts, Out of Resources (A7xx), HTTP 408/429/5xx:
  retried with exponential backoff from ``retry_initial_s`` capped at ``retry_max_s``;
- refused SOP class, A9xx, Cxxx and other HTTP 4xx: failed for good, with the reason.

A destination whose link fails is skipped until its circuit breaker closes again, so a PACS that
is down does not hold up the others. A worker killed while sending leaves its rows "sending" with
an expired lease; the next pass takes them over (the PACS sees the same UIDs again: idempotent).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pydicom
from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint, func, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.core.clock import aware, utcnow
from node.core.db import Base, engine_for, session_scope
from node.core.dicom import STORAGE_COMMITMENT_PUSH
from node.core.settings import Destination, Settings, current_settings
from node.dispatch.kinds import ResultObject, kind_of, wanted_kinds

log = logging.getLogger("ainode.dispatcher")

PENDING, SENDING, DELIVERED, FAILED, SKIPPED = "pending", "sending", "delivered", "failed", "skipped"
STATES = (PENDING, SENDING, DELIVERED, FAILED, SKIPPED)
# How long a claimed row belongs to one sender; after that another process may take it over.
LEASE_S = 120.0
# Objects sent per association / request.
BATCH_SIZE = 200


class Delivery(Base):
    """One result object to be sent to one destination (the outbox row)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_delivery_object"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    destination: Mapped[str] = mapped_column(String(128), index=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[str] = mapped_column(String(32), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    # Storage Commitment: "", "requested", "committed", "failed".
    commitment: Mapped[str] = mapped_column(String(16), default="")
    transaction_uid: Mapped[str] = mapped_column(String(64), default="")


class DestinationHealth(Base):
    """The circuit breaker of one destination."""

    __tablename__ = "destination_health"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    open_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# --- outcomes --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one object: delivered, retry (transient) or failed (permanent)."""

    result: str  # DELIVERED | PENDING (retry) | FAILED
    status: str = ""
    reason: str = ""


def classify_dimse_status(status: int) -> Outcome:
    """A C-STORE status by class (PS3.4 B.2.3 and PS3.7 C): success, retry or permanent."""
    code = f"0x{status:04X}"
    if status == 0x0000:
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


def backoff_s(dest: Destination, attempts: int) -> float:
    """Exponential backoff: retry_initial_s · 2^(attempts-1), capped at retry_max_s."""
    return min(dest.retry_max_s, dest.retry_initial_s * (2 ** max(attempts - 1, 0)))


# --- the outbox ------------------------------------------------------------------------------


def destination_wants(dest: Destination, kind: str) -> bool:
    """Whether a destination's capability profile asks for this kind of object."""
    return kind in wanted_kinds(dest.capabilities)


def enqueue_results(session: Session, job_id: int, objects: Iterable[ResultObject],
                    destination_names: Iterable[str], settings: Settings | None = None) -> list[int]:
    """Record one outbox row per (object, destination) in the caller's transaction; return row ids.

    The files must already be on disk. With ``settings``, objects a destination's capability
    profile does not ask for are left out. An object already in the outbox for a destination
    (same SOP Instance UID: a re-run of the job) is not added twice; a failed one is re-armed.
    """
    ids: list[int] = []
    names = list(destination_names)
    for obj in objects:
        path = str(obj.path)
        for name in names:
            if settings is not None and not destination_wants(settings.destination(name), obj.kind):
                continue
            row = session.scalar(select(Delivery).where(Delivery.destination == name,
                                                        Delivery.sop_instance_uid == obj.sop_instance_uid))
            if row is None:
                row = Delivery(job_id=job_id, destination=name, path=path, kind=obj.kind,
                               sop_class_uid=obj.sop_class_uid, sop_instance_uid=obj.sop_instance_uid,
                               study_instance_uid=obj.study_instance_uid, state=PENDING, next_attempt_at=utcnow())
                session.add(row)
            elif row.state in (FAILED, SKIPPED):
                row.state, row.path, row.attempts, row.next_attempt_at = PENDING, path, 0, utcnow()
            elif row.state == PENDING:
                row.path = path
            session.flush()
            ids.append(row.id)
    return ids


def _breaker_open(session: Session, name: str, now: datetime) -> bool:
    health = session.get(DestinationHealth, name)
    return bool(health and health.open_until and aware(health.open_until) > now)


def claim(session: Session, destination: str, first_id: int | None = None, limit: int = BATCH_SIZE,
          lease_s: float = LEASE_S) -> list[Delivery]:
    """Take due rows of one destination for this process (conditional UPDATE per row).

    Due means pending with its retry time passed, or sending with an expired lease (its sender
    died). ``first_id`` is claimed first when it is due, then other due rows of the destination.
    """
    now = utcnow()
    due = or_(Delivery.state == PENDING, Delivery.state == SENDING)
    query = select(Delivery.id).where(Delivery.destination == destination, due).order_by(Delivery.id).limit(limit)
    candidates = list(session.scalars(query))
    if first_id is not None and first_id in candidates:
        candidates.remove(first_id)
        candidates.insert(0, first_id)
    claimed = []
    for row_id in candidates:
        result = session.execute(
            update(Delivery).where(
                Delivery.id == row_id,
                or_((Delivery.state == PENDING) & (Delivery.next_attempt_at <= now),
                    (Delivery.state == SENDING) & (Delivery.lease_until < now)))
            .values(state=SENDING, lease_until=now + timedelta(seconds=lease_s), attempts=Delivery.attempts + 1))
        if result.rowcount == 1:
            claimed.append(row_id)
    session.commit()
    return [session.get(Delivery, i) for i in claimed]


# --- senders ---------------------------------------------------------------------------------


class LinkDown(Exception):
    """The destination could not be reached or the association/request failed as a whole."""


def _tls_context(dest: Destination) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls.ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls.certificate and dest.tls.private_key:
        context.load_cert_chain(dest.tls.certificate, dest.tls.private_key)
    return context


Progress = Callable[[Delivery, Outcome], None]


def send_dicom(dest: Destination, rows: list[Delivery], calling_ae: str, settings: Settings | None = None,
               progress: Progress | None = None) -> dict[int, Outcome]:
    """C-STORE every row's file on one association; Explicit VR Little Endian, one context per SOP class.

    ``progress`` is called after each answered object, so its outcome is recorded at once (a
    sender killed mid-batch re-sends only what was in flight).
    """
    from pynetdicom import AE
    from node.dispatch.scu import associate
    from pydicom.uid import ExplicitVRLittleEndian

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
        kwargs["tls_args"] = (_tls_context(dest), dest.host)
    assoc = associate(ae, dest.host, dest.port, **kwargs)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted \
            else "connection failed"
        raise LinkDown(f"{why} ({dest.ae_title}@{dest.host}:{dest.port})")
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    outcomes: dict[int, Outcome] = {}
    try:
        for row in rows:
            if row.sop_class_uid not in accepted:
                outcomes[row.id] = Outcome(FAILED, "no-context", f"destination does not accept SOP class {row.sop_class_uid}")
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
    if all(o.status in ("no-response", "not-sent", "no-context", "missing") for o in outcomes.values()) \
            and any(o.status in ("no-response", "not-sent") for o in outcomes.values()):
        raise LinkDown("association lost before any object was acknowledged")
    return outcomes


def _multipart(paths: list[str], boundary: str) -> bytes:
    body = bytearray()
    for path in paths:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += Path(path).read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def _stow_failures(payload: bytes) -> dict[str, str]:
    """SOP Instance UID → failure reason from a STOW-RS response (PS3.18 DICOM JSON)."""
    try:
        doc = json.loads(payload or b"{}")
    except ValueError:
        return {}
    failed = {}
    for item in (doc.get("00081198", {}) or {}).get("Value", []):  # Failed SOP Sequence
        uid = item.get("00081155", {}).get("Value", [""])[0]
        reason = item.get("00081197", {}).get("Value", [""])[0]  # Failure Reason
        failed[uid] = f"0x{int(reason):04X}" if reason != "" else "failed"
    return failed


def send_dicomweb(dest: Destination, rows: list[Delivery]) -> dict[int, Outcome]:
    """STOW-RS all rows in one multipart/related request to ``<url>/studies``."""
    present = [r for r in rows if Path(r.path).exists()]
    outcomes = {r.id: Outcome(FAILED, "missing", f"result file is gone: {r.path}") for r in rows if r not in present}
    if not present:
        return outcomes
    boundary = uuid.uuid4().hex
    request = urllib.request.Request(
        dest.url.rstrip("/") + "/studies", data=_multipart([r.path for r in present], boundary), method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                 "Accept": "application/dicom+json"})
    if dest.username:
        import base64

        token = base64.b64encode(f"{dest.username}:{dest.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = _tls_context(dest) if dest.url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as response:
            code, payload = response.status, response.read()
    except urllib.error.HTTPError as err:
        code, payload = err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        raise LinkDown(f"STOW-RS request failed: {getattr(err, 'reason', err)}") from None
    if code in (408, 429) or code >= 500:
        raise LinkDown(f"STOW-RS answered HTTP {code}")
    failures = _stow_failures(payload)
    for row in present:
        if code in (200, 202) and row.sop_instance_uid not in failures:
            outcomes[row.id] = Outcome(DELIVERED, f"HTTP {code}")
        else:
            reason = failures.get(row.sop_instance_uid, "")
            outcomes[row.id] = Outcome(FAILED, f"HTTP {code}", f"STOW-RS refused the instance {reason}".strip())
    return outcomes


# --- delivery --------------------------------------------------------------------------------


def lease_s(settings: Settings) -> float:
    """How long a claim holds without news: one DIMSE exchange plus connection set-up, with margin."""
    node = settings.node
    return max(10.0, node.dimse_timeout_s + node.acse_timeout_s + 10.0)


def _record(session: Session, dest: Destination, rows: list[Delivery], outcomes: dict[int, Outcome]) -> None:
    for row in rows:
        _record_one(row, dest, outcomes[row.id])


def _record_one(row: Delivery, dest: Destination, outcome: Outcome) -> None:
    """Apply one object's outcome to its row (delivered, failed for good, or retry later)."""
    now = utcnow()
    row.last_status, row.lease_until = outcome.status, None
    if outcome.result == DELIVERED:
        row.state, row.delivered_at, row.reason = DELIVERED, now, outcome.reason
    elif outcome.result == FAILED:
        row.state, row.reason = FAILED, outcome.reason
        log.error("delivery %s to %s failed for good: %s %s", row.id, dest.name, outcome.status, outcome.reason)
    else:
        row.state, row.reason = PENDING, outcome.reason
        row.next_attempt_at = now + timedelta(seconds=backoff_s(dest, row.attempts))


def _link_down(session: Session, dest: Destination, rows: list[Delivery], error: str) -> None:
    """Every claimed row retries later; the destination's breaker opens for the backoff time."""
    now = utcnow()
    health = session.get(DestinationHealth, dest.name) or DestinationHealth(name=dest.name, consecutive_failures=0)
    session.add(health)
    health.consecutive_failures = (health.consecutive_failures or 0) + 1
    health.open_until = now + timedelta(seconds=backoff_s(dest, health.consecutive_failures))
    health.last_error = error
    for row in rows:
        row.state, row.lease_until, row.last_status, row.reason = PENDING, None, "link", error
        row.next_attempt_at = max(now + timedelta(seconds=backoff_s(dest, row.attempts)), aware(health.open_until))
    log.warning("destination %s unreachable (%s); %d objects wait, retry after %.0f s", dest.name, error,
                len(rows), backoff_s(dest, health.consecutive_failures))


def _link_up(session: Session, dest: Destination) -> None:
    health = session.get(DestinationHealth, dest.name) or DestinationHealth(name=dest.name)
    session.add(health)
    health.consecutive_failures, health.open_until, health.last_error = 0, None, ""
    health.last_success_at = utcnow()


def deliver(delivery_id: int, settings: Settings | None = None) -> dict[str, int]:
    """Send the outbox row ``delivery_id`` (with the other due rows of its destination).

    Safe to call from several processes at once: rows are claimed with a lease. Returns counts
    of this pass's outcomes, e.g. {"delivered": 3, "retry": 0, "failed": 0}.
    """
    settings = settings or current_settings()
    engine = engine_for(settings.database.url)
    with session_scope(engine) as session:
        row = session.get(Delivery, delivery_id)
        if row is None or row.state in (DELIVERED, FAILED, SKIPPED):
            return {"delivered": 0, "retry": 0, "failed": 0}
        name = row.destination
    return deliver_destination(settings, name, first_id=delivery_id)


def deliver_destination(settings: Settings, name: str, first_id: int | None = None) -> dict[str, int]:
    """One delivery pass for one destination: claim due rows, send them, record the outcomes."""
    counts = {"delivered": 0, "retry": 0, "failed": 0}
    engine = engine_for(settings.database.url)
    with session_scope(engine) as session:
        try:
            dest = settings.destination(name)
        except KeyError:
            _fail_unknown_destination(session, name)
            return counts
        if _breaker_open(session, name, utcnow()):
            return counts
        lease = lease_s(settings)
        rows = claim(session, name, first_id, lease_s=lease)
        if not rows:
            return counts
        rows = _skip_unwanted(dest, rows)
        session.commit()
        if not rows:
            return counts

        def progress(row: Delivery, outcome: Outcome) -> None:
            # Record each answer at once and extend the claim on the rest of the batch.
            _record_one(row, dest, outcome)
            session.execute(update(Delivery).where(Delivery.id.in_([r.id for r in rows]),
                                                   Delivery.state == SENDING)
                            .values(lease_until=utcnow() + timedelta(seconds=lease)))
            session.commit()

        try:
            if dest.type == "dicomweb":
                outcomes = send_dicomweb(dest, rows)
            else:
                outcomes = send_dicom(dest, rows, settings.node.ae_title, settings, progress)
        except LinkDown as err:
            _link_down(session, dest, rows, str(err))
            counts["retry"] = len(rows)
            return counts
        _link_up(session, dest)
        _record(session, dest, rows, outcomes)
        for outcome in outcomes.values():
            counts[{"delivered": "delivered", "pending": "retry", "failed": "failed"}[outcome.result]] += 1
        delivered = [r for r in rows if outcomes[r.id].result == DELIVERED]
    if dest.storage_commitment and dest.type == "dicom" and delivered:
        request_commitment(settings, dest, delivered)
    log.info("delivered to %s: %s", name, counts)
    return counts


def _skip_unwanted(dest: Destination, rows: list[Delivery]) -> list[Delivery]:
    """Rows whose kind the destination's profile no longer asks for are skipped, not sent."""
    keep = []
    for row in rows:
        if destination_wants(dest, row.kind or kind_of(row.sop_class_uid)):
            keep.append(row)
        else:
            row.state, row.lease_until, row.reason = SKIPPED, None, f"{row.kind} not in the destination's capability profile"
    return keep


def _fail_unknown_destination(session: Session, name: str) -> None:
    session.execute(update(Delivery).where(Delivery.destination == name, Delivery.state.in_((PENDING, SENDING)))
                    .values(state=FAILED, reason=f"destination {name!r} is not configured"))


def deliver_due(settings: Settings) -> dict[str, dict[str, int]]:
    """One pass over every destination with due rows (the periodic task of ``ainode serve``)."""
    engine = engine_for(settings.database.url)
    now = utcnow()
    with session_scope(engine) as session:
        names = list(session.scalars(
            select(Delivery.destination).where(
                or_((Delivery.state == PENDING) & (Delivery.next_attempt_at <= now),
                    (Delivery.state == SENDING) & (Delivery.lease_until < now))).distinct()))
    return {name: deliver_destination(settings, name) for name in names}


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """The dispatcher's work inside ``ainode serve``: resume and retry due deliveries every 2 s."""

    def run() -> None:
        try:
            deliver_due(settings)
        except Exception:  # noqa: BLE001 - the next pass retries; the service must keep running
            log.exception("delivery pass failed")

    return [("dispatcher.deliver_due", 2.0, run)]


# --- storage commitment ----------------------------------------------------------------------


def request_commitment(settings: Settings, dest: Destination, rows: list[Delivery]) -> str | None:
    """Ask the destination to commit the delivered objects (N-ACTION, Storage Commitment Push).

    The answer (N-EVENT-REPORT) comes on a new association to our listener; the receiver binds
    ``commitment_handlers`` for it. Returns the transaction UID, or None when the request failed
    (the objects stay delivered; commitment is then "failed" with the reason).
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from node.dispatch.scu import associate

    transaction_uid = generate_uid(prefix=None)
    request = Dataset()
    request.TransactionUID = transaction_uid
    request.ReferencedSOPSequence = []
    for row in rows:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = row.sop_class_uid, row.sop_instance_uid
        request.ReferencedSOPSequence.append(item)
    engine = engine_for(settings.database.url)
    ids = [r.id for r in rows]
    # Recorded before asking: the report may arrive before the N-ACTION response is read.
    with session_scope(engine) as session:
        session.execute(update(Delivery).where(Delivery.id.in_(ids))
                        .values(commitment="requested", transaction_uid=transaction_uid))
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    assoc = associate(ae, dest.host, dest.port, ae_title=dest.ae_title)
    reason = "association failed"
    if assoc.is_established:
        status, _ = assoc.send_n_action(request, 1, STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.20.1.1")
        assoc.release()
        if status and int(status.Status) == 0:
            return transaction_uid
        reason = f"N-ACTION status {getattr(status, 'Status', 'none')}"
    with session_scope(engine) as session:
        session.execute(update(Delivery).where(Delivery.id.in_(ids), Delivery.commitment == "requested")
                        .values(commitment="failed"))
    log.warning("storage commitment request to %s failed: %s", dest.name, reason)
    return None


def record_commitment(session: Session, event_info: Any) -> int:
    """Apply a Storage Commitment result (N-EVENT-REPORT dataset) to the outbox; rows updated."""
    transaction_uid = str(event_info.get("TransactionUID", ""))
    updated = 0
    for keyword, state in (("ReferencedSOPSequence", "committed"), ("FailedSOPSequence", "failed")):
        uids = [str(i.ReferencedSOPInstanceUID) for i in event_info.get(keyword, [])]
        if uids:
            updated += session.execute(update(Delivery).where(Delivery.transaction_uid == transaction_uid,
                                                              Delivery.sop_instance_uid.in_(uids))
                                       .values(commitment=state)).rowcount
    return updated


def commitment_handlers(settings: Settings) -> list[tuple[Any, Callable[[Any], Any]]]:
    """pynetdicom (event, handler) pairs the receiver binds to accept N-EVENT-REPORTs."""
    from pynetdicom import evt

    def on_event_report(event: Any) -> Any:
        if event.request.AffectedSOPClassUID != STORAGE_COMMITMENT_PUSH:
            return 0x0112, None  # No such SOP Instance
        info = event.event_information
        with session_scope(engine_for(settings.database.url)) as session:
            record_commitment(session, info)
        return 0x0000, None

    return [(evt.EVT_N_EVENT_REPORT, on_event_report)]


# --- status ----------------------------------------------------------------------------------


def status_summary(session: Session) -> dict[str, Any]:
    """What waits for which destination: counts per state, oldest waiting, next retry, breaker."""
    now = utcnow()
    out: dict[str, Any] = {"destinations": {}, "totals": {s: 0 for s in STATES}}
    rows = session.execute(select(Delivery.destination, Delivery.state, func.count(), func.min(Delivery.created_at),
                                  func.min(Delivery.next_attempt_at))
                           .group_by(Delivery.destination, Delivery.state)).all()
    for name, state, count, oldest, next_at in rows:
        entry = out["destinations"].setdefault(name, {**{s: 0 for s in STATES}, "oldest_waiting_s": None,
                                                      "next_attempt_at": None, "breaker_open_until": None,
                                                      "last_error": "", "recent_failures": []})
        entry[state] = count
        out["totals"][state] += count
        if state in (PENDING, SENDING):
            age = (now - aware(oldest)).total_seconds()
            entry["oldest_waiting_s"] = max(entry["oldest_waiting_s"] or 0.0, round(age, 1))
            if state == PENDING:
                entry["next_attempt_at"] = aware(next_at).isoformat()
    for health in session.scalars(select(DestinationHealth)):
        entry = out["destinations"].get(health.name)
        if entry is not None:
            open_until = aware(health.open_until)
            entry["breaker_open_until"] = open_until.isoformat() if open_until and open_until > now else None
            entry["last_error"] = health.last_error or ""
            entry["consecutive_failures"] = health.consecutive_failures or 0
    for row in session.scalars(select(Delivery).where(Delivery.state == FAILED).order_by(Delivery.id.desc()).limit(20)):
        entry = out["destinations"][row.destination]
        entry["recent_failures"].append({"id": row.id, "kind": row.kind, "status": row.last_status, "reason": row.reason})
    return out
