"""Every state change of a job, in one place; the node (router, API, embedded worker) and the
workers (tasks) both call these.

    queued ──claim──▶ running ──▶ succeeded
      ▲                  │ ├────▶ inapplicable (outside the analysis' intended use; never retried)
      ▲                  │ ├────▶ failed     (time limit, bad input: running it again cannot help)
      │                  │ └────▶ retrying ──publish──▶ (claimed again) … or dead (attempts used up)
      └── retry (API) ◀── dead | failed;  rerun (API): a new job that supersedes a finished one

Each write is conditional on the state the caller saw (and, for a running job, on its worker and
attempt), so two processes racing for one job cannot both move it. When a job leaves the pending
states and no other job of its study is pending, the study is marked done.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.core.clock import aware, utcnow
from node.core.db import database_session
from node.core.settings import AnalysisSettings, Settings
from node.index import Study
from node.jobs.table import (
    DEAD,
    FAILED,
    FINAL_STATES,
    INAPPLICABLE,
    PENDING_STATES,
    PRIORITY_RANK,
    QUEUED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    Job,
)

log = logging.getLogger("ainode.jobs")


class JobNotFound(LookupError):
    """No job has this id."""


class JobStateConflict(RuntimeError):
    """The job is not in a state that allows the requested change."""


@dataclass(frozen=True)
class Claim:
    """This process runs this attempt of the job."""

    job_id: int
    attempt: int
    worker: str


def analysis_limits(settings: Settings, name: str) -> tuple[int, int]:
    """(soft, hard) time limits in seconds for an analysis: its configuration or the defaults."""
    for entry in settings.analyses:
        if entry.name == name:
            return entry.soft_time_limit_s, entry.time_limit_s
    default = AnalysisSettings(name=name)
    return default.soft_time_limit_s, default.time_limit_s


def worker_identity() -> str:
    """host:pid:start of this process, recorded on the job it runs."""
    return process_identity(os.getpid())


def process_identity(pid: int) -> str:
    """host:pid:start of a process of this host. The start time tells a process from an earlier
    one with the same pid: a restarted container gives its worker the pid and host name of the
    one that died, and a job that process held must not look like this one's own."""
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or ''."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces: count after its end.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def queue_job(
    session: Session,
    settings: Settings,
    *,
    key: str,
    analysis: str,
    params: dict[str, Any],
    rule: str = "",
    level: str = "study",
    priority: str = "routine",
    destinations: list[str] | None = None,
    study_pk: int | None = None,
    series_pk: int | None = None,
    study_uid: str = "",
    series_uid: str = "",
    fingerprint: str = "",
    supersedes: int | None = None,
) -> Job:
    """Add a queued job to the session (the caller commits, then calls publish_job)."""
    soft, hard = analysis_limits(settings, analysis)
    job = Job(
        key=key,
        analysis=analysis,
        params=json.dumps(params, sort_keys=True),
        rule=rule,
        level=level,
        priority=priority,
        priority_rank=PRIORITY_RANK[priority],
        destinations=json.dumps(destinations or []),
        study_pk=study_pk,
        series_pk=series_pk,
        study_uid=study_uid,
        series_uid=series_uid,
        input_fingerprint=fingerprint,
        supersedes_job_id=supersedes,
        soft_time_limit_s=soft,
        time_limit_s=hard,
        max_attempts=settings.jobs.max_attempts,
        state=QUEUED,
    )
    session.add(job)
    return job


def rerun_job(session: Session, settings: Settings, job_id: int) -> Job:
    """A new queued job running a finished job's analysis again; it supersedes the old one."""
    old = session.get(Job, job_id)
    if old is None:
        raise JobNotFound(job_id)
    if old.state in PENDING_STATES:
        raise JobStateConflict(f"job {job_id} is still {old.state}")
    new = queue_job(
        session,
        settings,
        key=old.key,
        analysis=old.analysis,
        params=old.params_dict(),
        rule=old.rule,
        level=old.level,
        priority=old.priority,
        destinations=old.destination_names(),
        study_pk=old.study_pk,
        series_pk=old.series_pk,
        study_uid=old.study_uid,
        series_uid=old.series_uid,
        fingerprint=old.input_fingerprint,
        supersedes=old.id,
    )
    session.flush()
    return new


def retry_job(session: Session, job_id: int) -> Job:
    """Give a dead or failed job a fresh set of attempts (queued again; the caller publishes it)."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.state not in (DEAD, FAILED):
        raise JobStateConflict(f"job {job_id} is {job.state}; only dead or failed jobs are retried")
    job.state, job.attempts, job.error, job.worker, job.finished_at = QUEUED, 0, "", "", None
    return job


def owner_gone(worker: str) -> bool:
    """True when the recorded owner is a process on this host that no longer exists (its pid
    gone, or taken by a process started later)."""
    host, pid, started = (worker.split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(started) and _start_ticks(int(pid)) != started


def claim_job(settings: Settings, job_id: int) -> Claim | None:
    """Make this process the job's runner; None when it must not run (done, running elsewhere, dead)."""
    me, now = worker_identity(), utcnow()
    stale = now - timedelta(seconds=settings.jobs.heartbeat_timeout_s)
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        if job.state in FINAL_STATES:
            log.info("job %s already %s; duplicate message ignored", job_id, job.state)
            return None
        if job.state == RUNNING:
            beat = aware(job.heartbeat_at)
            if job.worker == me or not (beat is None or beat < stale or owner_gone(job.worker)):
                log.info("job %s is running elsewhere (%s); duplicate message ignored", job_id, job.worker)
                return None
            log.warning("job %s: its runner %s stopped; taking over", job_id, job.worker)
        if job.attempts >= job.max_attempts:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == job.state)
                .values(
                    state=DEAD,
                    finished_at=now,
                    error=(job.error or "the worker was lost") + f" (after {job.attempts} attempts)",
                )
            )
            _mark_study_done(session, job_id)
            log.error("job %s dead: %d attempts used", job_id, job.attempts)
            return None
        attempt = job.attempts + 1
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == job.state, Job.attempts == job.attempts)
            .values(state=RUNNING, attempts=attempt, started_at=now, heartbeat_at=now, worker=me)
        )
        if claimed.rowcount != 1:
            return None
    return Claim(job_id, attempt, me)


def _of_claim(claim: Claim) -> Any:
    return (
        (Job.id == claim.job_id)
        & (Job.state == RUNNING)
        & (Job.worker == claim.worker)
        & (Job.attempts == claim.attempt)
    )


def _finish(settings: Settings, claim: Claim, **values: Any) -> bool:
    """Move the job from running (by this claim) to the given values; False if the claim was lost."""
    with database_session(settings.database.url) as session:
        done = session.execute(update(Job).where(_of_claim(claim)).values(**values))
        if done.rowcount == 1:
            _mark_study_done(session, claim.job_id)
        return done.rowcount == 1


def fail_job(settings: Settings, claim: Claim, reason: str) -> bool:
    """Failed for good: running it again would fail the same way."""
    return _finish(settings, claim, state=FAILED, error=reason, finished_at=utcnow())


def not_applicable(settings: Settings, claim: Claim, reason: str) -> bool:
    """Not applicable: the input is outside what the analysis is for (a distinct outcome, not an
    error; running it again would refuse it again)."""
    return _finish(settings, claim, state=INAPPLICABLE, error=reason, finished_at=utcnow())


def cancel_queued(settings: Settings, job_id: int, reason: str) -> bool:
    """Failed before any worker took it (its UPS workitem was canceled): a worker that receives
    its message finds it no longer queued. False when it already left the queue."""
    with database_session(settings.database.url) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_((QUEUED, RETRYING)))
            .values(state=FAILED, error=reason, finished_at=utcnow())
        )
        if done.rowcount == 1:
            _mark_study_done(session, job_id)
        return done.rowcount == 1


def record_not_applicable(session: Session, claim: Claim, reason: str) -> bool:
    """Not applicable, in the caller's transaction (which also records the notice SR's outbox
    rows); False if the claim was lost meanwhile."""
    done = session.execute(
        update(Job).where(_of_claim(claim)).values(state=INAPPLICABLE, error=reason, finished_at=utcnow())
    )
    if done.rowcount != 1:
        return False
    _mark_study_done(session, claim.job_id)
    return True


def retry_or_bury(settings: Settings, claim: Claim, reason: str, max_attempts: int) -> str:
    """After an error: retrying while attempts remain (the caller publishes it again), else dead."""
    if claim.attempt < max_attempts:
        _finish(settings, claim, state=RETRYING, error=reason)
        return RETRYING
    _finish(settings, claim, state=DEAD, error=reason, finished_at=utcnow())
    return DEAD


def succeed_job(session: Session, claim: Claim, summary: dict[str, Any]) -> bool:
    """Succeeded, in the caller's transaction (which also records the outbox rows); False if the
    claim was lost meanwhile (another runner took the job over)."""
    done = session.execute(
        update(Job)
        .where(_of_claim(claim))
        .values(state=SUCCEEDED, finished_at=utcnow(), error="", result=json.dumps(summary))
    )
    if done.rowcount != 1:
        return False
    _mark_study_done(session, claim.job_id)
    return True


def mark_time_limit_exceeded(settings: Settings, job_id: int, limit_s: float, soft: bool) -> None:
    """Record that a job was stopped by its time limit (it would hang again: not retried)."""
    reason = f"{'soft' if soft else 'hard'} time limit of {limit_s:g} s exceeded; the analysis was stopped"
    with database_session(settings.database.url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == RUNNING)
            .values(state=FAILED, error=reason, finished_at=utcnow())
        )
        _mark_study_done(session, job_id)
    log.error("job %s failed: %s", job_id, reason)


def release_crashed_job(settings: Settings, job_id: int, reason: str) -> None:
    """A job's process died: retry it while attempts remain, else it is dead."""
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        if job is None or job.state != RUNNING:
            return
        job.error = reason
        job.state = RETRYING if job.attempts < job.max_attempts else DEAD
        if job.state == DEAD:
            job.finished_at = utcnow()
            session.flush()
            _mark_study_done(session, job_id)


def running_in(settings: Settings, job_id: int, pid: int) -> bool:
    """Whether the job is running in the process ``pid`` of this host."""
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        return job is not None and job.state == RUNNING and job.worker == process_identity(pid)


def _mark_study_done(session: Session, job_id: int) -> None:
    job = session.get(Job, job_id)
    if job is None or job.study_pk is None or job.state in PENDING_STATES:
        return
    pending = session.scalar(
        select(func.count(Job.id)).where(Job.study_pk == job.study_pk, Job.state.in_(PENDING_STATES), Job.id != job_id)
    )
    study = session.get(Study, job.study_pk)
    if not pending and study is not None and study.state == "routed":
        study.state = "done"


class Heartbeat:
    """Refreshes the job's heartbeat while the analysis runs (the reconciler takes over a silent job)."""

    def __init__(self, settings: Settings, claim: Claim):
        self.settings, self.claim = settings, claim
        self.interval = max(0.5, min(10.0, settings.jobs.heartbeat_timeout_s / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{claim.job_id}")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with database_session(self.settings.database.url) as session:
                    session.execute(update(Job).where(_of_claim(self.claim)).values(heartbeat_at=utcnow()))
            except Exception:  # noqa: BLE001 - a busy database: the next beat will do
                log.warning("heartbeat of job %s not written", self.claim.job_id)
