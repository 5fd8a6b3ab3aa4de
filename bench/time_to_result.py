"""Benchmark: time from the last acknowledged instance of a study to every result stored in the PACS.

Runs the node as deployed (`ainode serve`, a private Redis, one warm `ainode worker`) with Orthanc
as the PACS, pushes a 300-slice phantom CT over DICOM with MPPS (pynetdicom as the modality), and
measures from the last C-STORE response to the last result object acknowledged by Orthanc
(outbox rows' ``delivered_at``), split by stage:

- ready:     last acknowledgement → study ready (MPPS COMPLETED, index ``ready_at``)
- queued:    ready → job started on the worker (routing, job row, Celery message)
- load / inference / write / job_other: the job's run on the worker, as the worker timed its
  stages (recorded with the job); job_other is the rest (claim, inputs, checks, outbox rows)
- deliver:   job finished → last result acknowledged by the PACS

Peer comparison in the same run: DCMTK storescu sending the same result files to the same Orthanc
(the floor for the deliver stage), and storescu pushing the source study to Orthanc.

The same study's report also goes to a RIS: ``time_to_ris_s`` is last acknowledgement → ORU^R01
ACKed by python-hl7's MLLP server, ``time_to_fhir_s`` → the FHIR transaction answered by
Medplum's router (tests/peers/fhir; left out when Node or its packages are missing).

The same run also measures the pull path (IHE AIW-I): a study held only by Orthanc, a UPS
workitem naming it created by a RIS (pynetdicom N-CREATE), the node's Task Performer claiming it,
retrieving the study (C-GET), analysing it and delivering the results: ``workitem_to_completed_s``
is N-CREATE answered → workitem COMPLETED (its ``finished_at``), beside the push path's
``time_to_result_s``.

Without Redis, Orthanc or DCMTK (the lent GPU machine): ``bench/time_to_result_portable.py``.

The last line printed is JSON: {"time_to_result_s", "time_to_ris_s", "workitem_to_completed_s",
"stages", "device", ...}.
Usage: python bench/time_to_result.py [--json] [--slices 300] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import UnifiedProcedureStepPush
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import (
    device_name,
    fresh_uids,
    hold_port,
    push,
    start_orthanc,
    start_redis,
    stop_processes,
    storescu_seconds,
    wait_port,
    wait_results,
    write_phantom,
)
from common import epoch as _epoch  # noqa: E402

from node.core.dicom import answers_stay_with_the_sender  # noqa: E402
from tests.results.ris_peers import FHIR_SERVER, FhirServer, MllpRis  # noqa: E402

ANALYSIS = "ct-segmentation"


def fresh_copies(paths: list[Path], folder: Path) -> list[Path]:
    """Copies of the node's result files with new instance UIDs: the peer's storescu sends objects
    Orthanc has not stored yet, as the node's were."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        copies.append(folder / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def workitem_to_completed(dicom_port: int, pacs_port: int, db_url: str, files: list[Path]) -> float:
    """Seconds from a RIS's N-CREATE of a workitem for a study held only by Orthanc to its
    COMPLETED (the node retrieves, analyses and delivers)."""
    study = fresh_uids(files)
    push(pacs_port, "ORTHANC", study, mpps=False)  # the modality sent it to the PACS only
    ds = Dataset()
    ds.PatientName, ds.PatientID = study[0].PatientName, study[0].PatientID
    ds.ProcedureStepState, ds.ScheduledProcedureStepPriority = "SCHEDULED", "HIGH"
    ds.ProcedureStepLabel, ds.WorklistLabel = "CT organs", "AI"
    ds.ScheduledProcedureStepStartDateTime, ds.InputReadinessState = "20260101000000", "READY"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = ANALYSIS, "99AINODE", ANALYSIS
    ds.ScheduledWorkitemCodeSequence = Sequence([code])
    item, where = Dataset(), Dataset()
    item.StudyInstanceUID, item.TypeOfInstances = study[0].StudyInstanceUID, "DICOM"
    where.RetrieveAETitle = "ORTHANC"
    item.DICOMRetrievalSequence = Sequence([where])
    ds.InputInformationSequence = Sequence([item])
    uid = generate_uid()
    ae = AE(ae_title="RIS")
    ae.add_requested_context(UnifiedProcedureStepPush)
    assoc = answers_stay_with_the_sender(ae.associate("127.0.0.1", dicom_port, ae_title="AINODE"))
    answer, _ = assoc.send_n_create(ds, UnifiedProcedureStepPush, uid)
    created = time.time()
    assoc.release()
    if answer is None or int(answer.Status) != 0:
        raise RuntimeError(f"N-CREATE answered {answer}")
    engine = create_engine(db_url)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT state, finished_at FROM workitems WHERE sop_instance_uid = :u"), {"u": uid}
            ).first()
        if row and row[0] == "COMPLETED":
            return _epoch(row[1]) - created
        if row and row[0] == "CANCELED":
            raise RuntimeError("the workitem was CANCELED")
        time.sleep(0.05)
    raise RuntimeError("the workitem did not complete in time")


def job_stages(run_s: float, timings: list[dict[str, float]]) -> dict[str, float]:
    """The job's run split as the worker timed it: load, inference (the analysis's preprocess,
    inference and postprocess), write, and ``job_other`` (claim, inputs, checks, the outbox
    transaction: the rest of the run)."""
    load = sum(t.get("load", 0.0) for t in timings)
    inference = sum(t.get(k, 0.0) for t in timings for k in ("load_model", "preprocess", "inference", "postprocess"))
    write = sum(t.get("write", 0.0) for t in timings)
    return {
        "load": round(load, 3),
        "inference": round(inference, 3),
        "write": round(write, 3),
        "job_other": round(max(0.0, run_s - load - inference - write), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each slice")
    parser.add_argument(
        "--warm-size",
        type=int,
        default=0,
        help="rows and columns of the warm-up study (default: --size, a worker in service has seen "
        "studies of that size; 64: the measured study is the worker's first of its size)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ainode-ttr-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AINODE_CONFIG", None)
    procs: list[subprocess.Popen] = []
    hold = None
    succeeded = False
    ris: MllpRis | None = None
    fhir: FhirServer | None = None
    try:
        files = write_phantom(args.slices, args.size)
        warm_size = args.warm_size or args.size
        warm_files = write_phantom(48 if warm_size == 64 else args.slices, warm_size, seed=8)
        orthanc, pacs_port, _ = start_orthanc(
            work, {"Name": "bench-pacs", "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
        )
        procs.append(orthanc)
        redis, redis_port = start_redis(work)
        procs.append(redis)
        ris = MllpRis().start()
        destinations = [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
            {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port},
        ]
        fhir = None
        if shutil.which("node") and (FHIR_SERVER.parent / "node_modules").exists():
            fhir = FhirServer(work).start()
            destinations.append({"name": "fhir", "type": "fhir", "url": fhir.base})
        hold = hold_port()  # ainode's receivers bind it beside the hold (SO_REUSEPORT); nobody else can
        dicom_port = hold.port
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
            "destinations": destinations,
            # The pull path: the Task Performer retrieves a workitem's study from Orthanc (C-GET).
            "peers": [{"ae_title": "RIS", "hosts": ["127.0.0.1"], "allow": ["echo", "ups"]}],
            "sources": [
                {"name": "orthanc", "method": "c-get", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}
            ],
            "workflow": {"destinations": ["pacs"]},
            "timers": {"series_quiet_s": 30, "study_quiet_s": 30},
            "rules": [
                {
                    "name": "ct",
                    "match": {"modality": "CT"},
                    "analyses": [ANALYSIS],
                    "destinations": [d["name"] for d in destinations],
                }
            ],
            "api": {"enabled": False},
            "audit": {"sink": "none"},
        }
        cfg = work / "ainode.yaml"
        cfg.write_text(yaml.safe_dump(config))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "-c", str(cfg)],
                cwd=ROOT,
                env=env,
                stdout=(work / "node.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "node.cli", "worker", "-c", str(cfg), "--queues", "gpu,cpu"],
                cwd=ROOT,
                env=env,
                stdout=(work / "worker.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_port(dicom_port, proc=procs[-2], log=work / "node.log")  # the node, not its worker
        hold.release()

        # Warm-up study: the worker loads the model once, as it would in service.
        warm = fresh_uids(warm_files)
        push(dicom_port, "AINODE", warm, mpps=True)
        wait_results(db_url, warm[0].StudyInstanceUID)

        study = fresh_uids(files)
        last_ack = push(dicom_port, "AINODE", study, mpps=True)
        t = wait_results(db_url, study[0].StudyInstanceUID)
        run_s = t["finished"] - t["started"]
        stages = {
            "ready": round(t["ready"] - last_ack, 3),
            "queued": round(t["started"] - t["ready"], 3),
            **job_stages(run_s, t["timings"]),
            "deliver": round(t["delivered"] - t["finished"], 3),
        }
        workitem_s = workitem_to_completed(dicom_port, pacs_port, db_url, files)
        peer_results_s = storescu_seconds(pacs_port, fresh_copies(t["outputs"], work / "peer-results"))
        peer_study_s = storescu_seconds(pacs_port, files)
        total = t["delivered"] - last_ack
        result = {
            "time_to_result_s": round(total, 3),
            "time_to_ris_s": round(t["ris"] - last_ack, 3) if t["ris"] else None,
            "time_to_fhir_s": round(t["fhir"] - last_ack, 3) if t["fhir"] else None,
            "workitem_to_completed_s": round(workitem_s, 3),
            "stages": stages,
            "device": device_name(),
            # Issue 20's goal for the clinical-size study (300 x 512²): 1 s on a GPU, 3 s on 2 CPU cores.
            "goal_s": 1.0 if device_name().startswith("cuda") else 3.0,
            "slices": args.slices,
            "size": args.size,
            "result_objects": t["objects"],
            "job_run_s": round(run_s, 3),
            "pixels": t["pixels"],
            # Every stage of the job as the worker timed it, per analysed series.
            "worker_stages_s": t["timings"],
            "warm_size": warm_size,
            "peer_storescu_results_to_orthanc_s": round(peer_results_s, 3),
            "peer_storescu_study_to_orthanc_s": round(peer_study_s, 3),
        }
        if not args.json:
            print(f"work folder: {work}")
            print(f"time to result: {result['time_to_result_s']} s (goal {result['goal_s']} s) on {result['device']}")
            for name, value in stages.items():
                print(f"  {name:10s} {value:8.3f} s")
            print(f"peer: storescu of the same results to Orthanc {result['peer_storescu_results_to_orthanc_s']} s")
            print(f"time to RIS (ORU ACK): {result['time_to_ris_s']} s, to FHIR: {result['time_to_fhir_s']} s")
            print(f"workitem for a study only in Orthanc, created -> COMPLETED: {result['workitem_to_completed_s']} s")
        print(json.dumps(result))
        succeeded = True
        return 0
    finally:
        if hold is not None:
            hold.release()
        stop_processes(procs, work, remove=args.json and succeeded)
        if ris is not None:
            ris.stop()
        if fhir is not None:
            fhir.stop()


if __name__ == "__main__":
    sys.exit(main())
