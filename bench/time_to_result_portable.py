"""Benchmark: time to result with nothing but Python, for machines without Redis, Orthanc or DCMTK.

The portable mode of ``bench/time_to_result.py``, made for the lent GPU machine (``bench/gpu_run.sh``):
the same measurement, last C-STORE acknowledgement of a phantom CT pushed by pynetdicom with MPPS
→ last result object acknowledged by the PACS (outbox rows' ``delivered_at``), with only what a
bare machine can run:

- ``ainode serve`` on the embedded broker (``broker.url`` empty: the job table is the queue) and
  its warm child worker (node/jobs/embedded.py: the model stays loaded between jobs);
- the built-in test PACS of ``ainode demo`` (``node.demo.BuiltinPACS``, pynetdicom), which writes
  and fsyncs each object before it acknowledges it; the bench then checks the PACS holds every
  result object of the study;
- the device the analysis picks itself (CUDA when available, ``workers.analysis.registry``).

A warm-up study of the same size runs first: the child's start, the model load and the first
CUDA kernels' compilation are reported apart (``warmup``), then ``--repeats`` studies, each with
fresh UIDs, give the median. There is no DCMTK peer here, so each run reports its ratio to the
pynetdicom push of the same study (association → last C-STORE acknowledgement); where DCMTK's
storescu and Orthanc are both installed, storescu → Orthanc of the same study and results is
added, as in the full bench.

The last line printed is JSON (``--out FILE`` also writes it there).
Usage: python bench/time_to_result_portable.py [--json] [--slices 300] [--size 512] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402
    device_name,
    finish_work,
    fresh_uids,
    hold_port,
    push,
    start_orthanc,
    stop_processes,
    storescu_seconds,
    wait_port,
    wait_results,
    write_phantom,
)

from node.demo import PACS_AE, BuiltinPACS, orthanc_binary  # noqa: E402

ANALYSIS = "ct-segmentation"


def torch_info() -> dict[str, Any]:
    """The software and accelerator the analysis runs on: torch, CUDA, cuDNN, GPU, CPU."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpu_cores": os.cpu_count()}
    try:
        import torch
    except ImportError:
        return {**info, "torch": None}
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def node_config(work: Path, dicom_port: int, pacs_port: int) -> dict[str, Any]:
    """The node on embedded defaults (SQLite, no broker), one rule CT → ct-segmentation → the PACS."""
    return {
        "node": {
            "ae_title": "AINODE",
            "host": "127.0.0.1",
            "port": dicom_port,
            "receivers": 1,
            "accept_unknown_peers": True,
        },
        "storage": {"path": str(work / "store"), "min_free_bytes": "16MiB"},
        "database": {"url": f"sqlite:///{work / 'ainode.db'}"},
        "broker": {"url": ""},  # empty: the embedded broker and its warm child worker
        "destinations": [{"name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port}],
        # MPPS COMPLETED makes the study ready; the timers are only the fallback.
        "timers": {"series_quiet_s": 30, "study_quiet_s": 30},
        "rules": [{"name": "ct", "match": {"modality": "CT"}, "analyses": [ANALYSIS], "destinations": ["pacs"]}],
        "api": {"enabled": False},
        "audit": {"sink": "none"},
    }


def start_node(work: Path, config: dict[str, Any]) -> subprocess.Popen:
    """`ainode serve` with ``config``, its log in the work folder; returns once it listens."""
    cfg = work / "ainode.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("AINODE_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "-c", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=(work / "node.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def one_study(files: list[Path], dicom_port: int, db_url: str, pacs: BuiltinPACS) -> dict[str, Any]:
    """Push the study with fresh UIDs and time it to its last result acknowledged by the PACS."""
    study = fresh_uids(files)
    study_uid = str(study[0].StudyInstanceUID)
    began = time.time()
    last_ack = push(dicom_port, "AINODE", study, mpps=True)
    t = wait_results(db_url, study_uid)
    held = len(pacs.objects(study_uid))
    if held < t["objects"]:
        raise RuntimeError(f"the PACS holds {held} of the {t['objects']} result objects it acknowledged")
    total, push_s = t["delivered"] - last_ack, last_ack - began
    return {
        "time_to_result_s": round(total, 3),
        "push_s": round(push_s, 3),
        "ratio_to_push": round(total / push_s, 3) if push_s > 0 else None,
        "stages": {
            "ready": round(t["ready"] - last_ack, 3),
            "queued": round(t["started"] - t["ready"], 3),
            "run": round(t["finished"] - t["started"], 3),
            "deliver": round(t["delivered"] - t["finished"], 3),
        },
        "analysis_s": {k: round(v, 3) for k, v in (t["timings"][0] if t["timings"] else {}).items()},
        "result_objects": t["objects"],
        "pixels": t["pixels"],
        "study_uid": study_uid,
    }


def median_of(runs: list[dict[str, Any]], *keys: str) -> float:
    """The median over the runs of the value at ``keys`` (a path into each run's dict)."""
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value.get(key, 0.0)
        values.append(value)
    return round(statistics.median(values), 3)


def peer_storescu(work: Path, study: list[Path], results: list[Path]) -> dict[str, float] | None:
    """storescu → Orthanc of the same study and result objects, where both are installed."""
    orthanc = orthanc_binary()
    if not (shutil.which("storescu") and orthanc):
        return None
    (work / "orthanc").mkdir()
    proc, port, _ = start_orthanc(work / "orthanc", {"Name": "bench-peer"}, exe=orthanc)
    try:
        return {
            "peer_storescu_results_to_orthanc_s": round(storescu_seconds(port, results), 3),
            "peer_storescu_study_to_orthanc_s": round(storescu_seconds(port, study), 3),
        }
    finally:
        stop_processes([proc])


def summary(args: argparse.Namespace, warmup: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON line: medians first, then the warm-up, every run and the machine."""
    stages = {name: median_of(runs, "stages", name) for name in runs[0]["stages"]}
    analysis = {name: median_of(runs, "analysis_s", name) for name in runs[0]["analysis_s"]}
    device = device_name()
    return {
        "bench": "time_to_result_portable",
        "time_to_result_s": median_of(runs, "time_to_result_s"),
        "push_s": median_of(runs, "push_s"),
        "ratio_to_push": median_of(runs, "ratio_to_push"),
        "stages": stages,
        "analysis_s": analysis,
        "goal_s": 1.0 if device.startswith("cuda") else 3.0,  # issue 20, for 300 x 512²
        "device": device,
        "software": torch_info(),
        "slices": args.slices,
        "size": args.size,
        "repeats": len(runs),
        "result_objects": runs[0]["result_objects"],
        "pixels": runs[0]["pixels"],
        # The first study also pays the child's start, the imports and the model load.
        "warmup": {k: warmup[k] for k in ("time_to_result_s", "stages", "analysis_s")},
        "runs_s": [r["time_to_result_s"] for r in runs],
        "broker": "embedded",
        "pacs": "built-in storage SCP (node.demo.BuiltinPACS, fsync before acknowledging)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--repeats", type=int, default=3, help="measured studies after the warm-up")
    parser.add_argument("--out", type=Path, help="also write the JSON there")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ainode-ttr-portable-"))
    procs: list[subprocess.Popen] = []
    pacs: BuiltinPACS | None = None
    hold = None
    succeeded = False
    try:
        began = time.perf_counter()
        files = write_phantom(args.slices, args.size)  # rendered once per machine, kept in the temp folder
        render_s = time.perf_counter() - began
        print(f"phantom {args.slices} x {args.size}^2 ready in {render_s:.1f} s", file=sys.stderr, flush=True)
        pacs = BuiltinPACS(work / "pacs")
        pacs.start()
        hold = hold_port()  # ainode's receivers bind it beside the hold (SO_REUSEPORT); nobody else can
        db_url = f"sqlite:///{work / 'ainode.db'}"
        procs.append(start_node(work, node_config(work, hold.port, pacs.dicom_port)))
        wait_port(hold.port, proc=procs[-1], log=work / "node.log")
        hold.release()

        warmup = one_study(files, hold.port, db_url, pacs)
        print(f"warm-up study: {warmup['time_to_result_s']} s", file=sys.stderr, flush=True)
        runs = []
        for n in range(args.repeats):
            runs.append(one_study(files, hold.port, db_url, pacs))
            print(f"study {n + 1}: {runs[-1]['time_to_result_s']} s", file=sys.stderr, flush=True)
        results = [work / "pacs" / f"{uid}.dcm" for uid in pacs.objects(runs[-1]["study_uid"])]
        result = summary(args, warmup, runs)
        result["phantom_render_s"] = round(render_s, 1)  # 0 when it was already rendered
        result.update(peer_storescu(work, files, results) or {"peer_storescu": "not installed (DCMTK, Orthanc)"})
        if not args.json:
            print(f"work folder: {work}")
            print(f"time to result: {result['time_to_result_s']} s median of {len(runs)} on {result['device']}")
            print(f"  pynetdicom push of the same study {result['push_s']} s, ratio {result['ratio_to_push']}")
            for name, value in result["stages"].items():
                print(f"  {name:10s} {value:8.3f} s")
            print(f"warm-up study (model load included): {warmup['time_to_result_s']} s")
            print(f"phantom rendered in {render_s:.1f} s (not part of the measurement)")
        line = json.dumps(result)
        print(line)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(line + "\n")
        succeeded = True
        return 0
    finally:
        if hold is not None:
            hold.release()
        stop_processes(procs)
        if pacs is not None:
            pacs.stop()
        finish_work(work, remove=args.json and succeeded)


if __name__ == "__main__":
    sys.exit(main())
