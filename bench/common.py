"""Helpers the benchmarks share: ports, a private Redis, the phantom study, pushing it as a modality,
waiting for its results, teardown.

Benchmarks import it as a sibling module (``from common import ...``) after putting ``bench/``
on ``sys.path``, so each benchmark still runs as ``python bench/NAME.py``.

Ports: a port found free and released is someone else's until the service binds it, so ainode's
DICOM port is *held* (``hold_port``: its receivers share it with SO_REUSEPORT) and every other
service is started by ``start_listening``, which tries a fresh port when the service could not
bind its own. A failed run keeps its work folder, logs included (``stop_processes``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep
from sqlalchemy import create_engine, text

from node.core.dicom import answers_stay_with_the_sender


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortHold:
    """A loopback port bound (not listening) with SO_REUSEPORT until ``release``.

    Nobody else can bind it meanwhile, except sockets of this user that set SO_REUSEPORT too:
    ainode's receivers, which share their port that way. Connections go to listeners only.
    """

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]

    def release(self) -> None:
        """Let the port go (once the service listens on it)."""
        self.socket.close()


def hold_port() -> PortHold:
    """A port for ainode's DICOM listener, held until the bench lets it go."""
    return PortHold()


def wait_port(port: int, timeout: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port, else raise; with ``proc``,
    raise as soon as that process (the service expected there) has ended, with the end of its
    ``log`` (the whole log stays in the run's work folder)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the service for port {port} exited with {proc.returncode} before listening:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


def listens(proc: subprocess.Popen, port: int) -> bool:
    """True when ``proc`` itself holds the listening TCP socket of ``port`` (Linux /proc), not
    merely when something answers there: another program may have taken the port."""
    wanted = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                wanted.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{proc.pid}/fd")
    try:
        return any(os.readlink(fd) in wanted for fd in fds.iterdir()) if wanted else False
    except OSError:  # the process ended meanwhile
        return False


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 120) -> bool:
    """Wait until ``proc`` listens on ``port``: True; False once it has ended (it could not start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listens(proc, port):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    raise RuntimeError(f"the service does not listen on port {port}")


def start_listening(
    start: Callable[[list[int]], subprocess.Popen], count: int = 1, ports: Iterator[int] | None = None, tries: int = 5
) -> tuple[subprocess.Popen, list[int]]:
    """Start a service on ``count`` free ports, ``start(ports) -> process``; when the process ends
    before all of them accept connections (another program took one meanwhile), try fresh ports.

    ``ports`` gives the ports to use first (default: free ones).
    """
    source = ports if ports is not None else iter(())
    for _ in range(tries):
        chosen = [next(source, None) or free_port() for _ in range(count)]
        proc = start(chosen)
        if all(wait_listening(proc, port) for port in chosen):
            return proc, chosen
        proc.wait()
        print(f"service could not start on ports {chosen} (taken meanwhile?); trying others", file=sys.stderr)
    raise RuntimeError(f"service did not start in {tries} tries")


def epoch(value: object) -> float:
    """A database timestamp (datetime or ISO text, naive meaning UTC) as epoch seconds."""
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def start_redis(work: Path, ports: Iterator[int] | None = None) -> tuple[subprocess.Popen, int]:
    """A private, non-persistent Redis on a free loopback port, started and answering."""

    def start(chosen: list[int]) -> subprocess.Popen:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(chosen[0])]
        command += ["--save", "", "--appendonly", "no", "--dir", str(work)]
        return subprocess.Popen(command, stdout=(work / "redis.log").open("ab"), stderr=subprocess.STDOUT)

    proc, (port,) = start_listening(start, ports=ports)
    return proc, port


def start_orthanc(work: Path, settings: dict, exe: str = "Orthanc") -> tuple[subprocess.Popen, int, int]:
    """Orthanc (the peer PACS) on free DICOM and HTTP ports, its files and log in ``work``;
    ``settings`` adds to or overrides its configuration. Returns (process, DICOM port, HTTP port)."""

    def start(ports: list[int]) -> subprocess.Popen:
        config = {
            "StorageDirectory": str(work / "orthanc-db"),
            "IndexDirectory": str(work / "orthanc-db"),
            "DicomAet": "ORTHANC",
            "DicomPort": ports[0],
            "HttpPort": ports[1],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "DicomModalities": {},
            **settings,
        }
        cfg = work / "orthanc.json"
        cfg.write_text(json.dumps(config))
        return subprocess.Popen([exe, str(cfg)], stdout=(work / "orthanc.log").open("ab"), stderr=subprocess.STDOUT)

    proc, (dicom_port, http_port) = start_listening(start, count=2)
    return proc, dicom_port, http_port


def stop_processes(procs: list[subprocess.Popen], work: Path | None = None, remove: bool = False) -> None:
    """Terminate the processes, newest first (kill one that ignores it for 30 s); then delete
    ``work`` when ``remove`` (a run that succeeded), else say where its logs are."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    finish_work(work, remove)


def finish_work(work: Path | None, remove: bool) -> None:
    """Delete a run's work folder, or keep it and print its path (a failed run's logs are there)."""
    if work is None:
        return
    if remove:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept, logs included: {work}", file=sys.stderr)


def push(port: int, called: str, study: list[Dataset], mpps: bool) -> float:
    """C-STORE the study (wrapped in MPPS when asked); returns the epoch time of the last acknowledgement."""
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    if mpps:
        ae.add_requested_context(ModalityPerformedProcedureStep)
    # pynetdicom's requestor can drop an answer it was waiting for (node.core.dicom): guarded.
    assoc = answers_stay_with_the_sender(ae.associate("127.0.0.1", port, ae_title=called))
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


def device_name() -> str:
    """The accelerator the worker uses, else the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - no torch: CPU
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} x {os.cpu_count()} cores"


def write_phantom(slices: int, size: int, seed: int = 7) -> list[Path]:
    """The phantom CT study as DICOM files, rendered once and kept in the temp folder.

    Rendering 300 slices takes minutes on a small CPU and is not part of the measurement; the
    study is re-pushed with fresh UIDs on every run so the node never sees it as a duplicate.
    """
    from workers.synthetic import phantoms

    folder = Path(tempfile.gettempdir()) / f"ainode-phantom-{slices}x{size}x{size}-{seed}"
    done = folder / "complete"
    if not done.exists():
        spacing = (375.0 / slices, 384.0 / size, 384.0 / size)
        phantom = phantoms.make_ct_phantom(
            seed, shape=(slices, size, size), spacing=spacing, processes=min(os.cpu_count() or 1, 16)
        )
        phantoms.write_ct_series(phantom, folder)
        done.write_text("ok")
    return sorted(folder.glob("*.dcm"))


def fresh_uids(files: list[Path]) -> list[pydicom.Dataset]:
    """The study read back with new study/series/instance UIDs (a new acquisition each run)."""
    from pydicom.uid import generate_uid

    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def wait_results(db_url: str, study_uid: str, timeout: float = 1800) -> dict[str, float]:
    """Epoch times of the study's stages once every outbox row of its job is delivered."""
    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            job = conn.execute(
                text(
                    "SELECT id, state, created_at, started_at, finished_at, error, result FROM jobs "
                    "WHERE study_uid = :u ORDER BY id LIMIT 1"
                ),
                {"u": study_uid},
            ).first()
            if job and job[1] in ("failed", "dead"):
                raise RuntimeError(f"job {job[0]} {job[1]}: {job[5]}")
            rows = (
                conn.execute(
                    text("SELECT state, delivered_at, destination FROM deliveries WHERE job_id = :j"),
                    {"j": str(job[0]) if job else ""},
                ).all()
                if job
                else []
            )
            ready = conn.execute(text("SELECT ready_at FROM studies WHERE study_uid = :u"), {"u": study_uid}).first()
        if rows and all(r[0] == "delivered" for r in rows) and job[4] is not None:
            return {
                "ready": epoch(ready[0]) if ready and ready[0] else epoch(job[2]),
                "created": epoch(job[2]),
                "started": epoch(job[3]),
                "finished": epoch(job[4]),
                "delivered": max(epoch(r[1]) for r in rows if r[2] == "pacs"),
                "ris": max((epoch(r[1]) for r in rows if r[2] == "ris"), default=None),
                "fhir": max((epoch(r[1]) for r in rows if r[2] == "fhir"), default=None),
                "objects": sum(1 for r in rows if r[2] == "pacs"),
                # How the worker got the pixels: "streamed" (node.core.volumes) or "files: why".
                "pixels": [s.get("pixels", "files") for s in json.loads(job[6] or "{}").get("series", [])],
                # The job's stages as the worker timed them (load, analysis, write), per series.
                "timings": [s.get("timings_s", {}) for s in json.loads(job[6] or "{}").get("series", [])],
                "outputs": [Path(p) for p in json.loads(job[6] or "{}").get("outputs", [])],
            }
        if job and job[4] is not None and not rows and not json.loads(job[6] or "{}").get("series"):
            # Finished with nothing to deliver (e.g. the study is outside the analysis's intended use).
            raise RuntimeError(f"job {job[0]} produced no results: {(job[6] or '')[:300]}")
        if rows and any(r[0] == "failed" for r in rows):
            raise RuntimeError("a result delivery failed")
        time.sleep(0.05)
    raise RuntimeError("results did not arrive in time")


def storescu_seconds(port: int, files: list[Path]) -> float:
    """Seconds DCMTK storescu takes to send ``files`` to Orthanc (AE ORTHANC) on ``port``."""
    t0 = time.perf_counter()
    # -R: propose exactly the SOP classes of the files (SEG, SR, KOS are not in the default list).
    subprocess.run(
        ["storescu", "-R", "-aet", "PEER", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0
