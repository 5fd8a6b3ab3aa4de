"""Prometheus instruments of the node: what the stages increment, and this machine's GPUs.

``/metrics`` (served by ``node.admin.api``, assembled in ``node.admin.metrics``) has two sources:

1. **Live instruments** defined here with prometheus-client (``ASSOCIATIONS``, ``INSTANCES_RECEIVED``,
   ``BYTES_RECEIVED``, ``STAGE_SECONDS``, GPU gauges...). Stages import and increment them. ``ainode serve`` forks receiver
   processes, so `ainode serve` sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh private folder before
   prometheus-client is first imported (node/cli.py): every process of the node, receivers and
   embedded job processes included, writes its samples there (prometheus multiprocess mode) and
   the API process aggregates them at scrape time. Remote Celery workers are separate machines:
   they are scraped on their own (see docs/operations.md).
2. **The database** (``node.admin.metrics.DatabaseCollector``): instances, jobs, deliveries and
   stage latencies read from the tables at scrape time; the numbers to alert on.

This module imports no other stage: every stage may import it.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets (seconds) spanning a C-STORE (ms) to a slow analysis (minutes).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# --- live instruments other stages increment -------------------------------------------------

ASSOCIATIONS = Counter(
    "ainode_associations", "DICOM associations requested, by outcome", ["outcome"]
)  # outcome: accepted | rejected
# Connections closed before they associated: over a pending limit, or ARTIM expired.
PENDING_CLOSED = Counter(
    "ainode_pending_connections_closed", "Connections closed before association, by reason", ["reason"]
)  # reason: address_limit | total_limit | artim
INSTANCES_RECEIVED = Counter("ainode_instances_received", "Instances acknowledged with C-STORE Success")
BYTES_RECEIVED = Counter("ainode_bytes_received", "Bytes of instances acknowledged with Success")
INSTANCES_QUARANTINED = Counter(
    "ainode_instances_quarantined", "Instances answered Success that the index could not take (moved aside)"
)
# Live latency of work done inside the node's processes, e.g. stage="store": C-STORE data set
# received -> durable on disk and indexed (the time before we may answer Success).
STAGE_SECONDS = Histogram(
    "ainode_stage_seconds", "Time spent in one pipeline step (live)", ["stage"], buckets=LATENCY_BUCKETS
)
GPU_MEMORY_USED = Gauge(
    "ainode_gpu_memory_used_bytes", "GPU memory in use on a worker", ["worker", "device"], multiprocess_mode="livemax"
)
GPU_MEMORY_TOTAL = Gauge(
    "ainode_gpu_memory_total_bytes",
    "GPU memory of a worker's device",
    ["worker", "device"],
    multiprocess_mode="livemax",
)
GPU_UTILISATION = Gauge(
    "ainode_gpu_utilisation_ratio",
    "GPU utilisation (0..1) of a worker's device",
    ["worker", "device"],
    multiprocess_mode="livemax",
)
AUDIT_DROPPED = Counter("ainode_audit_messages_dropped", "Audit messages dropped because the sink was too slow")
API_REQUESTS = Counter("ainode_api_requests", "Admin API requests by method and status", ["method", "status"])


NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
    "--format=csv,noheader,nounits",
]


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Rows of ``nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu`` (MiB, %)."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        index, name, used, total, util = fields
        try:
            gpus.append(
                {
                    "index": int(index),
                    "name": name,
                    "memory_used_bytes": int(float(used)) * 1024**2,
                    "memory_total_bytes": int(float(total)) * 1024**2,
                    "utilisation": float(util) / 100.0 if util.replace(".", "").isdigit() else None,
                }
            )
        except ValueError:
            continue
    return gpus


def gpu_status() -> list[dict[str, Any]]:
    """This machine's GPUs from nvidia-smi (no CUDA context is created); [] without NVIDIA driver."""
    if shutil.which(NVIDIA_SMI_QUERY[0]) is None:
        return []
    try:
        out = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else []


def record_gpu(worker: str) -> list[dict[str, Any]]:
    """Sample this machine's GPUs into the GPU gauges (labelled with ``worker``); returns them."""
    gpus = gpu_status()
    for gpu in gpus:
        device = str(gpu["index"])
        GPU_MEMORY_USED.labels(worker, device).set(gpu["memory_used_bytes"])
        GPU_MEMORY_TOTAL.labels(worker, device).set(gpu["memory_total_bytes"])
        if gpu["utilisation"] is not None:
            GPU_UTILISATION.labels(worker, device).set(gpu["utilisation"])
    return gpus
