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

import logging
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from node.core.clock import aware, utcnow
from node.core.db import engine_for, session_scope
from node.core.settings import Destination, Settings, current_settings
from node.dispatch.commitment import commitments_overdue, request_commitment
from node.dispatch.kinds import REJECTION, ResultObject, kind_of, wanted_kinds
from node.dispatch.link import LinkDown, Outcome
from node.dispatch.report import ReportContext, write_report_context
from node.dispatch.senders import SENDERS
from node.dispatch.table import DELIVERED, FAILED, PENDING, SENDING, SKIPPED, STATES, Delivery, DestinationHealth

log = logging.getLogger("ainode.dispatcher")

# How long a claimed row belongs to one sender; after that another process may take it over.
LEASE_S = 120.0
# Objects sent per association / request.
BATCH_SIZE = 200


def backoff_s(dest: Destination, attempts: int) -> float:
    """Exponential backoff: retry_initial_s · 2^(attempts-1), capped at retry_max_s."""
    return min(dest.retry_max_s, dest.retry_initial_s * (2 ** max(attempts - 1, 0)))


# --- the outbox ------------------------------------------------------------------------------


def destination_wants(dest: Destination, kind: str) -> bool:
    """Whether a destination's capability profile asks for this kind of object."""
    return kind in wanted_kinds(dest.capabilities)


def enqueue_results(
    session: Session,
    job_id: int,
    objects: Iterable[ResultObject],
    destination_names: Iterable[str],
    settings: Settings | None = None,
    report: ReportContext | None = None,
) -> list[int]:
    """Record one outbox row per (object, destination) in the caller's transaction; return row ids.

    The files must already be on disk. With ``settings``, objects a destination's capability
    profile does not ask for are left out. An object already in the outbox for a destination
    (same SOP Instance UID: a re-run of the job) is not added twice; a failed one, or one a
    rejection note withdrew, is re-armed.
    ``report`` (the job's identity) is written beside each SR, for the RIS senders.
    """
    ids: list[int] = []
    names = list(destination_names)
    for obj in objects:
        path = str(obj.path)
        if report is not None and obj.kind == "sr":
            write_report_context(path, report)
        for name in names:
            if settings is not None and not destination_wants(settings.destination(name), obj.kind):
                continue
            row = session.scalar(
                select(Delivery).where(Delivery.destination == name, Delivery.sop_instance_uid == obj.sop_instance_uid)
            )
            if row is None:
                row = Delivery(
                    job_id=job_id,
                    destination=name,
                    path=path,
                    kind=obj.kind,
                    sop_class_uid=obj.sop_class_uid,
                    sop_instance_uid=obj.sop_instance_uid,
                    study_instance_uid=obj.study_instance_uid,
                    state=PENDING,
                    next_attempt_at=utcnow(),
                )
                session.add(row)
            elif row.state in (FAILED, SKIPPED) or row.rejected_by:
                # A rejected object written again (a later re-run went back to the same inputs)
                # stands again: it is sent again (an IOCM archive may refuse a rejected UID).
                row.state, row.path, row.attempts, row.next_attempt_at = PENDING, path, 0, utcnow()
                row.rejected_by = ""
            elif row.state == PENDING:
                row.path = path
            session.flush()
            ids.append(row.id)
    return ids


def superseded_deliveries(
    session: Session, earlier_job_ids: Iterable[int], current_uids: Iterable[str], destination_names: Iterable[str]
) -> list[Delivery]:
    """IHE IOCM: the results of ``earlier_job_ids`` (the jobs a re-run supersedes) that a
    destination acknowledged, that the re-run did not write again (``current_uids``) and that no
    rejection note withdrew yet: what a rejection note must now withdraw there. Rejection notes
    themselves are never rejected."""
    ids, names, current = list(earlier_job_ids), list(destination_names), set(current_uids)
    if not ids or not names:
        return []
    rows = session.scalars(
        select(Delivery)
        .where(
            Delivery.job_id.in_(ids),
            Delivery.destination.in_(names),
            Delivery.state == DELIVERED,
            Delivery.kind != REJECTION,
            Delivery.rejected_by == "",
        )
        .order_by(Delivery.id)
    )
    return [row for row in rows if row.sop_instance_uid not in current]


def _breaker_open(session: Session, name: str, now: datetime) -> bool:
    health = session.get(DestinationHealth, name)
    return bool(health and health.open_until and aware(health.open_until) > now)


def claim(
    session: Session, destination: str, first_id: int | None = None, limit: int = BATCH_SIZE, lease_s: float = LEASE_S
) -> list[Delivery]:
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
            update(Delivery)
            .where(
                Delivery.id == row_id,
                or_(
                    (Delivery.state == PENDING) & (Delivery.next_attempt_at <= now),
                    (Delivery.state == SENDING) & (Delivery.lease_until < now),
                ),
            )
            .values(state=SENDING, lease_until=now + timedelta(seconds=lease_s), attempts=Delivery.attempts + 1)
        )
        if result.rowcount == 1:
            claimed.append(row_id)
    session.commit()
    return [session.get(Delivery, i) for i in claimed]


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
    log.warning(
        "destination %s unreachable (%s); %d objects wait, retry after %.0f s",
        dest.name,
        error,
        len(rows),
        backoff_s(dest, health.consecutive_failures),
    )


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
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_([r.id for r in rows]), Delivery.state == SENDING)
                .values(lease_until=utcnow() + timedelta(seconds=lease))
            )
            session.commit()

        try:
            outcomes = SENDERS[dest.type](dest, rows, settings, progress)
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
            row.state, row.lease_until, row.reason = (
                SKIPPED,
                None,
                f"{row.kind} not in the destination's capability profile",
            )
    return keep


def _fail_unknown_destination(session: Session, name: str) -> None:
    session.execute(
        update(Delivery)
        .where(Delivery.destination == name, Delivery.state.in_((PENDING, SENDING)))
        .values(state=FAILED, reason=f"destination {name!r} is not configured")
    )


def deliver_due(settings: Settings) -> dict[str, dict[str, int]]:
    """One pass over every destination with due rows (the periodic task of ``ainode serve``)."""
    engine = engine_for(settings.database.url)
    now = utcnow()
    with session_scope(engine) as session:
        names = list(
            session.scalars(
                select(Delivery.destination)
                .where(
                    or_(
                        (Delivery.state == PENDING) & (Delivery.next_attempt_at <= now),
                        (Delivery.state == SENDING) & (Delivery.lease_until < now),
                    )
                )
                .distinct()
            )
        )
    return {name: deliver_destination(settings, name) for name in names}


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """The dispatcher's work inside ``ainode serve``: resume and retry due deliveries every 2 s, and
    (with storage commitment) ask again for overdue commitment reports every 5 s."""

    def run() -> None:
        try:
            deliver_due(settings)
        except Exception:  # noqa: BLE001 - the next pass retries; the service must keep running
            log.exception("delivery pass failed")

    def check_commitments() -> None:
        try:
            commitments_overdue(settings)
        except Exception:  # noqa: BLE001 - the next pass retries; the service must keep running
            log.exception("storage commitment check failed")

    tasks = [("dispatcher.deliver_due", 2.0, run)]
    if any(d.storage_commitment for d in settings.destinations):
        tasks.append(("dispatcher.commitments_overdue", 5.0, check_commitments))
    return tasks


# --- status ----------------------------------------------------------------------------------


def status_summary(session: Session) -> dict[str, Any]:
    """What waits for which destination: counts per state, oldest waiting, next retry, breaker."""
    now = utcnow()
    out: dict[str, Any] = {"destinations": {}, "totals": {s: 0 for s in STATES}}
    rows = session.execute(
        select(
            Delivery.destination,
            Delivery.state,
            func.count(),
            func.min(Delivery.created_at),
            func.min(Delivery.next_attempt_at),
        ).group_by(Delivery.destination, Delivery.state)
    ).all()
    for name, state, count, oldest, next_at in rows:
        entry = out["destinations"].setdefault(
            name,
            {
                **{s: 0 for s in STATES},
                "oldest_waiting_s": None,
                "next_attempt_at": None,
                "breaker_open_until": None,
                "last_error": "",
                "recent_failures": [],
            },
        )
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
        entry["recent_failures"].append(
            {"id": row.id, "kind": row.kind, "status": row.last_status, "reason": row.reason}
        )
    _commitment_summary(session, out["destinations"])
    return out


def _commitment_summary(session: Session, destinations: dict[str, Any]) -> None:
    """Storage commitment per destination: counts by answer and the latest failures with their reason."""
    counts = session.execute(
        select(Delivery.destination, Delivery.commitment, func.count())
        .where(Delivery.commitment != "")
        .group_by(Delivery.destination, Delivery.commitment)
    ).all()
    for name, commitment, count in counts:
        entry = destinations[name]
        entry.setdefault("commitment", {"requested": 0, "committed": 0, "failed": 0})[commitment] = count
    failed = select(Delivery).where(Delivery.commitment == "failed").order_by(Delivery.id.desc()).limit(20)
    for row in session.scalars(failed):
        destinations[row.destination].setdefault("commitment_failures", []).append(
            {"id": row.id, "sop_instance_uid": row.sop_instance_uid, "reason": row.reason}
        )
