"""Fixtures of the workflow area: a node with the UPS Task Manager, pynetdicom as RIS, performers and
watcher; Orthanc as the PACS holding a study the node has never seen."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pydicom
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

from node.core.db import init_db
from node.core.settings import Settings
from tests.helpers import NodeProcess, free_port
from tests.results.peers import Orthanc
from tests.results.synthetic import write_ct_series

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


def push_to_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    """The modality's images reach the PACS only (DCMTK storescu), never the node."""
    subprocess.run(
        ["/usr/bin/storescu", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
        check=True,
        capture_output=True,
    )


def source_of(orthanc: Orthanc, method: str = "c-move", name: str = "orthanc") -> dict:
    """The node's ``sources`` entry naming this Orthanc."""
    return {
        "name": name,
        "method": method,
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "timeout_s": 120,
    }


@pytest.fixture
def node_port() -> int:
    """The DICOM port the node will listen on (Orthanc must know it for C-MOVE)."""
    return free_port()


@pytest.fixture
def pacs(tmp_path, node_port):
    """Orthanc knowing the node (AINODE at node_port) as a modality; stopped at the end."""
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"ainode": ("AINODE", node_port)}).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def study_in_pacs(tmp_path, pacs) -> tuple[str, list[str]]:
    """A 12-slice CT study pushed to Orthanc only: (Study Instance UID, SOP Instance UIDs)."""
    paths, _, _ = write_ct_series(tmp_path / "ct")
    push_to_orthanc(pacs, paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return str(headers[0].StudyInstanceUID), sorted(str(h.SOPInstanceUID) for h in headers)


def copy_as_other_study(paths: list[Path], folder: Path, study_date: str) -> tuple[str, list[Path]]:
    """The same patient's series again as another study on ``study_date`` (new UIDs throughout)."""
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study_uid, series_uid, study_date
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name)
        out.append(folder / path.name)
    return study_uid, out


@pytest.fixture
def priors_in_pacs(tmp_path, pacs, study_in_pacs) -> tuple[str, str]:
    """Two more studies of the same patient in Orthanc: (an earlier one, a later one)."""
    paths = sorted((tmp_path / "ct").iterdir())
    date = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyDate
    earlier, files = copy_as_other_study(paths, tmp_path / "earlier", str(int(date) - 10000))
    push_to_orthanc(pacs, files)
    later, files = copy_as_other_study(paths, tmp_path / "later", str(int(date) + 10000))
    push_to_orthanc(pacs, files)
    return earlier, later


def local_settings(tmp_path: Path, sources: list[dict], node_port: int = 11112) -> Settings:
    """Settings of a node whose store and index live under tmp_path (schema created)."""
    settings = Settings.model_validate(
        {
            "node": {"ae_title": "AINODE", "port": node_port, "acse_timeout_s": 5},
            "storage": {"path": str(tmp_path / "store"), "min_free_bytes": "16MiB"},
            "database": {"url": f"sqlite:///{tmp_path}/ainode.db"},
            "audit": {"path": str(tmp_path / "audit.log")},
            "sources": sources,
        }
    )
    init_db(settings.database.url)
    return settings
