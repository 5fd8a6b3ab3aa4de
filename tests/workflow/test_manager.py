"""The Task Manager's operations on a real database (no network): subscriptions, C-FIND
matching, retention of final workitems."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from node.core.clock import utcnow
from node.core.db import database_session, dispose_engines, init_db
from node.workflow import manager, match, states
from node.workflow.table import PENDING, Subscription, UpsEvent, Workitem
from tests.workflow.conftest import final_state, workitem

GLOBAL, FILTERED = manager.GLOBAL_SUBSCRIPTION, manager.FILTERED_GLOBAL_SUBSCRIPTION


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'ainode.db'}"
    init_db(url)
    yield url
    dispose_engines()


def new(url: str, **kwargs) -> str:
    uid = generate_uid()
    assert manager.create(url, uid, workitem(**kwargs), "RIS", "AINODE").status == 0
    return uid


def watcher(ae: str = "WATCHER", lock: bool = False, **keys: str) -> Dataset:
    info = Dataset()
    info.ReceivingAE = ae
    info.DeletionLock = "TRUE" if lock else "FALSE"
    for keyword, value in keys.items():
        setattr(info, keyword, value)
    return info


def owed(url: str, ae: str = "WATCHER") -> list[tuple[str, int, str]]:
    with database_session(url) as session:
        rows = session.scalars(
            select(UpsEvent).where(UpsEvent.subscriber_ae == ae, UpsEvent.state == PENDING).order_by(UpsEvent.id)
        )
        return [(r.workitem_uid, r.event_type, Dataset.from_json(r.info).get("ProcedureStepState", "")) for r in rows]


def claim(url: str, uid: str, transaction: str) -> int:
    info = Dataset()
    info.ProcedureStepState, info.TransactionUID = "IN PROGRESS", transaction
    return manager.change_state(url, uid, info, "PERFORMER").status


def test_a_global_subscription_covers_present_and_future_workitems_until_suspended(url):
    before = new(url)
    assert manager.subscribe(url, GLOBAL, watcher(), lambda ae: True).status == 0
    after = new(url)
    assert owed(url) == [(before, 1, "SCHEDULED"), (after, 1, "SCHEDULED")]
    assert manager.suspend_global(url, GLOBAL, watcher()).status == 0
    later = new(url)  # not subscribed: the global subscription is suspended
    claim(url, before, generate_uid())  # still subscribed: suspension keeps the present ones
    assert [e[0] for e in owed(url)] == [before, after, before]
    assert later not in {e[0] for e in owed(url)}
    assert manager.unsubscribe(url, GLOBAL, watcher()).status == 0  # and everything owed goes
    claim(url, after, generate_uid())
    assert owed(url) == []
    assert manager.suspend_global(url, before, watcher()).status == states.ACTION_NOT_APPROPRIATE


def test_a_filtered_global_subscription_only_gets_matching_workitems(url):
    keys = {"PatientID": "P-ONLY"}
    assert manager.subscribe(url, FILTERED, watcher(**keys), lambda ae: True).status == 0
    other, mine = new(url, patient_id="P-OTHER"), new(url, patient_id="P-ONLY")
    assert [e[0] for e in owed(url)] == [mine]
    assert other


def test_subscribing_an_unknown_watcher_or_to_an_unknown_workitem(url):
    uid = new(url)
    assert manager.subscribe(url, uid, watcher(), lambda ae: False).status == states.RECEIVING_AE_UNKNOWN
    assert manager.subscribe(url, generate_uid(), watcher(), lambda ae: True).status == states.NO_SUCH_UPS
    assert manager.subscribe(url, uid, Dataset(), lambda ae: True).status == manager.MISSING_ATTRIBUTE


def _finish(url: str, uid: str, hours_ago: float) -> None:
    transaction = generate_uid()
    assert claim(url, uid, transaction) == 0
    assert manager.set_attributes(url, uid, final_state(transaction)).status == 0
    info = Dataset()
    info.ProcedureStepState, info.TransactionUID = "COMPLETED", transaction
    assert manager.change_state(url, uid, info, "PERFORMER").status == 0
    with database_session(url) as session:
        when = utcnow() - timedelta(hours=hours_ago)
        session.execute(update(Workitem).where(Workitem.sop_instance_uid == uid).values(finished_at=when))


def test_final_workitems_are_kept_24_hours_and_while_deletion_locked(url):
    young, old, locked, running = new(url), new(url), new(url), new(url)
    for uid, hours in ((young, 23), (old, 25), (locked, 25)):
        _finish(url, uid, hours)
    claim(url, running, generate_uid())
    assert manager.subscribe(url, locked, watcher(lock=True), lambda ae: True).status == 0
    with database_session(url) as session:  # the watcher took its events
        session.execute(update(UpsEvent).values(state="delivered"))
    assert manager.purge_final(url, 24) == 1
    assert manager.get(url, old, None).status == states.NO_SUCH_UPS
    for uid in (young, locked, running):
        assert manager.get(url, uid, None).status == 0
    assert manager.unsubscribe(url, locked, watcher()).status == 0  # the lock goes with it
    assert manager.purge_final(url, 24) == 1
    with database_session(url) as session:
        assert session.scalars(select(Subscription.workitem_uid)).all() == []


def test_events_still_owed_keep_a_final_workitem(url):
    uid = new(url)
    assert manager.subscribe(url, uid, watcher(), lambda ae: True).status == 0
    _finish(url, uid, 25)
    assert manager.purge_final(url, 24) == 0


@pytest.mark.parametrize(
    "keys, hit",
    [
        ({"PatientID": "P-1"}, True),
        ({"PatientID": "P-2"}, False),
        ({"PatientID": "P-?"}, True),
        ({"PatientName": "test^workitem"}, True),  # PN: case-insensitive
        ({"ScheduledProcedureStepStartDateTime": "20261205"}, True),  # DT at the key's precision
        ({"ScheduledProcedureStepStartDateTime": "20261205100000-"}, False),
        ({"ScheduledProcedureStepStartDateTime": "20261204-20261205"}, True),
        ({"ScheduledProcedureStepPriority": "MEDIUM"}, True),
        ({"ProcedureStepState": ""}, True),  # universal
        ({"SOPInstanceUID": "1.2.3\\9.9.9"}, True),  # UID list
    ],
)
def test_matching(keys, hit):
    ds = workitem(patient_id="P-1", start="20261205090000")
    ds.SOPInstanceUID = "9.9.9"
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    assert match.matches(ds, identifier) is hit


def test_the_answer_never_carries_the_transaction_uid(url):
    uid = new(url, patient_id="P-TX")
    claim(url, uid, "1.2.3.4.5")
    identifier = Dataset()
    identifier.PatientID, identifier.TransactionUID, identifier.ProcedureStepState = "P-TX", "", ""
    found = list(manager.find(url, identifier))
    assert len(found) == 1 and not found[0].TransactionUID and found[0].ProcedureStepState == "IN PROGRESS"
    assert "TransactionUID" not in manager.get(url, uid, None).dataset


@pytest.mark.parametrize("value, ok", [("20261205", True), ("20261205093000.5+0100", True), ("20261305", False)])
def test_datetime_values(value, ok):
    assert match.valid_datetime(value) is ok
