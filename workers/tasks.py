"""Worker tasks: ``run_analysis(job_id)`` on the gpu queue and ``deliver(delivery_id)`` on the cpu queue.

A task claims its job row atomically before doing anything, so a second copy of a message (broker
redelivery, reconciler re-publish) finds the job running or done and exits. While it runs it keeps
a heartbeat on the row; the reconciler re-publishes a job whose heartbeat stopped. Results use
output UIDs derived from the job key and inputs (workers/results.py), so a re-run rewrites the
same objects instead of adding new ones.

Two diagnostic analyses exist for tests and operations checks; they are not models:
``count-instances`` records how many instances the job's inputs hold, and ``sleep`` waits
``params.seconds`` (optionally appending a line to ``params.record`` when it finishes); ``fail``
always raises, to exercise retries and the dead state.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request
from sqlalchemy import func, select, update

from node.core.db import engine_for, session_scope
from node.index import Instance, Series, Study, utcnow
from node.jobs.table import (DEAD, FAILED, FINAL_STATES, PENDING_STATES, RETRYING, RUNNING, SUCCEEDED, Job, aware, publish_job, worker_identity)
from node.core.settings import Settings
from workers.celery_app import app, current_settings

log = logging.getLogger("ainode.tasks")

DIAGNOSTIC_ANALYSES = ("count-instances", "sleep", "fail")


class PermanentJobError(Exception):
    """Running the job again would fail the same way (missing input, unknown analysis)."""


# --- claiming and finishing ------------------------------------------------------------------


def _owner_gone(worker: str) -> bool:
    """True when the recorded owner is a process on this host that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != worker_identity().rpartition(":")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_job(settings: Settings, job_id: int) -> tuple[int, str] | None:
    """Make this process the job's runner; returns (attempt, worker) or None when it must not run."""
    me, now = worker_identity(), utcnow()
    stale = now - timedelta(seconds=settings.jobs.heartbeat_timeout_s)
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        if job.state in FINAL_STATES:
            log.info("job %s already %s; duplicate message ignored", job_id, job.state)
            return None
        if job.state == RUNNING:
            beat = aware(job.heartbeat_at)
            if job.worker == me or not (beat is None or beat < stale or _owner_gone(job.worker)):
                log.info("job %s is running elsewhere (%s); duplicate message ignored", job_id, job.worker)
                return None
            log.warning("job %s: its runner %s stopped; taking over", job_id, job.worker)
        if job.attempts >= job.max_attempts:
            session.execute(update(Job).where(Job.id == job_id, Job.state == job.state).values(
                state=DEAD, finished_at=now,
                error=(job.error or "the worker was lost") + f" (after {job.attempts} attempts)"))
            log.error("job %s dead: %d attempts used", job_id, job.attempts)
            return None
        attempt = job.attempts + 1
        claimed = session.execute(update(Job).where(Job.id == job_id, Job.state == job.state,
                                                    Job.attempts == job.attempts).values(
            state=RUNNING, attempts=attempt, started_at=now, heartbeat_at=now, worker=me))
        if claimed.rowcount != 1:
            return None
    return attempt, me


def _finish(settings: Settings, job_id: int, attempt: int, me: str, **values: Any) -> bool:
    """Move the job from running (by us, this attempt) to its final values; False if we lost it."""
    values.setdefault("finished_at", utcnow())
    with session_scope(engine_for(settings.database.url)) as session:
        done = session.execute(update(Job).where(Job.id == job_id, Job.state == RUNNING, Job.worker == me,
                                                 Job.attempts == attempt).values(**values))
        if done.rowcount == 1:
            _mark_study_done(session, job_id)
        return done.rowcount == 1


def _mark_study_done(session: Any, job_id: int) -> None:
    job = session.get(Job, job_id)
    if job is None or job.study_pk is None:
        return
    pending = session.scalar(select(func.count(Job.id)).where(Job.study_pk == job.study_pk,
                                                                Job.state.in_(PENDING_STATES), Job.id != job_id))
    study = session.get(Study, job.study_pk)
    if not pending and study is not None and study.state == "routed":
        study.state = "done"


def mark_time_limit_exceeded(settings: Settings, job_id: int, limit_s: float, soft: bool) -> None:
    """Record that a job was stopped by its time limit (it would hang again: not retried)."""
    reason = f"{'soft' if soft else 'hard'} time limit of {limit_s:g} s exceeded; the analysis was stopped"
    with session_scope(engine_for(settings.database.url)) as session:
        session.execute(update(Job).where(Job.id == job_id, Job.state == RUNNING).values(
            state=FAILED, error=reason, finished_at=utcnow()))
        _mark_study_done(session, job_id)
    log.error("job %s failed: %s", job_id, reason)


def release_crashed_job(settings: Settings, job_id: int, reason: str) -> None:
    """A job's process died: retry it while attempts remain, else it is dead."""
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.get(Job, job_id)
        if job is None or job.state != RUNNING:
            return
        job.error = reason
        job.state = RETRYING if job.attempts < job.max_attempts else DEAD
        if job.state == DEAD:
            job.finished_at = utcnow()


class Heartbeat:
    """Refreshes the job's heartbeat while the analysis runs."""

    def __init__(self, settings: Settings, job_id: int, me: str):
        self.settings, self.job_id, self.me = settings, job_id, me
        self.interval = max(0.5, min(10.0, settings.jobs.heartbeat_timeout_s / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{job_id}")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope(engine_for(self.settings.database.url)) as session:
                    session.execute(update(Job).where(Job.id == self.job_id, Job.worker == self.me,
                                                      Job.state == RUNNING).values(heartbeat_at=utcnow()))
            except Exception:  # noqa: BLE001 - a busy database: the next beat will do
                log.warning("heartbeat of job %s not written", self.job_id)


# --- the analyses ----------------------------------------------------------------------------


def _inputs(settings: Settings, job: Job) -> list[tuple[str, str, Path]]:
    """(series uid, SOP instance uid, file path) of the job's input instances."""
    with session_scope(engine_for(settings.database.url)) as session:
        query = select(Series.series_uid, Instance.sop_instance_uid, Instance.path).join(
            Series, Instance.series_pk == Series.id)
        if job.series_pk is not None:
            query = query.where(Series.id == job.series_pk)
        else:
            query = query.where(Series.study_pk == job.study_pk)
        rows = session.execute(query.order_by(Series.id, Instance.instance_number, Instance.id)).all()
    return [(s, u, Path(settings.storage.path) / p) for s, u, p in rows]


def run_diagnostic(job: Job, inputs: list[tuple[str, str, Path]], attempt: int) -> dict[str, Any]:
    """The test/diagnostic analyses; their result is a small JSON summary."""
    params = job.params_dict()
    if job.analysis == "count-instances":
        return {"instances": len(inputs), "series": len({s for s, _, _ in inputs})}
    if job.analysis == "fail":
        raise RuntimeError("diagnostic analysis 'fail' always fails")
    seconds = float(params.get("seconds", 1.0))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        except SoftTimeLimitExceeded:
            if params.get("ignore_soft_limit"):  # simulates a hang the soft limit cannot stop
                continue
            raise
    if params.get("record"):
        with open(params["record"], "a", encoding="utf-8") as fh:
            fh.write(f"job {job.id} attempt {attempt} pid {os.getpid()}\n")
    return {"slept_s": seconds}


def run_model_job(settings: Settings, job: Job, inputs: list[tuple[str, str, Path]]) -> tuple[list[Path], dict[str, Any]]:
    """The real path: load the series as a volume, run the analysis, write DICOM results."""
    from workers.analysis.imaging import load_series
    from workers.analysis.registry import AnalysisError
    from workers.analysis.registry import run_analysis as run_registered
    from node.core.settings import CapabilityProfile
    from workers.results import write_results
    from workers.results.context import ResultContext

    if not inputs:
        raise PermanentJobError("the job's input instances are no longer in the index")
    missing = [p for _, _, p in inputs if not p.exists()]
    if missing:
        raise PermanentJobError(f"{len(missing)} input file(s) missing from storage")
    # A study-level job analyses its largest series (the acquisition volume).
    by_series: dict[str, list[tuple[str, Path]]] = {}
    for series_uid, sop_uid, path in inputs:
        by_series.setdefault(series_uid, []).append((sop_uid, path))
    series_uid, members = max(by_series.items(), key=lambda item: len(item[1]))
    try:
        volume = load_series([p for _, p in members])
        findings = run_registered(job.analysis, volume, job.params_dict(), settings=settings)
    except AnalysisError as err:  # unknown analysis, or data it does not accept: a re-run cannot help
        raise PermanentJobError(str(err)) from err
    context = ResultContext(
        job_key=job.key, output_dir=Path(settings.storage.path) / "results" / f"job-{job.id}",
        destinations=[settings.destination(n).capabilities for n in job.destination_names()
                      if any(d.name == n for d in settings.destinations)] or [CapabilityProfile()])
    outputs = list(write_results(findings, context))
    return outputs, {"outputs": [str(p) for p in outputs], "series_uid": series_uid}


def execute_job(settings: Settings, job_id: int) -> str:
    """Claim and run one job to its final state; returns that state (or 'skipped')."""
    claimed = claim_job(settings, job_id)
    if claimed is None:
        return "skipped"
    attempt, me = claimed
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
    log.info("job %s started (%s, attempt %d/%d)", job_id, job.analysis, attempt, job.max_attempts)
    try:
        with Heartbeat(settings, job_id, me):
            inputs = _inputs(settings, job)
            if job.analysis in DIAGNOSTIC_ANALYSES:
                outputs, summary = [], run_diagnostic(job, inputs, attempt)
            else:
                outputs, summary = run_model_job(settings, job, inputs)
    except SoftTimeLimitExceeded:
        mark_time_limit_exceeded(settings, job_id, job.soft_time_limit_s, soft=True)
        return FAILED
    except PermanentJobError as err:
        _finish(settings, job_id, attempt, me, state=FAILED, error=str(err))
        log.error("job %s failed: %s", job_id, err)
        return FAILED
    except Exception as err:  # noqa: BLE001 - any other error: retry while attempts remain
        reason = f"{type(err).__name__}: {err}"[:2000]
        if attempt < job.max_attempts:
            _finish(settings, job_id, attempt, me, state=RETRYING, error=reason, finished_at=None)
            log.warning("job %s attempt %d failed (%s); retrying", job_id, attempt, type(err).__name__)
            publish_job(settings, job_id, countdown=min(300, 2 ** attempt))
            return RETRYING
        _finish(settings, job_id, attempt, me, state=DEAD, error=reason)
        log.error("job %s dead after %d attempts: %s", job_id, attempt, type(err).__name__)
        return DEAD
    return _succeed(settings, job, attempt, me, outputs, summary)


def _succeed(settings: Settings, job: Job, attempt: int, me: str, outputs: list[Path], summary: dict[str, Any]) -> str:
    with session_scope(engine_for(settings.database.url)) as session:
        done = session.execute(update(Job).where(Job.id == job.id, Job.state == RUNNING, Job.worker == me,
                                                 Job.attempts == attempt).values(
            state=SUCCEEDED, finished_at=utcnow(), error="", result=json.dumps(summary)))
        if done.rowcount != 1:
            log.warning("job %s finished but was taken over meanwhile; result not recorded twice", job.id)
            return "skipped"
        delivery_ids = []
        if outputs and job.destination_names():
            from node.dispatch.outbox import enqueue_results

            delivery_ids = list(enqueue_results(session, job.id, outputs, job.destination_names(), settings=settings) or [])
        _mark_study_done(session, job.id)
    log.info("job %s succeeded (%d result objects)", job.id, len(outputs))
    from node.jobs.table import publish_delivery

    for delivery_id in delivery_ids:
        if isinstance(delivery_id, int):
            publish_delivery(settings, delivery_id)
    return SUCCEEDED


# --- Celery tasks ----------------------------------------------------------------------------


class JobRequest(Request):
    """Marks the job failed when Celery's hard time limit kills the process running it."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft and self.name == "ainode.run_analysis":
            try:
                mark_time_limit_exceeded(current_settings(), int(self.args[0]), timeout, soft=False)
            except Exception:  # noqa: BLE001 - the reconciler will still see the job without heartbeat
                log.exception("could not record the hard time limit of task %s", self.id)


@app.task(name="ainode.run_analysis", bind=True, Request=JobRequest, acks_late=True, reject_on_worker_lost=True)
def run_analysis(self: Any, job_id: int) -> str:
    """Run the job with this id (the message carries nothing else)."""
    return execute_job(current_settings(), int(job_id))


@app.task(name="ainode.deliver", acks_late=True, reject_on_worker_lost=True)
def deliver(delivery_id: int) -> Any:
    """Send one result delivery (the dispatcher's outbox row decides what and where)."""
    from node.dispatch.outbox import deliver as dispatch

    return dispatch(int(delivery_id), current_settings())


# --- embedded worker child -------------------------------------------------------------------


def _embedded_main(argv: list[str]) -> int:
    """Run one job in this process (started by the node's embedded worker), with a soft time limit."""
    settings = Settings.model_validate_json(os.environ["AINODE_SETTINGS_JSON"])
    job_id = int(argv[0])
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.get(Job, job_id)
        soft = job.soft_time_limit_s if job else 600

    def on_alarm(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(soft))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    execute_job(settings, job_id)
    signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(_embedded_main(sys.argv[1:]))
