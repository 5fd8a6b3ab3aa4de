"""A node with the UPS Task Manager, pynetdicom as RIS, performers and watcher."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)

from tests.helpers import NodeProcess, free_port

RIS, PERFORMER, RIVAL, WATCHER, STRANGER = "RIS", "PERFORMER", "RIVAL", "WATCHER", "STRANGER"


class Watcher:
    """A UPS Event SCU (pynetdicom): takes every N-EVENT-REPORT and keeps (event type, UID, data set)."""

    def __init__(self, ae_title: str = WATCHER, port: int | None = None, roles: bool = False):
        # roles: accept the node's SCP/SCU role selection (else answer without it, pynetdicom's default).
        self.ae_title, self.port, self.roles = ae_title, port or free_port(), roles
        self.events: list[tuple[int, str, Dataset]] = []
        self._lock = threading.Lock()
        self.server: Any = None

    def _on_report(self, event: Any) -> tuple[int, None]:
        with self._lock:
            self.events.append(
                (int(event.request.EventTypeID), str(event.request.AffectedSOPInstanceUID), event.event_information)
            )
        return 0x0000, None

    def start(self) -> "Watcher":
        ae = AE(ae_title=self.ae_title)
        if self.roles:
            ae.add_supported_context(UnifiedProcedureStepEvent, scu_role=True, scp_role=True)
        else:
            ae.add_supported_context(UnifiedProcedureStepEvent)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def states(self, uid: str) -> list[str]:
        """The states reported for one workitem, in arrival order."""
        with self._lock:
            return [str(ds.ProcedureStepState) for kind, u, ds in self.events if u == uid and kind == 1]

    def kinds(self, uid: str) -> list[int]:
        with self._lock:
            return [kind for kind, u, _ in self.events if u == uid]


def node_config(watcher_port: int, **workflow: Any) -> dict[str, Any]:
    """Peers: the RIS and two performers may use UPS; the watcher has a port; a stranger may only echo."""
    ups = ["echo", "ups"]
    return {
        "peers": [
            {"ae_title": RIS, "hosts": ["127.0.0.1"], "allow": ups},
            {"ae_title": PERFORMER, "hosts": ["127.0.0.1"], "allow": ups},
            {"ae_title": RIVAL, "hosts": ["127.0.0.1"], "allow": ups},
            {"ae_title": WATCHER, "hosts": ["127.0.0.1"], "allow": ups, "port": watcher_port},
            {"ae_title": STRANGER, "hosts": ["127.0.0.1"], "allow": ["echo"]},
        ],
        "workflow": {"event_retry_s": 0.3, "event_retry_max_s": 1.0, **workflow},
    }


@pytest.fixture
def watcher() -> Iterator[Watcher]:
    w = Watcher()
    yield w
    w.stop()


@pytest.fixture
def node(tmp_path, watcher) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "node", node_config(watcher.port)) as n:
        yield n


def connect(node: NodeProcess, ae_title: str) -> Any:
    """An association from ``ae_title`` with the UPS Push, Pull and Watch contexts."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def workitem(patient_id: str = "P-UPS-1", code: str = "AI-CT-SEG", start: str = "20261205090000") -> Dataset:
    """The N-CREATE data set a RIS sends for an AI analysis workitem (IHE AIW-I)."""
    ds = Dataset()
    ds.PatientName = "Test^Workitem"
    ds.PatientID = patient_id
    ds.ProcedureStepState = "SCHEDULED"
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = "CT organ segmentation"
    ds.WorklistLabel = "AI"
    ds.ScheduledProcedureStepStartDateTime = start
    ds.InputReadinessState = "READY"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "99AINODE", "CT segmentation"
    ds.ScheduledWorkitemCodeSequence = Sequence([item])
    study = Dataset()
    study.StudyInstanceUID = generate_uid()
    study.TypeOfInstances = "DICOM"
    ds.InputInformationSequence = Sequence([study])
    return ds


def status(answer: Dataset | None) -> int:
    """The Status of a DIMSE answer (-1 when none came)."""
    return int(answer.Status) if answer is not None and "Status" in answer else -1


def change_state(assoc: Any, uid: str, state: str, transaction_uid: str | None) -> int:
    info = Dataset()
    info.ProcedureStepState = state
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid
    answer, _ = assoc.send_n_action(info, 1, UnifiedProcedureStepPull, uid)
    return status(answer)


def final_state(transaction_uid: str) -> Dataset:
    """The N-SET that meets COMPLETED's final state requirements (Table CC.2.5-3)."""
    mods = Dataset()
    mods.TransactionUID = transaction_uid
    performed = Dataset()
    performed.PerformedProcedureStepStartDateTime = "20261205090100"
    performed.PerformedProcedureStepEndDateTime = "20261205090500"
    performed.OutputInformationSequence = Sequence([])
    mods.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
    return mods


def subscribe(assoc: Any, uid: str, receiving: str = WATCHER, lock: bool = False, action: int = 3) -> int:
    info = Dataset()
    info.ReceivingAE = receiving
    info.DeletionLock = "TRUE" if lock else "FALSE"
    answer, _ = assoc.send_n_action(info, action, UnifiedProcedureStepWatch, uid)
    return status(answer)
