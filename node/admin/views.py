"""What the admin API shows: studies with their pipeline phase and stage timings, jobs, deliveries,
the dashboard's overview and the workers page. No patient names or IDs leave through these."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.core.clock import iso, seconds_between
from node.core.db import session_scope
from node.core.metrics import gpu_status
from node.core.settings import Settings
from node.dispatch.table import Delivery
from node.index import Instance, Series, Study
from node.ingest.quarantine import alerts
from node.jobs.table import PENDING_STATES, Job

PHASES = (
    "received",
    "ready",
    "queued",
    "running",
    "delivered",
    "done",
    "not applicable",
    "unrouted",
    "partial",
    "failed",
)


def current_jobs(jobs: list[Job]) -> list[Job]:
    """The jobs no later job superseded (a re-run's outcome replaces its predecessor's)."""
    superseded = {j.supersedes_job_id for j in jobs if j.supersedes_job_id is not None}
    return [j for j in jobs if j.id not in superseded]


def study_phase(study: Study, jobs: list[Job], deliveries: list[Delivery]) -> str:
    """Where a study stands: received → ready → queued → running → delivered (or failed/unrouted/done).

    "partial" when something failed but some results were delivered (or some jobs succeeded and
    nothing is left to run): the PACS has part of the results, and the failures say what is missing.
    """
    if study.state == "received":
        return "received"
    if study.state == "unrouted":
        return "unrouted"
    jobs = current_jobs(jobs)
    states = {j.state for j in jobs}
    if states & {"dead", "failed"} or any(d.state == "failed" for d in deliveries):
        if states & {"running", "queued", "retrying"}:
            return "running" if "running" in states else "queued"
        if any(d.state == "delivered" for d in deliveries) or "succeeded" in states:
            return "partial"
        return "failed"
    if "running" in states:
        return "running"
    if states & {"queued", "retrying"}:
        return "queued"
    if deliveries:
        return "delivered" if all(d.state in ("delivered", "skipped") for d in deliveries) else "running"
    if jobs and states == {"inapplicable"}:
        return "not applicable"  # every analysis refused the study as outside its intended use
    if jobs:
        return "done"
    return "ready"


def study_jobs(session: Session, study_uid: str) -> list[Job]:
    """The study's jobs, oldest first."""
    return list(session.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)))


def study_deliveries(session: Session, study_uid: str) -> list[Delivery]:
    """The study's outbox rows, oldest first."""
    return list(session.scalars(select(Delivery).where(Delivery.study_instance_uid == study_uid).order_by(Delivery.id)))


def stage_timings(study: Study, jobs: list[Job], deliveries: list[Delivery]) -> dict[str, float | None]:
    """Seconds spent in each stage, from the timestamps the stages record."""
    created = min((j.created_at for j in jobs), default=None)
    started = min((j.started_at for j in jobs if j.started_at), default=None)
    finished = max((j.finished_at for j in jobs if j.finished_at), default=None)
    delivered = max((d.delivered_at for d in deliveries if d.delivered_at), default=None)
    return {
        "receiving": seconds_between(study.last_received_at, study.first_received_at),
        "completion": seconds_between(study.ready_at, study.last_received_at),
        "routing": seconds_between(created, study.ready_at),
        "queue_wait": seconds_between(started, created),
        "analysis": seconds_between(finished, started),
        "delivery": seconds_between(delivered, finished),
        "total": seconds_between(delivered or finished, study.first_received_at),
    }


def job_view(job: Job) -> dict[str, Any]:
    """A job as the API shows it (no patient data)."""
    result: dict[str, Any] = {}
    try:
        result = json.loads(job.result or "{}")
    except ValueError:
        pass
    return {
        "id": job.id,
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "rule": job.rule,
        "analysis": job.analysis,
        "priority": job.priority,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "error": job.error,
        # The outcome in words: "not applicable: <reason>" for a job outside the analysis' intended use.
        "outcome": f"not applicable: {job.error}" if job.state == "inapplicable" else job.state,
        "model_version": result.get("algorithm_version") or result.get("model_version") or "",
        "outputs": len(result.get("outputs", [])) if isinstance(result.get("outputs"), list) else 0,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at),
        "supersedes_job_id": job.supersedes_job_id,
        "findings": {
            key: result[key] for key in ("classifications", "measurements", "detections", "segments") if key in result
        },
    }


def delivery_view(row: Delivery) -> dict[str, Any]:
    """A delivery (outbox row) as the API shows it."""
    return {
        "id": row.id,
        "job_id": row.job_id,
        "destination": row.destination,
        "kind": row.kind,
        "sop_instance_uid": row.sop_instance_uid,
        "study_uid": row.study_instance_uid,
        "state": row.state,
        "attempts": row.attempts,
        "retries": max(0, row.attempts - 1),
        "last_status": row.last_status,
        "reason": row.reason,
        "created_at": iso(row.created_at),
        "delivered_at": iso(row.delivered_at),
        "next_attempt_at": iso(row.next_attempt_at),
        "commitment": row.commitment,
    }


def study_views(session: Session, studies: list[Study]) -> list[dict[str, Any]]:
    """Views of many studies with three queries in all (the dashboard polls this every few seconds)."""
    uids = [st.study_uid for st in studies]
    jobs: dict[str, list[Job]] = {u: [] for u in uids}
    deliveries: dict[str, list[Delivery]] = {u: [] for u in uids}
    modalities: dict[int, set[str]] = {st.id: set() for st in studies}
    for chunk in range(0, len(uids), 500):  # bounded IN lists
        part = uids[chunk : chunk + 500]
        for j in session.scalars(select(Job).where(Job.study_uid.in_(part)).order_by(Job.id)):
            jobs[j.study_uid].append(j)
        for d in session.scalars(select(Delivery).where(Delivery.study_instance_uid.in_(part))):
            deliveries[d.study_instance_uid].append(d)
    ids = list(modalities)
    for chunk in range(0, len(ids), 500):
        for pk, modality in session.execute(
            select(Series.study_pk, Series.modality).where(Series.study_pk.in_(ids[chunk : chunk + 500]))
        ):
            if modality:
                modalities[pk].add(modality)
    return [_study_view(st, jobs[st.study_uid], deliveries[st.study_uid], sorted(modalities[st.id])) for st in studies]


def study_view(session: Session, study: Study, detail: bool = False) -> dict[str, Any]:
    """A study with its phase, timings and rules matched (no patient names or IDs)."""
    jobs = study_jobs(session, study.study_uid)
    deliveries = study_deliveries(session, study.study_uid)
    modalities = sorted(
        {m for (m,) in session.execute(select(Series.modality).where(Series.study_pk == study.id)) if m}
    )
    view = _study_view(study, jobs, deliveries, modalities)
    if detail:
        view["jobs"] = [job_view(j) for j in jobs]
        view["deliveries"] = [delivery_view(d) for d in deliveries]
        view["series"] = [
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                "description": s.description,
                "instances": s.instance_count,
                "state": s.state,
            }
            for s in session.scalars(select(Series).where(Series.study_pk == study.id))
        ]
    return view


def _study_view(study: Study, jobs: list[Job], deliveries: list[Delivery], modalities: list[str]) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "description": study.description,
        "modalities": modalities,
        "instances": study.instance_count,
        "calling_ae": study.calling_ae,
        "state": study.state,
        "phase": study_phase(study, jobs, deliveries),
        "ready_reason": study.ready_reason,
        "first_received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "ready_at": iso(study.ready_at),
        "timings_s": stage_timings(study, jobs, deliveries),
        "rules_matched": sorted({j.rule for j in jobs if j.rule}),
        "failures": [
            f"job {j.id} ({j.analysis}): {j.error}" for j in current_jobs(jobs) if j.state in ("dead", "failed")
        ]
        + [f"delivery {d.id} to {d.destination}: {d.reason}" for d in deliveries if d.state == "failed"],
        "not_applicable": [f"job {j.id} ({j.analysis}): {j.error}" for j in jobs if j.state == "inapplicable"],
    }


def overview_data(settings: Settings, engine: Any) -> dict[str, Any]:
    """Phase counts of recent studies, queue depth per priority, failures, disk space."""
    phases = {p: 0 for p in PHASES}
    failures: list[dict[str, Any]] = []
    queue = {"stat": 0, "routine": 0, "low": 0}
    with session_scope(engine) as s:
        for view in study_views(s, list(s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(200)))):
            phases[view["phase"]] = phases.get(view["phase"], 0) + 1
            if view["failures"]:
                failures.append({"study_uid": view["study_uid"], "reasons": view["failures"]})
        for priority, n in s.execute(
            select(Job.priority, func.count()).where(Job.state.in_(PENDING_STATES)).group_by(Job.priority)
        ):
            queue[priority] = n
        index = {
            "studies": s.scalar(select(func.count()).select_from(Study)) or 0,
            "instances": s.scalar(select(func.count()).select_from(Instance)) or 0,
            "bytes": int(s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0),
        }
    root = Path(settings.storage.path)
    while not root.exists() and root != root.parent:
        root = root.parent
    usage = shutil.disk_usage(root)
    return {
        "phases": phases,
        "queue_depth": queue,
        "failures": failures[:20],
        "index": index,
        "disk": {
            "free_bytes": usage.free,
            "total_bytes": usage.total,
            "reserve_bytes": int(settings.storage.min_free_bytes),
        },
        "node": {
            "ae_title": settings.node.ae_title,
            "port": settings.node.port,
            "broker": "embedded" if not settings.broker.url else "redis",
        },
        "alerts": alerts(Path(settings.storage.path)),
    }


def workers_data(settings: Settings, engine: Any, analyses: list[dict[str, Any]]) -> dict[str, Any]:
    """Worker identities with their last heartbeat and analyses; this machine's GPUs; the analyses
    installed on this machine (``analyses``, from the provider the composition root injects)."""
    seen: list[dict[str, Any]] = []
    with session_scope(engine) as s:
        rows = s.execute(
            select(Job.worker, func.max(Job.heartbeat_at), func.count()).where(Job.worker != "").group_by(Job.worker)
        ).all()
        for worker, beat, n in rows:
            names = sorted(set(s.scalars(select(Job.analysis).where(Job.worker == worker))))
            running = (
                s.scalar(select(func.count()).select_from(Job).where(Job.worker == worker, Job.state == "running")) or 0
            )
            seen.append(
                {"worker": worker, "last_heartbeat": iso(beat), "jobs": n, "running": running, "analyses": names}
            )
    return {
        "workers": seen,
        "gpus": gpu_status(),
        "analyses": analyses,
        "mode": "embedded" if not settings.broker.url else "celery",
    }
