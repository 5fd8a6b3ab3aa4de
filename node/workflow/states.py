"""The Unified Procedure Step state machine (PS3.4 CC.1.1, Table CC.1.1-2) and its statuses.

Pure functions: each takes the workitem's state (and its Transaction UID) and a request, and
returns the answer (a DIMSE status), the new state and the events the change reports. The
manager applies them to the database; nothing here touches it, so every row of the table is
unit-tested here.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULED, IN_PROGRESS, CANCELED, COMPLETED = "SCHEDULED", "IN PROGRESS", "CANCELED", "COMPLETED"
STATES = (SCHEDULED, IN_PROGRESS, CANCELED, COMPLETED)
FINAL_STATES = (CANCELED, COMPLETED)

# UPS statuses (PS3.4 CC.2: Tables CC.2.1-2, CC.2.2-2, CC.2.3-2, CC.2.5-2, CC.2.6-2...).
SUCCESS = 0x0000
CREATED_WITH_MODIFICATIONS = 0xB300  # Warning: the UPS was created with modifications
DELETION_LOCK_NOT_GRANTED = 0xB301  # Warning: deletion lock not granted
ALREADY_CANCELED = 0xB304  # Warning: the UPS is already in the requested state of CANCELED
COERCED_INVALID_VALUES = 0xB305  # Warning: coerced invalid values to valid values
ALREADY_COMPLETED_WARNING = 0xB306  # Warning: the UPS is already in the requested state of COMPLETED
MAY_NO_LONGER_BE_UPDATED = 0xC300  # Failure: the UPS may no longer be updated
WRONG_TRANSACTION_UID = 0xC301  # Failure: the correct Transaction UID was not provided
ALREADY_IN_PROGRESS = 0xC302  # Failure: the UPS is already IN PROGRESS
SCHEDULED_ONLY_BY_N_CREATE = 0xC303  # Failure: may only become SCHEDULED via N-CREATE, not N-SET or N-ACTION
FINAL_STATE_NOT_MET = 0xC304  # Failure: final state requirements for the requested change not met
NO_SUCH_UPS = 0xC307  # Failure: the SOP Instance UID does not exist or is not a UPS managed here
RECEIVING_AE_UNKNOWN = 0xC308  # Failure: Receiving AE-TITLE is unknown to this SCP
CREATE_NOT_SCHEDULED = 0xC309  # Failure: the provided value of UPS State was not SCHEDULED
NOT_YET_IN_PROGRESS = 0xC310  # Failure: the UPS is not yet in the IN PROGRESS state
ALREADY_COMPLETED = 0xC311  # Failure: the UPS is already COMPLETED
PERFORMER_NOT_CONTACTED = 0xC312  # Failure: the performer cannot be contacted
PERFORMER_WILL_NOT_CANCEL = 0xC313  # Failure: performer chooses not to cancel
ACTION_NOT_APPROPRIATE = 0xC314  # Failure: specified action not appropriate for specified instance
NO_EVENT_REPORTS = 0xC315  # Failure: SCP does not support Event Reports

# N-EVENT-REPORT Event Type IDs of the UPS Event SOP Class (PS3.4 CC.2.4.1, Table CC.2.4-1).
EVENT_STATE_REPORT = 1
EVENT_CANCEL_REQUESTED = 2
EVENT_PROGRESS_REPORT = 3
EVENT_SCP_STATUS_CHANGE = 4
EVENT_ASSIGNED = 5

# N-ACTION Action Type IDs (PS3.4 CC.2.1, CC.2.2, CC.2.3).
ACTION_CHANGE_STATE = 1  # UPS Pull (and Push: the performer completes or cancels)
ACTION_REQUEST_CANCEL = 2  # UPS Push
ACTION_SUBSCRIBE = 3  # UPS Watch
ACTION_UNSUBSCRIBE = 4  # UPS Watch
ACTION_SUSPEND_GLOBAL = 5  # UPS Watch


def is_failure(status: int) -> bool:
    """A failure status (not Success, not a warning): nothing was changed."""
    return status != SUCCESS and (status & 0xF000) != 0xB000


@dataclass(frozen=True)
class Outcome:
    """The answer to a request: its status, the state afterwards, the states to report (in order)."""

    status: int
    state: str
    reports: tuple[str, ...] = ()
    cancel_requested: bool = False

    @property
    def changed(self) -> bool:
        """Whether the request changed the workitem's state."""
        return bool(self.reports)


def change_state(current: str, requested: str, held_uid: str, given_uid: str, final_ok: bool) -> Outcome:
    """N-ACTION Change State (Action Type 1): Table CC.1.1-2's rows for IN PROGRESS, COMPLETED,
    CANCELED and SCHEDULED requested with the Transaction UID ``given_uid``.

    ``held_uid`` is the Transaction UID the workitem was claimed with ("" while SCHEDULED);
    ``final_ok`` whether the workitem meets the final state requirements (Table CC.2.5-3) of
    ``requested``.
    """
    if requested == SCHEDULED:
        return Outcome(SCHEDULED_ONLY_BY_N_CREATE, current)
    if requested == IN_PROGRESS:
        return _claim(current)
    if requested not in FINAL_STATES:
        raise ValueError(f"not a UPS state: {requested!r}")
    if current == SCHEDULED:
        # A SCHEDULED UPS is never COMPLETED or CANCELED directly: a performer claims it first,
        # anyone else asks for cancellation (N-ACTION Request Cancel).
        return Outcome(NOT_YET_IN_PROGRESS, current)
    if current == IN_PROGRESS:
        if given_uid != held_uid:
            return Outcome(WRONG_TRANSACTION_UID, current)
        if not final_ok:
            return Outcome(FINAL_STATE_NOT_MET, current)
        return Outcome(SUCCESS, requested, (requested,))
    if current == requested and given_uid == held_uid:
        # The performer repeats its last request (a lost answer): a warning, nothing changes.
        return Outcome(ALREADY_COMPLETED_WARNING if current == COMPLETED else ALREADY_CANCELED, current)
    return Outcome(MAY_NO_LONGER_BE_UPDATED, current)


def _claim(current: str) -> Outcome:
    if current == SCHEDULED:
        return Outcome(SUCCESS, IN_PROGRESS, (IN_PROGRESS,))
    if current == IN_PROGRESS:
        return Outcome(ALREADY_IN_PROGRESS, current)
    return Outcome(MAY_NO_LONGER_BE_UPDATED, current)


def request_cancel(current: str) -> Outcome:
    """N-ACTION Request Cancel (Action Type 2, UPS Push).

    A SCHEDULED UPS has no performer to ask: the SCP cancels it itself, passing through IN
    PROGRESS (both states are reported, PS3.4 CC.2.4.3). An IN PROGRESS UPS stays so: its
    performer (and every watcher) is told with a UPS Cancel Requested event and decides.
    """
    if current == SCHEDULED:
        return Outcome(SUCCESS, CANCELED, (IN_PROGRESS, CANCELED))
    if current == IN_PROGRESS:
        return Outcome(SUCCESS, IN_PROGRESS, (), cancel_requested=True)
    if current == CANCELED:
        return Outcome(ALREADY_CANCELED, current)
    return Outcome(ALREADY_COMPLETED, current)


def may_set(current: str, held_uid: str, given_uid: str) -> int:
    """Whether an N-SET may change the workitem (PS3.4 CC.2.5.1.2): Success or the failure.

    SCHEDULED: anyone may (no Transaction UID yet); IN PROGRESS: only with the Transaction UID
    it was claimed with; COMPLETED and CANCELED: no longer.
    """
    if current == SCHEDULED:
        return SUCCESS
    if current == IN_PROGRESS:
        return SUCCESS if given_uid == held_uid else WRONG_TRANSACTION_UID
    return MAY_NO_LONGER_BE_UPDATED


def create_state(provided: str) -> int:
    """N-CREATE: the Procedure Step State provided must be SCHEDULED (C309 otherwise)."""
    return SUCCESS if provided == SCHEDULED else CREATE_NOT_SCHEDULED
