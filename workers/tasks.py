"""Worker tasks: ``run_analysis(job_id)`` on the gpu queue and ``deliver(delivery_id)`` on the cpu queue.

A job runs as lifecycle → analysis → results → outbox: the task claims its job row
(``node.jobs.lifecycle``; a second copy of a message finds it running or done and exits), keeps
its heartbeat while it loads the inputs and runs the analysis (``workers.analysis``), writes the
DICOM results (``workers.results``, output UIDs derived from the job key and inputs, so a re-run
rewrites the same objects) and records them in the dispatcher's outbox in the transaction that
marks the job succeeded.

Errors are sorted by what running the job again could change (``is_transient``): a transient one
(worker lost, out of memory, database or storage unreachable) is retried while attempts remain;
a permanent one (invalid input, a writer's refusal, a bug that would repeat) fails the job once
with a reason; an input outside the analysis' intended use ends it "not applicable".

Diagnostic analyses exist for tests and operations checks; they are not models:
``count-instances`` records how many instances the job's inputs hold, and ``sleep`` waits
``params.seconds`` (optionally appending a line to ``params.record`` when it finishes); ``fail``
always raises a transient error, to exercise retries and the dead state.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request
from sqlalchemy.exc import DBAPIError

from node.core.db import database_session
from node.core.settings import CapabilityProfile, Settings, current_settings, use_settings
from node.dispatch.kinds import ResultObject
from node.dispatch.outbox import deliver as dispatch
from node.dispatch.outbox import enqueue_results
from node.jobs import lifecycle
from node.jobs.broker import app, publish_delivery, publish_job
from node.jobs.inputs import InputInstance, job_inputs
from node.jobs.table import FAILED, INAPPLICABLE, RETRYING, SUCCEEDED, Job
from workers.analysis.contract import NotApplicable
from workers.analysis.imaging import load_series
from workers.analysis.registry import AnalysisError, get_analysis
from workers.analysis.registry import run_analysis as run_registered
from workers.results import ResultContext, check_writable, write_results

log = logging.getLogger("ainode.tasks")

DIAGNOSTIC_ANALYSES = ("count-instances", "sleep", "fail")


class PermanentJobError(Exception):
    """Running the job again would fail the same way (missing input, unknown analysis)."""


class TransientJobError(Exception):
    """Running the job again may succeed (a resource was briefly unavailable)."""


# Errors that say nothing about the input: running the job again may succeed.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientJobError,
    OSError,  # storage or network (ConnectionError, TimeoutError are OSErrors)
    MemoryError,
    torch.OutOfMemoryError,
    DBAPIError,  # the database was unreachable or busy
    WorkerLostError,
)


def is_transient(err: BaseException) -> bool:
    """Whether a retry may succeed; everything else (ValueError, AttributeError, a writer's
    refusal …) would fail the same way again on the same input."""
    if isinstance(err, (AnalysisError, PermanentJobError)):
        return False
    if isinstance(err, TRANSIENT_ERRORS):
        return True
    # CUDA errors other than out-of-memory (a lost or busy device) are worth another worker.
    return isinstance(err, RuntimeError) and "CUDA" in str(err)


def error_reason(err: BaseException) -> str:
    """The job's error text, never empty: our own refusals as written, others with their class."""
    text = str(err).strip() or "(no message)"
    if isinstance(err, (AnalysisError, PermanentJobError)):
        return text[:2000]
    return f"{type(err).__name__}: {text}"[:2000]


# --- the analyses ----------------------------------------------------------------------------


def run_diagnostic(job: Job, inputs: list[InputInstance], attempt: int) -> dict[str, Any]:
    """The test/diagnostic analyses; their result is a small JSON summary."""
    params = job.params_dict()
    if job.analysis == "count-instances":
        return {"instances": len(inputs), "series": len({i.series_uid for i in inputs})}
    if job.analysis == "fail":
        raise TransientJobError("diagnostic analysis 'fail' always fails")
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


def run_model_job(
    settings: Settings, job: Job, inputs: list[InputInstance]
) -> tuple[list[ResultObject], dict[str, Any]]:
    """The real path: load the series as a volume, run the analysis, write DICOM results."""
    if not inputs:
        raise PermanentJobError("the job's input instances are no longer in the index")
    missing = [i.path for i in inputs if not i.path.exists()]
    if missing:
        raise PermanentJobError(f"{len(missing)} input file(s) missing from storage")
    # A study-level job analyses its largest series (the acquisition volume).
    by_series: dict[str, list[Path]] = {}
    for item in inputs:
        by_series.setdefault(item.series_uid, []).append(item.path)
    series_uid, members = max(by_series.items(), key=lambda entry: len(entry[1]))
    volume = load_series(members)
    check_writable(volume, get_analysis(job.analysis, settings).task)  # before inference, not after
    findings = run_registered(job.analysis, volume, job.params_dict(), settings=settings)
    context = ResultContext(
        job_key=job.key,
        output_dir=Path(settings.storage.path) / "results" / f"job-{job.id}",
        destinations=[
            settings.destination(n).capabilities
            for n in job.destination_names()
            if any(d.name == n for d in settings.destinations)
        ]
        or [CapabilityProfile()],
    )
    outputs = list(write_results(findings, context))
    return outputs, {"outputs": [str(o.path) for o in outputs], "series_uid": series_uid}


def execute_job(settings: Settings, job_id: int) -> str:
    """Claim and run one job to its final state; returns that state (or 'skipped')."""
    claim = lifecycle.claim_job(settings, job_id)
    if claim is None:
        return "skipped"
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
    log.info("job %s started (%s, attempt %d/%d)", job_id, job.analysis, claim.attempt, job.max_attempts)
    try:
        with lifecycle.Heartbeat(settings, claim):
            inputs = job_inputs(settings, job)
            if job.analysis in DIAGNOSTIC_ANALYSES:
                outputs, summary = [], run_diagnostic(job, inputs, claim.attempt)
            else:
                outputs, summary = run_model_job(settings, job, inputs)
    except SoftTimeLimitExceeded:
        lifecycle.mark_time_limit_exceeded(settings, job_id, job.soft_time_limit_s, soft=True)
        return FAILED
    except NotApplicable as err:
        lifecycle.not_applicable(settings, claim, str(err))
        log.info("job %s not applicable: %s", job_id, err)
        return INAPPLICABLE
    except Exception as err:  # noqa: BLE001 - sorted into permanent and transient below
        return record_error(settings, job, claim, err)
    return deliver_results(settings, job, claim, outputs, summary)


def record_error(settings: Settings, job: Job, claim: lifecycle.Claim, err: BaseException) -> str:
    """Fail the job once for a permanent error; retry a transient one while attempts remain."""
    reason = error_reason(err)
    if not is_transient(err):
        log.error("job %s failed: %s", job.id, reason, exc_info=not isinstance(err, (AnalysisError, PermanentJobError)))
        lifecycle.fail_job(settings, claim, reason)
        return FAILED
    state = lifecycle.retry_or_bury(settings, claim, reason, job.max_attempts)
    if state == RETRYING:
        log.warning("job %s attempt %d failed (%s); retrying", job.id, claim.attempt, type(err).__name__)
        publish_job(settings, job.id, countdown=min(300, 2**claim.attempt))
    else:
        log.error("job %s dead after %d attempts: %s", job.id, claim.attempt, reason)
    return state


def deliver_results(
    settings: Settings, job: Job, claim: lifecycle.Claim, outputs: list[ResultObject], summary: dict[str, Any]
) -> str:
    """Mark the job succeeded and put its results in the outbox, in one transaction; then publish
    the deliveries (the dispatcher's own pass sends them if publishing fails)."""
    with database_session(settings.database.url) as session:
        if not lifecycle.succeed_job(session, claim, summary):
            log.warning("job %s finished but was taken over meanwhile; result not recorded twice", job.id)
            return "skipped"
        delivery_ids = []
        if outputs and job.destination_names():
            delivery_ids = enqueue_results(session, job.id, outputs, job.destination_names(), settings=settings)
    log.info("job %s succeeded (%d result objects)", job.id, len(outputs))
    for delivery_id in delivery_ids:
        publish_delivery(settings, delivery_id)
    return SUCCEEDED


# --- Celery tasks ----------------------------------------------------------------------------


class JobRequest(Request):
    """Marks the job failed when Celery's hard time limit kills the process running it."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft and self.name == "ainode.run_analysis":
            try:
                lifecycle.mark_time_limit_exceeded(current_settings(), int(self.args[0]), timeout, soft=False)
            except Exception:  # noqa: BLE001 - the reconciler will still see the job without heartbeat
                log.exception("could not record the hard time limit of task %s", self.id)


@app.task(name="ainode.run_analysis", bind=True, Request=JobRequest, acks_late=True, reject_on_worker_lost=True)
def run_analysis(self: Any, job_id: int) -> str:
    """Run the job with this id (the message carries nothing else)."""
    return execute_job(current_settings(), int(job_id))


@app.task(name="ainode.deliver", acks_late=True, reject_on_worker_lost=True)
def deliver(delivery_id: int) -> Any:
    """Send one result delivery (the dispatcher's outbox row decides what and where)."""
    return dispatch(int(delivery_id), current_settings())


# --- embedded worker child -------------------------------------------------------------------


def _embedded_main(argv: list[str]) -> int:
    """Run one job in this process (started by the node's embedded worker), with a soft time limit."""
    settings = use_settings(Settings.model_validate_json(os.environ["AINODE_SETTINGS_JSON"]))
    job_id = int(argv[0])
    with database_session(settings.database.url) as session:
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
