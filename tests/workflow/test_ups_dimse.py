"""The UPS Task Manager over DIMSE against a real node: pynetdicom as RIS (UPS Push SCU),
performers (UPS Pull SCU) racing for a workitem, and a watcher (UPS Watch SCU + Event)."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPull, UnifiedProcedureStepPush

from node.workflow import states
from tests.helpers import NodeProcess, wait_for
from tests.workflow.conftest import (
    PERFORMER,
    RIS,
    RIVAL,
    STRANGER,
    Watcher,
    change_state,
    connect,
    final_state,
    node_config,
    status,
    subscribe,
    workitem,
)

GLOBAL = "1.2.840.10008.5.1.4.34.5"


def create(node: NodeProcess, ds: Dataset | None = None, uid: str | None = None) -> str:
    uid = uid or generate_uid()
    assoc = connect(node, RIS)
    try:
        answer, attrs = assoc.send_n_create(ds if ds is not None else workitem(), UnifiedProcedureStepPush, uid)
        assert status(answer) == 0x0000, hex(status(answer))
        assert str(attrs.ProcedureStepState) == "SCHEDULED"
    finally:
        assoc.release()
    return uid


def find(assoc, **keys) -> list[Dataset]:
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    found = []
    for answer, ds in assoc.send_c_find(identifier, UnifiedProcedureStepPull):
        if answer is not None and int(answer.Status) in (0xFF00, 0xFF01):
            found.append(ds)
        else:
            assert status(answer) == 0x0000, hex(status(answer))
    return found


def test_a_workitem_from_creation_to_completion_with_its_watcher(node, watcher):
    watcher.start()
    assoc = connect(node, PERFORMER)
    try:
        assert subscribe(assoc, GLOBAL) == 0x0000  # global: every workitem, also the ones created later
        uid = create(node, workitem(patient_id="P-UPS-FLOW"))
        found = find(
            assoc,
            ProcedureStepState="SCHEDULED",
            PatientID="P-UPS-FLOW",
            ScheduledProcedureStepStartDateTime="20261205-20261206",
            SOPInstanceUID="",
            TransactionUID="",
        )
        assert [str(ds.SOPInstanceUID) for ds in found] == [uid]
        assert not found[0].get("TransactionUID")  # never answered (PS3.4 CC.2.5.1.2)
        transaction = generate_uid()
        assert change_state(assoc, uid, "IN PROGRESS", transaction) == 0x0000
        # Progress, then the final state's requirements, then COMPLETED.
        progress = Dataset()
        progress.TransactionUID = transaction
        item = Dataset()
        item.ProcedureStepProgress = 50
        progress.ProcedureStepProgressInformationSequence = [item]
        answer, _ = assoc.send_n_set(progress, UnifiedProcedureStepPush, uid)
        assert status(answer) == 0x0000
        answer, _ = assoc.send_n_set(final_state(transaction), UnifiedProcedureStepPush, uid)
        assert status(answer) == 0x0000
        assert change_state(assoc, uid, "COMPLETED", transaction) == 0x0000
        answer, got = assoc.send_n_get([0x00741000, 0x00081195, 0x00100020], UnifiedProcedureStepPush, uid)
        assert status(answer) == 0x0000
        assert str(got.ProcedureStepState) == "COMPLETED" and "TransactionUID" not in got
        assert find(assoc, ProcedureStepState="SCHEDULED", PatientID="P-UPS-FLOW") == []
    finally:
        assoc.release()
    assert wait_for(lambda: watcher.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], 30), watcher.events
    assert watcher.kinds(uid) == [1, 1, 3, 1]  # state, state, progress, state: in order


def test_every_state_machine_violation_is_answered_with_its_status(node):
    uid = create(node)
    performer, rival, ris = connect(node, PERFORMER), connect(node, RIVAL), connect(node, RIS)
    try:
        mine, theirs = generate_uid(), generate_uid()
        # Not claimed yet: it cannot be completed or canceled by Change State.
        assert change_state(performer, uid, "COMPLETED", mine) == states.NOT_YET_IN_PROGRESS
        assert change_state(performer, uid, "SCHEDULED", mine) == states.SCHEDULED_ONLY_BY_N_CREATE
        assert change_state(performer, uid, "IN PROGRESS", None) == 0x0120  # a claim needs a Transaction UID
        assert change_state(performer, uid, "IN PROGRESS", mine) == 0x0000
        assert change_state(rival, uid, "IN PROGRESS", theirs) == states.ALREADY_IN_PROGRESS
        assert change_state(rival, uid, "COMPLETED", theirs) == states.WRONG_TRANSACTION_UID
        assert change_state(rival, uid, "CANCELED", None) == states.WRONG_TRANSACTION_UID
        mods = Dataset()
        mods.ProcedureStepLabel = "changed by the rival"
        mods.TransactionUID = theirs
        assert status(rival.send_n_set(mods, UnifiedProcedureStepPush, uid)[0]) == states.WRONG_TRANSACTION_UID
        # COMPLETED before the final state requirements are met.
        assert change_state(performer, uid, "COMPLETED", mine) == states.FINAL_STATE_NOT_MET
        assert status(performer.send_n_set(final_state(mine), UnifiedProcedureStepPush, uid)[0]) == 0x0000
        assert change_state(performer, uid, "COMPLETED", mine) == 0x0000
        assert change_state(performer, uid, "COMPLETED", mine) == states.ALREADY_COMPLETED_WARNING
        assert change_state(performer, uid, "CANCELED", mine) == states.MAY_NO_LONGER_BE_UPDATED
        assert change_state(rival, uid, "IN PROGRESS", theirs) == states.MAY_NO_LONGER_BE_UPDATED
        mods.TransactionUID = mine
        assert status(performer.send_n_set(mods, UnifiedProcedureStepPush, uid)[0]) == states.MAY_NO_LONGER_BE_UPDATED
        cancel, _ = ris.send_n_action(None, 2, UnifiedProcedureStepPush, uid)
        assert status(cancel) == states.ALREADY_COMPLETED
        # Unknown workitems, a second N-CREATE of the same UID, a bad N-CREATE.
        unknown = generate_uid()
        assert change_state(performer, unknown, "IN PROGRESS", mine) == states.NO_SUCH_UPS
        assert status(ris.send_n_get([0x00741000], UnifiedProcedureStepPush, unknown)[0]) == states.NO_SUCH_UPS
        assert status(ris.send_n_set(mods, UnifiedProcedureStepPush, unknown)[0]) == states.NO_SUCH_UPS
        assert status(ris.send_n_create(workitem(), UnifiedProcedureStepPush, uid)[0]) == 0x0111
        not_scheduled = workitem()
        not_scheduled.ProcedureStepState = "IN PROGRESS"
        answer, _ = ris.send_n_create(not_scheduled, UnifiedProcedureStepPush, generate_uid())
        assert status(answer) == states.CREATE_NOT_SCHEDULED
        no_start = workitem()
        del no_start.ScheduledProcedureStepStartDateTime
        assert status(ris.send_n_create(no_start, UnifiedProcedureStepPush, generate_uid())[0]) == 0x0120
        bad_priority = workitem()
        bad_priority.ScheduledProcedureStepPriority = "URGENT"
        assert status(ris.send_n_create(bad_priority, UnifiedProcedureStepPush, generate_uid())[0]) == 0x0106
        # A watcher that is not a peer with a port cannot be subscribed.
        assert subscribe(ris, uid, receiving="NOBODY") == states.RECEIVING_AE_UNKNOWN
        # Watch: suspend applies to the global subscription only; unsubscribe; unknown actions.
        assert subscribe(ris, GLOBAL) == 0x0000
        assert subscribe(ris, GLOBAL, action=5) == 0x0000
        assert subscribe(ris, uid, action=5) == states.ACTION_NOT_APPROPRIATE
        assert subscribe(ris, GLOBAL, action=4) == 0x0000
        assert subscribe(ris, uid, action=4) == 0x0000
        assert subscribe(ris, uid, action=9) == 0x0123
    finally:
        for assoc in (performer, rival, ris):
            assoc.release()


def test_request_cancel_of_scheduled_and_in_progress_workitems(node, watcher):
    watcher.start()
    scheduled, claimed = create(node), create(node)
    ris, performer = connect(node, RIS), connect(node, PERFORMER)
    try:
        assert subscribe(ris, scheduled) == 0x0000 and subscribe(ris, claimed) == 0x0000
        transaction = generate_uid()
        assert change_state(performer, claimed, "IN PROGRESS", transaction) == 0x0000
        reason = Dataset()
        reason.ReasonForCancellation = "order withdrawn"
        assert status(ris.send_n_action(reason, 2, UnifiedProcedureStepPush, scheduled)[0]) == 0x0000
        assert status(ris.send_n_action(reason, 2, UnifiedProcedureStepPush, scheduled)[0]) == states.ALREADY_CANCELED
        assert status(ris.send_n_action(reason, 2, UnifiedProcedureStepPush, claimed)[0]) == 0x0000
        # The performer decides: it cancels with its Transaction UID.
        assert change_state(performer, claimed, "CANCELED", transaction) == 0x0000
    finally:
        ris.release()
        performer.release()
    assert wait_for(lambda: watcher.states(scheduled) == ["SCHEDULED", "IN PROGRESS", "CANCELED"], 30), watcher.events
    assert wait_for(lambda: watcher.kinds(claimed) == [1, 1, 2, 1], 30), watcher.events
    assert watcher.states(claimed) == ["SCHEDULED", "IN PROGRESS", "CANCELED"]


def test_two_performers_racing_for_one_workitem_one_wins(tmp_path, watcher):
    # Two receiver processes: the two claims may well be served by different processes.
    config = {**node_config(watcher.port), "node": {"receivers": 2}}
    with NodeProcess(tmp_path / "node", config) as node:
        _race(node)


def _race(node: NodeProcess) -> None:
    uids = [create(node) for _ in range(5)]
    for uid in uids:
        answers: dict[str, int] = {}
        barrier = threading.Barrier(2)

        def claim(ae_title: str, uid: str = uid) -> None:
            assoc = connect(node, ae_title)
            try:
                barrier.wait()
                answers[ae_title] = change_state(assoc, uid, "IN PROGRESS", generate_uid())
            finally:
                assoc.release()

        threads = [threading.Thread(target=claim, args=(ae,)) for ae in (PERFORMER, RIVAL)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers.values()) == [0x0000, states.ALREADY_IN_PROGRESS], answers


def test_a_peer_without_the_ups_permission_is_refused(node):
    assoc = connect(node, STRANGER)
    try:
        answer, _ = assoc.send_n_create(workitem(), UnifiedProcedureStepPush, generate_uid())
        assert status(answer) == 0x0124
        query = Dataset()
        query.ProcedureStepState = ""
        results = list(assoc.send_c_find(query, UnifiedProcedureStepPull))
        assert status(results[0][0]) == 0x0124
    finally:
        assoc.release()


def test_events_to_a_watcher_that_was_down_arrive_when_it_is_back(node, watcher):
    ris, performer = connect(node, RIS), connect(node, PERFORMER)
    try:
        uid = create(node)
        assert subscribe(ris, uid) == 0x0000  # the watcher is not listening yet
        transaction = generate_uid()
        assert change_state(performer, uid, "IN PROGRESS", transaction) == 0x0000
        assert status(performer.send_n_set(final_state(transaction), UnifiedProcedureStepPush, uid)[0]) == 0x0000
        assert change_state(performer, uid, "COMPLETED", transaction) == 0x0000
    finally:
        ris.release()
        performer.release()
    db = node.database_url.removeprefix("sqlite:///")
    tried = lambda: sqlite3.connect(db).execute("SELECT max(attempts) FROM ups_events").fetchone()[0] or 0  # noqa: E731
    assert wait_for(lambda: tried() >= 2, 30)  # it was tried, and failed, while the watcher was down
    assert watcher.events == []
    watcher.start()
    assert wait_for(lambda: watcher.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], 30), watcher.events


def test_kill_9_with_a_workitem_in_progress_loses_nothing(tmp_path):
    watcher = Watcher(roles=True)  # this one takes the role selection the node proposes
    node = NodeProcess(tmp_path / "node", node_config(watcher.port)).start()
    try:
        uid = create(node)
        performer = connect(node, PERFORMER)
        transaction = generate_uid()
        try:
            assert subscribe(performer, uid) == 0x0000
            assert change_state(performer, uid, "IN PROGRESS", transaction) == 0x0000
        finally:
            performer.release()
        node.kill()
        node.start()
        performer = connect(node, PERFORMER)
        try:
            answer, got = performer.send_n_get([0x00741000], UnifiedProcedureStepPush, uid)
            assert status(answer) == 0x0000 and str(got.ProcedureStepState) == "IN PROGRESS"
            # The claim (its Transaction UID) survived: a rival still cannot take it over.
            assert change_state(performer, uid, "COMPLETED", generate_uid()) == states.WRONG_TRANSACTION_UID
            assert status(performer.send_n_set(final_state(transaction), UnifiedProcedureStepPush, uid)[0]) == 0
            assert change_state(performer, uid, "COMPLETED", transaction) == 0x0000
        finally:
            performer.release()
        watcher.start()  # the events owed from before the crash are still owed
        assert wait_for(lambda: watcher.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], 30), watcher.events
    finally:
        watcher.stop()
        node.stop()


@pytest.mark.parametrize(
    "keys, hits",
    [
        ({"PatientID": "P-FIND-A"}, ["a"]),
        ({"PatientID": "P-FIND-*"}, ["a", "b"]),
        ({"ScheduledProcedureStepStartDateTime": "20261206-"}, ["b"]),
        ({"ScheduledProcedureStepStartDateTime": "-20261205235959"}, ["a"]),
        ({"ProcedureStepState": "IN PROGRESS"}, ["b"]),
    ],
)
def test_c_find_matching_keys(node, keys, hits):
    made = {
        "a": create(node, workitem(patient_id="P-FIND-A", code="AI-A", start="20261205080000")),
        "b": create(node, workitem(patient_id="P-FIND-B", code="AI-B", start="20261206080000")),
    }
    assoc = connect(node, PERFORMER)
    try:
        assert change_state(assoc, made["b"], "IN PROGRESS", generate_uid()) == 0
        found = {str(ds.SOPInstanceUID) for ds in find(assoc, SOPInstanceUID="", **keys)}
        assert found == {made[h] for h in hits}
        code = Dataset()
        code.CodeValue = "AI-B"
        by_code = find(assoc, SOPInstanceUID="", ScheduledWorkitemCodeSequence=[code])
        assert {str(ds.SOPInstanceUID) for ds in by_code} == {made["b"]}
    finally:
        assoc.release()
