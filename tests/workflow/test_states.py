"""The UPS state machine, row by row of PS3.4 Table CC.1.1-2 (and the N-SET rule of CC.2.5.1.2)."""

from __future__ import annotations

import pytest

from node.workflow import states as s
from node.workflow.states import CANCELED, COMPLETED, IN_PROGRESS, SCHEDULED

T, OTHER = "1.2.3.4", "1.2.3.5"  # the Transaction UID a workitem was claimed with, and another


@pytest.mark.parametrize(
    "current, status, after",
    [
        (SCHEDULED, s.SUCCESS, IN_PROGRESS),
        (IN_PROGRESS, s.ALREADY_IN_PROGRESS, IN_PROGRESS),  # the second performer of a race
        (CANCELED, s.MAY_NO_LONGER_BE_UPDATED, CANCELED),
        (COMPLETED, s.MAY_NO_LONGER_BE_UPDATED, COMPLETED),
    ],
)
def test_claiming_with_a_transaction_uid(current, status, after):
    held = "" if current == SCHEDULED else T
    outcome = s.change_state(current, IN_PROGRESS, held, OTHER, final_ok=True)
    assert (outcome.status, outcome.state) == (status, after)
    assert outcome.reports == ((IN_PROGRESS,) if status == s.SUCCESS else ())


@pytest.mark.parametrize("current", [SCHEDULED, IN_PROGRESS, CANCELED, COMPLETED])
def test_nothing_becomes_scheduled_by_n_action(current):
    assert s.change_state(current, SCHEDULED, T, T, True).status == s.SCHEDULED_ONLY_BY_N_CREATE


@pytest.mark.parametrize(
    "current, requested, given, final_ok, status, after",
    [
        # A SCHEDULED workitem must be claimed first (or canceled by Request Cancel).
        (SCHEDULED, COMPLETED, T, True, s.NOT_YET_IN_PROGRESS, SCHEDULED),
        (SCHEDULED, CANCELED, T, True, s.NOT_YET_IN_PROGRESS, SCHEDULED),
        (IN_PROGRESS, COMPLETED, T, True, s.SUCCESS, COMPLETED),
        (IN_PROGRESS, CANCELED, T, True, s.SUCCESS, CANCELED),
        (IN_PROGRESS, COMPLETED, OTHER, True, s.WRONG_TRANSACTION_UID, IN_PROGRESS),
        (IN_PROGRESS, COMPLETED, "", True, s.WRONG_TRANSACTION_UID, IN_PROGRESS),
        (IN_PROGRESS, CANCELED, OTHER, True, s.WRONG_TRANSACTION_UID, IN_PROGRESS),
        (IN_PROGRESS, COMPLETED, T, False, s.FINAL_STATE_NOT_MET, IN_PROGRESS),
        (COMPLETED, COMPLETED, T, True, s.ALREADY_COMPLETED_WARNING, COMPLETED),
        (CANCELED, CANCELED, T, True, s.ALREADY_CANCELED, CANCELED),
        (COMPLETED, CANCELED, T, True, s.MAY_NO_LONGER_BE_UPDATED, COMPLETED),
        (CANCELED, COMPLETED, T, True, s.MAY_NO_LONGER_BE_UPDATED, CANCELED),
        (COMPLETED, COMPLETED, OTHER, True, s.MAY_NO_LONGER_BE_UPDATED, COMPLETED),
    ],
)
def test_completing_and_canceling(current, requested, given, final_ok, status, after):
    outcome = s.change_state(current, requested, T, given, final_ok)
    assert (outcome.status, outcome.state) == (status, after)
    assert outcome.changed == (current != after)


@pytest.mark.parametrize(
    "current, status, after, reports, asked",
    [
        (SCHEDULED, s.SUCCESS, CANCELED, (IN_PROGRESS, CANCELED), False),
        (IN_PROGRESS, s.SUCCESS, IN_PROGRESS, (), True),  # the performer decides
        (CANCELED, s.ALREADY_CANCELED, CANCELED, (), False),
        (COMPLETED, s.ALREADY_COMPLETED, COMPLETED, (), False),
    ],
)
def test_request_cancel(current, status, after, reports, asked):
    outcome = s.request_cancel(current)
    assert (outcome.status, outcome.state, outcome.reports, outcome.cancel_requested) == (
        status,
        after,
        reports,
        asked,
    )


@pytest.mark.parametrize(
    "current, held, given, status",
    [
        (SCHEDULED, "", "", s.SUCCESS),
        (IN_PROGRESS, T, T, s.SUCCESS),
        (IN_PROGRESS, T, OTHER, s.WRONG_TRANSACTION_UID),
        (IN_PROGRESS, T, "", s.WRONG_TRANSACTION_UID),
        (COMPLETED, T, T, s.MAY_NO_LONGER_BE_UPDATED),
        (CANCELED, T, T, s.MAY_NO_LONGER_BE_UPDATED),
    ],
)
def test_n_set(current, held, given, status):
    assert s.may_set(current, held, given) == status


def test_n_create_only_creates_scheduled_workitems():
    assert s.create_state(SCHEDULED) == s.SUCCESS
    assert s.create_state(IN_PROGRESS) == s.CREATE_NOT_SCHEDULED


def test_the_statuses_are_pynetdicoms_ups_statuses():
    from pynetdicom.status import UNIFIED_PROCEDURE_STEP_SERVICE_CLASS_STATUS as ups

    named = {v for k, v in vars(s).items() if k.isupper() and isinstance(v, int) and v >= 0xB000}
    assert named and all(code in ups and ups[code][1] != "Unable to Process" for code in named)
