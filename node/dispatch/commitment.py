"""Storage Commitment Push (PS3.4 J): ask a destination to commit what it was sent, and record its answer.

The request (N-ACTION) goes on its own association after a batch is delivered; the result comes
back as an N-EVENT-REPORT on an association the destination opens to the node's receiver, which
binds ``commitment_handlers``. A request whose report does not come within the destination's
``storage_commitment_timeout_s`` is sent again (``commitments_overdue``, a periodic task) up to
``storage_commitment_retries`` times, then its rows' commitment is "failed" with the reason.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.core.clock import utcnow
from node.core.db import database_session, engine_for, session_scope
from node.core.dicom import NO_SUCH_OBJECT_INSTANCE, STORAGE_COMMITMENT_PUSH, SUCCESS
from node.core.settings import Destination, Settings
from node.dispatch.link import tls_context, tls_failure
from node.dispatch.scu import associate
from node.dispatch.table import DELIVERED, Delivery

log = logging.getLogger("ainode.dispatcher")


def request_commitment(settings: Settings, dest: Destination, rows: list[Delivery]) -> str | None:
    """Ask the destination to commit the delivered objects (N-ACTION, Storage Commitment Push).

    The answer (N-EVENT-REPORT) comes on a new association to our listener; the receiver binds
    ``commitment_handlers`` for it. Returns the transaction UID, or None when the request failed
    (the objects stay delivered; commitment is then "failed" with the reason).
    """
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
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(
                commitment="requested",
                transaction_uid=transaction_uid,
                commitment_requested_at=utcnow(),
                commitment_requests=Delivery.commitment_requests + 1,
            )
        )
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    kwargs: dict[str, Any] = {"ae_title": dest.ae_title}
    if dest.tls.enabled:  # the same secured link as the delivery it follows
        kwargs["tls_args"] = (tls_context(dest), dest.host)
    assoc = associate(ae, dest.host, dest.port, **kwargs)
    reason = "association failed"
    if not assoc.is_established and dest.tls.enabled:
        reason = tls_failure(dest) or reason
    if assoc.is_established:
        status, _ = assoc.send_n_action(request, 1, STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.20.1.1")
        assoc.release()
        if status and int(status.Status) == SUCCESS:
            return transaction_uid
        reason = f"N-ACTION status {getattr(status, 'Status', 'none')}"
    with session_scope(engine) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.commitment == "requested")
            .values(commitment="failed", reason=f"storage commitment request failed: {reason}")
        )
    log.warning("storage commitment request to %s failed: %s", dest.name, reason)
    return None


def commitments_overdue(settings: Settings) -> dict[str, dict[str, int]]:
    """Ask again for commitments whose report is overdue; fail those asked too often. Counts per destination.

    A row is overdue when it is still "requested" ``storage_commitment_timeout_s`` after its last
    N-ACTION. It is asked again (a new request, new Transaction UID: a late report of the old one
    is not applied) while it has been asked at most ``storage_commitment_retries`` more times;
    after that its commitment is "failed" and its reason says why.
    """
    engine = engine_for(settings.database.url)
    counts: dict[str, dict[str, int]] = {}
    for dest in settings.destinations:
        if not (dest.storage_commitment and dest.type == "dicom"):
            continue
        deadline = utcnow() - timedelta(seconds=dest.storage_commitment_timeout_s)
        with session_scope(engine) as session:
            overdue = list(
                session.scalars(
                    select(Delivery).where(
                        Delivery.destination == dest.name,
                        Delivery.state == DELIVERED,
                        Delivery.commitment == "requested",
                        Delivery.commitment_requested_at <= deadline,
                    )
                )
            )
            again = [r for r in overdue if r.commitment_requests <= dest.storage_commitment_retries]
            given_up = [r for r in overdue if r not in again]
            for row in given_up:
                row.commitment = "failed"
                row.reason = (
                    f"storage commitment: no N-EVENT-REPORT after {row.commitment_requests} requests "
                    f"({dest.storage_commitment_timeout_s:g} s each)"
                )
        if given_up:
            log.warning("storage commitment from %s: %d objects never reported; failed", dest.name, len(given_up))
        if again:
            log.info("storage commitment from %s overdue for %d objects: asking again", dest.name, len(again))
            request_commitment(settings, dest, again)
        if overdue:
            counts[dest.name] = {"requested_again": len(again), "failed": len(given_up)}
    return counts


def record_commitment(session: Session, event_info: Any) -> int:
    """Apply a Storage Commitment result (N-EVENT-REPORT dataset) to the outbox; rows updated."""
    transaction_uid = str(event_info.get("TransactionUID", ""))
    updated = 0
    for keyword, state in (("ReferencedSOPSequence", "committed"), ("FailedSOPSequence", "failed")):
        uids = [str(i.ReferencedSOPInstanceUID) for i in event_info.get(keyword, [])]
        if uids:
            updated += session.execute(
                update(Delivery)
                .where(Delivery.transaction_uid == transaction_uid, Delivery.sop_instance_uid.in_(uids))
                .values(commitment=state)
            ).rowcount
    return updated


def commitment_handlers(settings: Settings) -> list[tuple[Any, Callable[[Any], Any]]]:
    """pynetdicom (event, handler) pairs the receiver binds to accept N-EVENT-REPORTs."""

    def on_event_report(event: Any) -> Any:
        if event.request.AffectedSOPClassUID != STORAGE_COMMITMENT_PUSH:
            return NO_SUCH_OBJECT_INSTANCE, None
        info = event.event_information
        with database_session(settings.database.url) as session:
            record_commitment(session, info)
        return SUCCESS, None

    return [(evt.EVT_N_EVENT_REPORT, on_event_report)]
