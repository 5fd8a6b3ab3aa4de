"""Storage Commitment Push (PS3.4 J): ask a destination to commit what it was sent, and record its answer.

The request (N-ACTION) goes on its own association after a batch is delivered; the result comes
back as an N-EVENT-REPORT on an association the destination opens to the node's receiver, which
binds ``commitment_handlers``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from sqlalchemy import update
from sqlalchemy.orm import Session

from node.core.db import database_session, engine_for, session_scope
from node.core.dicom import NO_SUCH_OBJECT_INSTANCE, STORAGE_COMMITMENT_PUSH, SUCCESS
from node.core.settings import Destination, Settings
from node.dispatch.scu import associate
from node.dispatch.table import Delivery

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
            update(Delivery).where(Delivery.id.in_(ids)).values(commitment="requested", transaction_uid=transaction_uid)
        )
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    assoc = associate(ae, dest.host, dest.port, ae_title=dest.ae_title)
    reason = "association failed"
    if assoc.is_established:
        status, _ = assoc.send_n_action(request, 1, STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.20.1.1")
        assoc.release()
        if status and int(status.Status) == SUCCESS:
            return transaction_uid
        reason = f"N-ACTION status {getattr(status, 'Status', 'none')}"
    with session_scope(engine) as session:
        session.execute(
            update(Delivery).where(Delivery.id.in_(ids), Delivery.commitment == "requested").values(commitment="failed")
        )
    log.warning("storage commitment request to %s failed: %s", dest.name, reason)
    return None


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
