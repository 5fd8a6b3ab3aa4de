"""Benchmark: how soon after the last instance is acknowledged does a study's job start?

Runs a real node (`ainode serve`) with a private Redis and one `ainode worker`, and pushes
generated CT studies over DICOM (pynetdicom as the modality):
- with MPPS: N-CREATE, C-STOREs, then N-SET COMPLETED listing every instance;
- without MPPS: C-STOREs only, so the study quiet timer decides;
then measures from the last C-STORE response to the job's start (job row ``started_at``), and
the queue overhead per job (message published -> job started on the worker).
Peer comparison in the same run: Orthanc with StableAge set to the same quiet time, measured from
the last acknowledgement until Orthanc reports the study stable.

The last line printed is JSON. Usage: python bench/completion.py [--json] [--quiet-s 3] [--instances 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import epoch, hold_port, push, start_orthanc, start_redis, stop_processes, wait_port  # noqa: E402


def make_study(n: int) -> list[Dataset]:
    """A small synthetic CT series (64x64 slices) with fresh UIDs."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Patient", "BENCH1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i + 1
        ds.StudyDescription, ds.BodyPartExamined, ds.SliceThickness = "CT BENCH", "CHEST", 1.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(i)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.ImageType = [0.7, 0.7], ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 2000, (64, 64), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def job_times(db_url: str, study_uid: str, timeout: float = 300) -> tuple[float, float]:
    """(published, started) epoch times of the study's first job, waiting until it has started."""
    engine = create_engine(db_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT published_at, started_at FROM jobs WHERE study_uid = :u ORDER BY id LIMIT 1"),
                {"u": study_uid},
            ).first()
        if row and row[0] and row[1]:
            return epoch(row[0]), epoch(row[1])
        time.sleep(0.05)
    raise RuntimeError("the job did not start")


def orthanc_stable_after(work: Path, study: list[Dataset], stable_age: int) -> float | None:
    """Orthanc (the peer) with StableAge=stable_age: seconds from last ack to its StableStudy event."""
    exe = shutil.which("Orthanc")
    if exe is None:
        return None
    proc, dicom_port, http_port = start_orthanc(
        work, {"Name": "bench", "StableAge": stable_age, "UnknownSopClassAccepted": True}, exe
    )
    try:
        last_ack = push(dicom_port, "ORTHANC", study, mpps=False)
        deadline = time.monotonic() + stable_age + 120
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/changes?limit=1000") as resp:
                changes = json.load(resp)["Changes"]
            if any(c["ChangeType"] == "StableStudy" for c in changes):
                return time.time() - last_ack
            time.sleep(0.05)
        return None
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--quiet-s", type=float, default=3.0, help="study quiet timer setting")
    parser.add_argument("--instances", type=int, default=20, help="instances per study")
    parser.add_argument("--repeats", type=int, default=3, help="MPPS and timer studies each")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ainode-bench-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AINODE_CONFIG", None)
    hold = hold_port()  # ainode's receivers bind it beside the hold (SO_REUSEPORT); nobody else can
    dicom_port = hold.port
    procs: list[subprocess.Popen] = []
    succeeded = False
    try:
        redis, redis_port = start_redis(work)
        procs.append(redis)
        db_url = f"sqlite:///{work / 'ainode.db'}"
        config = {
            "node": {
                "ae_title": "AINODE",
                "host": "127.0.0.1",
                "port": dicom_port,
                "receivers": 1,
                "accept_unknown_peers": True,
            },
            "storage": {"path": str(work / "store"), "min_free_bytes": "16MiB"},
            "database": {"url": db_url},
            "broker": {"url": f"redis://127.0.0.1:{redis_port}/0"},
            "timers": {"series_quiet_s": args.quiet_s, "study_quiet_s": args.quiet_s, "force_complete_s": 600},
            "rules": [{"name": "bench-ct", "match": {"modality": "CT"}, "analyses": ["count-instances"]}],
            "api": {"enabled": False},
            "audit": {"sink": "none"},
        }
        cfg = work / "ainode.yaml"
        cfg.write_text(yaml.safe_dump(config))
        logs = (work / "node.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "-c", str(cfg)],
                cwd=ROOT,
                env=env,
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "node.cli", "worker", "-c", str(cfg)],
                cwd=ROOT,
                env=env,
                stdout=(work / "worker.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_port(dicom_port, proc=procs[-2], log=work / "node.log")  # the node, not its worker
        hold.release()
        # Warm-up: the first job also pays the worker's start-up.
        warm = make_study(2)
        push(dicom_port, "AINODE", warm, mpps=True)
        job_times(db_url, warm[0].StudyInstanceUID)

        mpps_s, quiet_s, overhead = [], [], []
        for _ in range(args.repeats):
            study = make_study(args.instances)
            ack = push(dicom_port, "AINODE", study, mpps=True)
            published, started = job_times(db_url, study[0].StudyInstanceUID)
            mpps_s.append(started - ack)
            overhead.append(started - published)
            study = make_study(args.instances)
            ack = push(dicom_port, "AINODE", study, mpps=False)
            published, started = job_times(db_url, study[0].StudyInstanceUID)
            quiet_s.append(started - ack)
            overhead.append(started - published)
        orthanc = orthanc_stable_after(work, make_study(args.instances), int(round(args.quiet_s)))
        result = {
            "mpps_ready_s": round(statistics.median(mpps_s), 3),
            "quiet_timer_ready_s": round(statistics.median(quiet_s), 3),
            "quiet_timer_setting_s": args.quiet_s,
            "queue_overhead_s": round(statistics.median(overhead), 3),
            "queue_overhead_max_s": round(max(overhead), 3),
            "peer_orthanc_stable_s": round(orthanc, 3) if orthanc is not None else None,
            "peer_orthanc_stable_age_s": int(round(args.quiet_s)),
            "mpps_ready_all_s": [round(v, 3) for v in mpps_s],
            "quiet_timer_ready_all_s": [round(v, 3) for v in quiet_s],
            "instances_per_study": args.instances,
            "broker": "redis",
            "cpu_cores": os.cpu_count(),
        }
        if not args.json:
            print(f"work folder: {work}")
            print(f"MPPS: job started {result['mpps_ready_s']} s after the last acknowledgement (goal <= 2 s)")
            print(
                f"quiet timer {args.quiet_s} s: job started after {result['quiet_timer_ready_s']} s (goal within 1 s)"
            )
            print(f"Orthanc StableAge {int(round(args.quiet_s))} s: stable after {result['peer_orthanc_stable_s']} s")
        print(json.dumps(result))
        succeeded = True
        return 0
    finally:
        hold.release()
        stop_processes(procs, work, remove=args.json and succeeded)


if __name__ == "__main__":
    sys.exit(main())
