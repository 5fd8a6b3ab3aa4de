"""The UPS Event SCU: sends the N-EVENT-REPORTs of the outbox (``table.UpsEvent``) to watchers.

Runs in the node's main process (``periodic_tasks``). Each pass takes, per subscriber, its due
events in id order, opens one association to the subscriber's address (its peer entry: first of
``hosts`` and ``port``), sends them one by one and marks each delivered once the watcher's SCP
answered it. The first one it does not take stops that subscriber's pass (the order is kept)
and is tried again later with a growing delay, as long as it takes: nothing is dropped. A
watcher that was down therefore gets everything, in order, when it is back.

A subscriber may instead take its events on a WebSocket (UPS-RS, PS3.18 11.x, IHE RAD-109 Open
Event Channel, served by ``node.admin.routes_workitems``): the same outbox rows, read with
``pending`` and marked with ``delivered``. While a channel is open for an AE title in this
process (``WebChannels``) the DIMSE sender leaves that subscriber's events to it; a subscriber
with no DIMSE port keeps its events pending until it opens a channel.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from sqlalchemy import select

from node.core.clock import utcnow
from node.core.db import ChangeGate, database_session
from node.core.dicom import answers_stay_with_the_sender
from node.core.errors import describe_error
from node.core.settings import Peer, Settings
from node.workflow import manager
from node.workflow.table import DELIVERED, PENDING, UpsEvent

log = logging.getLogger("ainode.workflow.events")

_BATCH = 200
_TIMEOUT_S = 10.0


class WebChannels:
    """The AE titles with an open event channel (WebSocket) in this process. The newest channel of
    an AE title wins: an older one (a client that reconnected before the server saw it go) sees
    that it is no longer current and ends."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()

    def open(self, ae_title: str) -> int:
        """Register a channel for the AE title; its ticket."""
        with self._lock:
            self._next += 1
            self._current[ae_title] = self._next
            return self._next

    def current(self, ae_title: str, ticket: int) -> bool:
        """Whether this ticket is still the AE title's channel."""
        with self._lock:
            return self._current.get(ae_title) == ticket

    def close(self, ae_title: str, ticket: int) -> None:
        """Forget the channel (unless a newer one replaced it)."""
        with self._lock:
            if self._current.get(ae_title) == ticket:
                del self._current[ae_title]

    def titles(self) -> set[str]:
        """The AE titles with an open channel now."""
        with self._lock:
            return set(self._current)


# One per process: the API (in ``ainode serve``) opens channels, the DIMSE sender reads them.
WEB_CHANNELS = WebChannels()


def pending(url: str, ae_title: str, limit: int = _BATCH) -> list[tuple[int, str, int, str]]:
    """A subscriber's undelivered events in order: (id, workitem UID, event type, info JSON)."""
    return [(i, uid, kind, info) for i, uid, kind, info, _ in _pending(url, ae_title, limit)]


def delivered(url: str, event_id: int) -> None:
    """Mark one event delivered (the subscriber has it)."""
    with database_session(url) as session:
        row = session.get(UpsEvent, event_id)
        if row is not None:
            row.state, row.delivered_at, row.last_error = DELIVERED, utcnow(), ""


def report(uid: str, event_type: int, info: str) -> Dataset:
    """One event as the data set a UPS-RS channel sends: the Event Information with the
    Affected SOP Class and Instance UIDs and the Event Type ID (PS3.18 11.x notifications)."""
    ds = Dataset.from_json(info)
    ds.AffectedSOPClassUID = manager.UPS_PUSH
    ds.AffectedSOPInstanceUID = uid
    ds.EventTypeID = event_type
    return ds


def _due_subscribers(url: str) -> list[str]:
    with database_session(url) as session:
        return list(
            session.scalars(
                select(UpsEvent.subscriber_ae)
                .where(UpsEvent.state == PENDING, UpsEvent.next_attempt_at <= utcnow())
                .distinct()
            ).all()
        )


def _pending(url: str, ae_title: str, limit: int = _BATCH) -> list[tuple[int, str, int, str, int]]:
    with database_session(url) as session:
        rows = session.scalars(
            select(UpsEvent)
            .where(UpsEvent.subscriber_ae == ae_title, UpsEvent.state == PENDING)
            .order_by(UpsEvent.id)
            .limit(limit)
        ).all()
        return [(r.id, r.workitem_uid, r.event_type, r.info, r.attempts) for r in rows]


def _mark(url: str, event_id: int, error: str, attempts: int, settings: Settings) -> None:
    with database_session(url) as session:
        row = session.get(UpsEvent, event_id)
        if row is None:
            return
        if not error:
            row.state, row.delivered_at, row.last_error = DELIVERED, utcnow(), ""
            return
        row.attempts = attempts + 1
        delay = min(settings.workflow.event_retry_s * 2 ** min(attempts, 16), settings.workflow.event_retry_max_s)
        row.next_attempt_at = utcnow() + timedelta(seconds=delay)
        row.last_error = error[:500]


def _association(settings: Settings, peer: Peer) -> Any:
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT_S
    # The node is the UPS Event SCP (it issues the reports) on an association it requests: it
    # proposes the SCP role by role selection (PS3.7 D.3.3.4), as a Storage Commitment SCP does.
    # A watcher that answers without role selection gets the reports all the same.
    ae.add_requested_context(manager.UPS_EVENT)
    host, port = peer.address  # type: ignore[misc]
    role = build_role(manager.UPS_EVENT, scu_role=True, scp_role=True)
    return answers_stay_with_the_sender(ae.associate(host, port, ae_title=peer.ae_title, ext_neg=[role]))


def send_to(settings: Settings, ae_title: str) -> int:
    """Send one subscriber's pending events in order; how many it took."""
    url = settings.database.url
    events = _pending(url, ae_title)
    if not events:
        return 0
    peer = settings.peer(ae_title)
    if peer is None or peer.address is None:
        return 0  # no DIMSE port: its events wait for its web channel (UPS-RS)
    assoc = _association(settings, peer)
    if not assoc.is_established:
        _mark(url, events[0][0], "association not established", events[0][4], settings)
        log.warning("UPS events for %s wait: association not established", ae_title)
        return 0
    sent = 0
    try:
        for event_id, uid, event_type, info, attempts in events:
            # Affected SOP Class: UPS Push (every UPS is one), on the UPS Event context (PS3.4 CC.2.4.2).
            status, _ = assoc.send_n_event_report(
                Dataset.from_json(info), event_type, manager.UPS_PUSH, uid, meta_uid=manager.UPS_EVENT
            )
            code = int(status.get("Status", -1)) if status else -1
            if code != 0x0000:
                _mark(url, event_id, f"answered 0x{code:04X}" if code >= 0 else "no answer", attempts, settings)
                log.warning("UPS event to %s not taken (%s); tried again later", ae_title, code)
                break
            _mark(url, event_id, "", attempts, settings)
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def send_due(settings: Settings) -> int:
    """One pass over every subscriber with due events; how many events were delivered."""
    sent = 0
    for ae_title in _due_subscribers(settings.database.url):
        if ae_title in WEB_CHANNELS.titles():
            continue  # its open WebSocket takes them (looked at now: a channel may just have opened)
        try:
            sent += send_to(settings, ae_title)
        except Exception as err:  # noqa: BLE001 - one watcher's trouble must not stop the others
            log.error("UPS events for %s failed: %s", ae_title, describe_error(err))
    return sent


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """The UPS Event SCU and the workitems' retention inside ``ainode serve``."""
    gate = ChangeGate(settings.database.url, max_quiet_s=1.0)

    def deliver() -> None:
        if gate.due():
            send_due(settings)

    def purge() -> None:
        manager.purge_final(settings.database.url, settings.workflow.keep_final_hours)

    return [("workflow.events", 0.3, deliver), ("workflow.purge", 600.0, purge)]
