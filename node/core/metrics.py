"""Prometheus metrics of the node: what other stages increment, and what is read from the database.

Two sources make up ``/metrics`` (served by ``node.api``):

1. **Live instruments** defined here with prometheus-client (``ASSOCIATIONS``, ``INSTANCES_RECEIVED``,
   ``BYTES_RECEIVED``, ``STAGE_SECONDS``, GPU gauges...). Stages import and increment them. ``ainode serve`` forks receiver
   processes, so `ainode serve` sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh private folder before
   prometheus-client is first imported (node/cli.py): every process of the node, receivers and
   embedded job processes included, writes its samples there (prometheus multiprocess mode) and
   the API process aggregates them at scrape time. Remote Celery workers are separate machines:
   they are scraped on their own (see docs/operations.md).
2. **The database** (``DatabaseCollector``): instances and bytes stored, jobs per state and
   priority (queue depth), deliveries and their retries, and stage latencies computed from the
   timestamps every stage already records. Job outcomes and delivery retries are counted only
   here: the rows are the truth, and workers on other machines need no metrics path to the node. These survive restarts and are exact across any number
   of receiver processes and machines, so they are the numbers to alert on; names end in
   ``_stored``/``_total`` as Prometheus conventions ask.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Latency buckets (seconds) spanning a C-STORE (ms) to a slow analysis (minutes).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# --- live instruments other stages increment -------------------------------------------------

ASSOCIATIONS = Counter("ainode_associations", "DICOM associations requested, by outcome",
                       ["outcome"])  # outcome: accepted | rejected
INSTANCES_RECEIVED = Counter("ainode_instances_received", "Instances acknowledged with C-STORE Success")
BYTES_RECEIVED = Counter("ainode_bytes_received", "Bytes of instances acknowledged with Success")
# Live latency of work done inside the node's processes, e.g. stage="store": C-STORE data set
# received -> durable on disk and indexed (the time before we may answer Success).
STAGE_SECONDS = Histogram("ainode_stage_seconds", "Time spent in one pipeline step (live)", ["stage"],
                          buckets=LATENCY_BUCKETS)
GPU_MEMORY_USED = Gauge("ainode_gpu_memory_used_bytes", "GPU memory in use on a worker", ["worker", "device"],
                        multiprocess_mode="livemax")
GPU_MEMORY_TOTAL = Gauge("ainode_gpu_memory_total_bytes", "GPU memory of a worker's device", ["worker", "device"],
                         multiprocess_mode="livemax")
GPU_UTILISATION = Gauge("ainode_gpu_utilisation_ratio", "GPU utilisation (0..1) of a worker's device",
                        ["worker", "device"], multiprocess_mode="livemax")
AUDIT_DROPPED = Counter("ainode_audit_messages_dropped", "Audit messages dropped because the sink was too slow")
API_REQUESTS = Counter("ainode_api_requests", "Admin API requests by method and status", ["method", "status"])


NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
                    "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Rows of ``nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu`` (MiB, %)."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        index, name, used, total, util = fields
        try:
            gpus.append({"index": int(index), "name": name, "memory_used_bytes": int(float(used)) * 1024**2,
                         "memory_total_bytes": int(float(total)) * 1024**2,
                         "utilisation": float(util) / 100.0 if util.replace(".", "").isdigit() else None})
        except ValueError:
            continue
    return gpus


def gpu_status() -> list[dict[str, Any]]:
    """This machine's GPUs from nvidia-smi (no CUDA context is created); [] without NVIDIA driver."""
    import shutil
    import subprocess

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


# --- numbers from the database ---------------------------------------------------------------


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    if later.tzinfo is None or earlier.tzinfo is None:
        later, earlier = later.replace(tzinfo=None), earlier.replace(tzinfo=None)
    return max(0.0, (later - earlier).total_seconds())


def _histogram(name: str, doc: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["stage"])
    for stage, values in samples.items():
        buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in LATENCY_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([stage], buckets, float(sum(values)))
    return family


class DatabaseCollector:
    """Collects node-wide numbers from the index, job and outbox tables at scrape time."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def describe(self) -> list[Any]:  # no fixed description: families depend on the data
        return []

    def collect(self) -> Iterable[Any]:
        """Yield metric families (skips tables that do not exist in this installation)."""
        from sqlalchemy import func, select

        from node.core.db import engine_for, session_scope
        from node.index import Instance, Study

        with session_scope(engine_for(self.database_url)) as session:
            count, size = session.execute(select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))).one()
            yield GaugeMetricFamily("ainode_instances_stored", "Instances in the index", value=count)
            yield GaugeMetricFamily("ainode_bytes_stored", "Bytes of instances in the index", value=int(size))
            studies = GaugeMetricFamily("ainode_studies", "Studies by pipeline state", labels=["state"])
            for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
                studies.add_metric([state], n)
            yield studies
            latencies: dict[str, list[float]] = {"completion": []}
            for first, ready in session.execute(select(Study.first_received_at, Study.ready_at)
                                                .where(Study.ready_at.is_not(None))):
                latencies["completion"].append(_seconds(ready, first) or 0.0)
            yield from self._jobs(session, latencies)
            yield from self._deliveries(session, latencies)
            yield _histogram("ainode_pipeline_stage_seconds",
                             "Stage latencies from recorded timestamps (completion, queue wait, analysis, delivery)",
                             latencies)

    def _jobs(self, session: Any, latencies: dict[str, list[float]]) -> Iterable[Any]:
        try:
            from node.jobs.table import PENDING_STATES, Job
        except ImportError:
            return
        from sqlalchemy import func, select

        jobs = GaugeMetricFamily("ainode_jobs", "Jobs by state", labels=["state"])
        depth = GaugeMetricFamily("ainode_queue_depth", "Jobs waiting or running, by priority", labels=["priority"])
        outcomes = CounterMetricFamily("ainode_job_outcomes_recorded", "Finished jobs by final state and analysis",
                                       labels=["state", "analysis"])
        waiting: dict[str, int] = {"stat": 0, "routine": 0, "low": 0}
        for state, priority, analysis, n in session.execute(
                select(Job.state, Job.priority, Job.analysis, func.count()).group_by(Job.state, Job.priority, Job.analysis)):
            if state in PENDING_STATES:
                waiting[priority] = waiting.get(priority, 0) + n
            else:
                outcomes.add_metric([state, analysis], n)
        for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs.add_metric([state], n)
        for priority, n in waiting.items():
            depth.add_metric([priority], n)
        latencies["queue_wait"], latencies["analysis"] = [], []
        for created, started, finished in session.execute(select(Job.created_at, Job.started_at, Job.finished_at)
                                                          .where(Job.started_at.is_not(None))):
            latencies["queue_wait"].append(_seconds(started, created) or 0.0)
            if finished is not None:
                latencies["analysis"].append(_seconds(finished, started) or 0.0)
        yield from (jobs, depth, outcomes)

    def _deliveries(self, session: Any, latencies: dict[str, list[float]]) -> Iterable[Any]:
        try:
            from node.dispatch.outbox import Delivery
        except ImportError:
            return
        from sqlalchemy import func, select

        states = GaugeMetricFamily("ainode_deliveries", "Result deliveries by destination and state",
                                   labels=["destination", "state"])
        retries = CounterMetricFamily("ainode_delivery_retries_recorded", "Delivery attempts beyond the first",
                                      labels=["destination"])
        for dest, state, n, attempts in session.execute(
                select(Delivery.destination, Delivery.state, func.count(), func.sum(Delivery.attempts))
                .group_by(Delivery.destination, Delivery.state)):
            states.add_metric([dest, state], n)
            retries.add_metric([dest], max(0, int(attempts or 0) - n))
        latencies["delivery"] = [_seconds(done, made) or 0.0 for made, done in session.execute(
            select(Delivery.created_at, Delivery.delivered_at).where(Delivery.delivered_at.is_not(None)))]
        yield from (states, retries)


def exposition(database_url: str) -> bytes:
    """The text exposition for ``/metrics``: live instruments (all processes) plus the database."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        body = generate_latest(REGISTRY)
    db_registry = CollectorRegistry()
    db_registry.register(DatabaseCollector(database_url))
    return body + generate_latest(db_registry)
