"""Helpers the benchmarks share: ports, a private Redis, pushing a study as a modality, teardown.

Benchmarks import it as a sibling module (``from common import ...``) after putting ``bench/``
on ``sys.path``, so each benchmark still runs as ``python bench/NAME.py``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 120) -> None:
    """Wait until something accepts connections on 127.0.0.1:port, else raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


def epoch(value: object) -> float:
    """A database timestamp (datetime or ISO text, naive meaning UTC) as epoch seconds."""
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def start_redis(work: Path) -> tuple[subprocess.Popen, int]:
    """A private, non-persistent Redis on a free loopback port, started and answering."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, port


def stop_processes(procs: list[subprocess.Popen], remove: Path | None = None) -> None:
    """Terminate the processes, newest first (kill one that ignores it for 30 s); then delete ``remove``."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


def push(port: int, called: str, study: list[Dataset], mpps: bool) -> float:
    """C-STORE the study (wrapped in MPPS when asked); returns the epoch time of the last acknowledgement."""
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    if mpps:
        ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError("association rejected")
    step_uid = generate_uid()
    if mpps:
        create = Dataset()
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        item = Dataset()
        item.StudyInstanceUID = study[0].StudyInstanceUID
        create.ScheduledStepAttributesSequence = [item]
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0, f"N-CREATE 0x{status.Status:04X}"
    last_ack = 0.0
    for ds in study:
        status = assoc.send_c_store(ds)
        last_ack = time.time()
        assert status.Status == 0, f"C-STORE 0x{status.Status:04X}"
    if mpps:
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        series = Dataset()
        series.SeriesInstanceUID = study[0].SeriesInstanceUID
        refs = []
        for ds in study:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            refs.append(ref)
        series.ReferencedImageSequence = refs
        done.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0, f"N-SET 0x{status.Status:04X}"
    assoc.release()
    return last_ack
