"""Jobs: the job table is the truth; the Celery message only carries the job id.

A job row is committed (state ``queued``) before its message is published. A worker claims it
atomically (``running``, attempts + 1, heartbeat), and finishes it as ``succeeded``, ``failed``
(time limit, bad input: running it again would not help), ``retrying`` (an error; published again)
or ``dead`` (attempts used up). The reconciler re-publishes what the broker lost.

With no broker configured, ``start_services`` runs an embedded broker and an in-process worker:
the job table itself is the queue, and a worker thread in the node runs each job in a child
process that enforces the time limits. One workstation then needs no Redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, func, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.core.db import Base, ChangeGate, engine_for, session_scope
from node.index import utcnow
from node.core.settings import AnalysisSettings, Settings

log = logging.getLogger("ainode.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, RETRYING, DEAD = "queued", "running", "succeeded", "failed", "retrying", "dead"
PENDING_STATES = (QUEUED, RUNNING, RETRYING)
FINAL_STATES = (SUCCEEDED, FAILED, DEAD)

# Redis priorities: a lower number is served first. STAT overtakes routine, routine overtakes low.
PRIORITY_RANK = {"stat": 0, "routine": 3, "low": 6}
PRIORITY_STEPS = [0, 3, 6, 9]
ANALYSIS_QUEUE, DELIVERY_QUEUE = "gpu", "cpu"
RUN_ANALYSIS_TASK, DELIVER_TASK = "ainode.run_analysis", "ainode.deliver"


class Job(Base):
    """One analysis of one study or series, from routing to its final state."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # rule/analysis/level/uid: the same key with new inputs is a re-run that supersedes the last.
    key: Mapped[str] = mapped_column(String(300), index=True)
    study_pk: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), nullable=True, index=True)
    series_pk: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="SET NULL"), nullable=True)
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    level: Mapped[str] = mapped_column(String(8), default="study")
    rule: Mapped[str] = mapped_column(String(128), default="")
    analysis: Mapped[str] = mapped_column(String(128))
    params: Mapped[str] = mapped_column(Text, default="{}")
    destinations: Mapped[str] = mapped_column(Text, default="[]")
    priority: Mapped[str] = mapped_column(String(8), default="routine")
    priority_rank: Mapped[int] = mapped_column(Integer, default=3, index=True)
    queue: Mapped[str] = mapped_column(String(16), default=ANALYSIS_QUEUE)
    soft_time_limit_s: Mapped[int] = mapped_column(Integer, default=600)
    time_limit_s: Mapped[int] = mapped_column(Integer, default=900)
    # sha256 of the sorted input SOP Instance UIDs: tells a late arrival from a duplicate.
    input_fingerprint: Mapped[str] = mapped_column(String(64), default="")
    supersedes_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(12), default=QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    task_id: Mapped[str] = mapped_column(String(64), default="")
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    # A short JSON summary of what the job produced (counts, output paths), no patient data.
    result: Mapped[str] = mapped_column(Text, default="")

    def params_dict(self) -> dict[str, Any]:
        """The analysis parameters from the rule."""
        return dict(json.loads(self.params or "{}"))

    def destination_names(self) -> list[str]:
        """Names of the destinations the results go to."""
        return list(json.loads(self.destinations or "[]"))


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    from datetime import timezone

    return dt.replace(tzinfo=timezone.utc)


def input_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """A stable digest of a job's inputs (order does not matter)."""
    digest = hashlib.sha256()
    for uid in sorted(sop_instance_uids):
        digest.update(uid.encode() + b"\n")
    return digest.hexdigest()


def analysis_limits(settings: Settings, name: str) -> tuple[int, int]:
    """(soft, hard) time limits in seconds for an analysis: its configuration or the defaults."""
    for entry in settings.analyses:
        if entry.name == name:
            return entry.soft_time_limit_s, entry.time_limit_s
    default = AnalysisSettings(name=name)
    return default.soft_time_limit_s, default.time_limit_s


def worker_identity() -> str:
    """host:pid of this process, recorded on the job it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def queue_job(session: Session, settings: Settings, *, key: str, analysis: str, params: dict[str, Any],
              rule: str = "", level: str = "study", priority: str = "routine", destinations: list[str] | None = None,
              study_pk: int | None = None, series_pk: int | None = None, study_uid: str = "", series_uid: str = "",
              fingerprint: str = "", supersedes: int | None = None) -> Job:
    """Add a queued job to the session (the caller commits, then calls publish_job)."""
    soft, hard = analysis_limits(settings, analysis)
    job = Job(key=key, analysis=analysis, params=json.dumps(params, sort_keys=True), rule=rule, level=level,
              priority=priority, priority_rank=PRIORITY_RANK[priority], destinations=json.dumps(destinations or []),
              study_pk=study_pk, series_pk=series_pk, study_uid=study_uid, series_uid=series_uid,
              input_fingerprint=fingerprint, supersedes_job_id=supersedes, soft_time_limit_s=soft,
              time_limit_s=hard, max_attempts=settings.jobs.max_attempts, state=QUEUED)
    session.add(job)
    return job


def embedded(settings: Settings) -> bool:
    """True when no broker is configured: the node runs jobs itself."""
    return not settings.broker.url


def publish_job(settings: Settings, job_id: int, countdown: float | None = None) -> bool:
    """Send the job's message (its id only) to the broker; False when the broker is unreachable.

    The row must already be committed. In embedded mode the table is the queue and nothing is sent.
    """
    engine = engine_for(settings.database.url)
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in (QUEUED, RETRYING, RUNNING):
            return False
        job.publish_count += 1
        task_id = f"job-{job.id}-{job.publish_count}"
        queue, rank, soft, hard = job.queue, job.priority_rank, job.soft_time_limit_s, job.time_limit_s
        if embedded(settings):
            job.task_id, job.published_at = task_id, utcnow()
            return True
    from workers.celery_app import configured_app

    try:
        configured_app(settings).send_task(
            RUN_ANALYSIS_TASK, args=[job_id], task_id=task_id, queue=queue, routing_key=queue,
            priority=rank, soft_time_limit=soft, time_limit=hard, countdown=countdown)
    except Exception as err:  # noqa: BLE001 - the reconciler publishes it when the broker is back
        log.warning("job %s not published (broker unreachable: %s); the reconciler will retry", job_id,
                    type(err).__name__)
        return False
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(task_id=task_id, published_at=utcnow()))
    log.info("job %s published to %s (priority %s, task %s)", job_id, queue, rank, task_id)
    return True


def publish_delivery(settings: Settings, delivery_id: int) -> bool:
    """Queue a result delivery on the cpu queue (the dispatcher's outbox row is the truth)."""
    if embedded(settings):
        return False  # the dispatcher's own loop delivers in embedded mode
    from workers.celery_app import configured_app

    try:
        configured_app(settings).send_task(DELIVER_TASK, args=[delivery_id], queue=DELIVERY_QUEUE,
                                           routing_key=DELIVERY_QUEUE, priority=PRIORITY_RANK["routine"])
    except Exception as err:  # noqa: BLE001
        log.warning("delivery %s not published (%s)", delivery_id, type(err).__name__)
        return False
    return True


def status_summary(session: Session) -> dict[str, Any]:
    """Job counts per state, the dead and failed jobs with their reasons, the oldest waiting job."""
    counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state.in_((QUEUED, RETRYING))))
    problems = session.scalars(select(Job).where(Job.state.in_((DEAD, FAILED)))
                               .order_by(Job.finished_at.desc()).limit(20)).all()
    oldest_age = (utcnow() - aware(oldest)).total_seconds() if oldest else None
    return {
        "jobs": {state: counts.get(state, 0) for state in (QUEUED, RUNNING, RETRYING, SUCCEEDED, FAILED, DEAD)},
        "oldest_waiting_s": round(oldest_age, 1) if oldest_age is not None else None,
        "dead": [{"id": j.id, "analysis": j.analysis, "rule": j.rule, "attempts": j.attempts, "error": j.error[:200]}
                 for j in problems if j.state == DEAD],
        "failed": [{"id": j.id, "analysis": j.analysis, "rule": j.rule, "error": j.error[:200]}
                   for j in problems if j.state == FAILED],
    }


# --- embedded worker -------------------------------------------------------------------------


class EmbeddedWorker:
    """Runs queued jobs in priority order inside the node, each in a child process with time limits."""

    def __init__(self, settings: Settings, poll_s: float = 0.2):
        self.settings = settings
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="embedded-worker", daemon=True)

    def start(self) -> "EmbeddedWorker":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop taking jobs; a job in progress is stopped and will be run again after restart."""
        self._stop.set()
        if self._child and self._child.poll() is None:
            self._child.kill()
        self._thread.join(timeout=10)

    def _next_job(self) -> int | None:
        stale = utcnow() - timedelta(seconds=self.settings.jobs.heartbeat_timeout_s)
        with session_scope(engine_for(self.settings.database.url)) as session:
            waiting = session.scalar(
                select(Job.id).where(or_(Job.state.in_((QUEUED, RETRYING)),
                                         (Job.state == RUNNING) & (Job.heartbeat_at < stale)))
                .where(Job.queue == ANALYSIS_QUEUE).order_by(Job.priority_rank, Job.id).limit(1))
            if waiting is not None:
                return waiting
            # A job whose child died with the node (kill -9, power cut) need not wait for the heartbeat
            # timeout: its process is known to be gone.
            from workers.tasks import _owner_gone

            for job_id, worker in session.execute(select(Job.id, Job.worker).where(Job.state == RUNNING)):
                if _owner_gone(worker):
                    return job_id
        return None

    def _loop(self) -> None:
        gate = ChangeGate(self.settings.database.url)  # an idle queue costs one cheap read per poll
        while not self._stop.is_set():
            if not gate.due():
                self._stop.wait(self.poll_s)
                continue
            try:
                job_id = self._next_job()
            except Exception:  # noqa: BLE001 - a locked or restarting database: try again
                log.exception("embedded worker could not read the job table")
                job_id = None
            if job_id is None:
                self._stop.wait(self.poll_s)
                continue
            self._run(job_id)

    def _run(self, job_id: int) -> None:
        with session_scope(engine_for(self.settings.database.url)) as session:
            hard = session.get(Job, job_id).time_limit_s
        env = dict(os.environ, AINODE_SETTINGS_JSON=self.settings.model_dump_json())
        cmd = [sys.executable, "-m", "workers.tasks", str(job_id)]
        self._child = subprocess.Popen(cmd, env=env)
        # The hard limit counts from the moment the child claims the job, not from its start-up
        # (importing the analysis stack can take seconds on a busy machine).
        started: float | None = None
        while self._child.poll() is None:
            if self._stop.wait(0.2):
                self._child.kill()
                self._child.wait()
                return
            if started is None and self._claimed_by(job_id, self._child.pid):
                started = time.monotonic()
            if started is not None and time.monotonic() - started > hard:
                self._child.kill()
                self._child.wait()
                from workers.tasks import mark_time_limit_exceeded

                mark_time_limit_exceeded(self.settings, job_id, hard, soft=False)
                return
        if self._child.returncode != 0:
            log.warning("embedded job %s child exited with %s", job_id, self._child.returncode)
            from workers.tasks import release_crashed_job

            release_crashed_job(self.settings, job_id, f"worker process exited with {self._child.returncode}")

    def _claimed_by(self, job_id: int, pid: int) -> bool:
        with session_scope(engine_for(self.settings.database.url)) as session:
            job = session.get(Job, job_id)
            return job is not None and job.state == RUNNING and job.worker.endswith(f":{pid}")


def start_services(settings: Settings) -> list[Callable[[], None]]:
    """In embedded mode (no broker URL), start the in-process worker; otherwise nothing."""
    if not embedded(settings):
        log.info("jobs go to the broker at %s; run `ainode worker` on the analysis machines",
                 settings.broker.url.split("@")[-1])
        return []
    log.warning("no broker configured: using the embedded broker (the job table) and an in-process worker; "
                "set broker.url to a redis:// URL to run analyses on separate GPU workers")
    worker = EmbeddedWorker(settings).start()
    return [worker.stop]
