"""Worker tasks: ``run_analysis(job_id)`` on the gpu queue and ``deliver(delivery_id)`` on the cpu queue.

A job runs as lifecycle → analysis → results → outbox: the task claims its job row
(``node.jobs.lifecycle``; a second copy of a message finds it running or done and exits), keeps
its heartbeat while it loads the inputs and runs the analysis (``workers.analysis``), writes the
DICOM results (``workers.results``, output UIDs derived from the job key and inputs, so a re-run
rewrites the same objects) and records them in the dispatcher's outbox in the transaction that
marks the job succeeded.

A job analyses every series of its inputs (a study-level job: the series its rule selected), and
every group of images within a series (``imaging.load_groups``: an echo, a phase, a localizer),
that the analysis accepts; each gets its own results. A group the analysis does not accept is
skipped with its reason in the job's summary; when no group is accepted the job ends "not
applicable" with those reasons. A group whose analysis or writing fails permanently is recorded
in the summary and the others' results are still delivered (the job succeeds); only when every
accepted group failed does the job fail, with each group's reason. A transient error fails the
whole attempt, which runs again: output UIDs are deterministic, so nothing is sent twice.

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

import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from node.core.db import database_session
from node.core.errors import describe_error, log_traceback, redact
from node.core.logs import configure_logging
from node.core.settings import CapabilityProfile, Settings, current_settings, use_settings
from node.dispatch.kinds import REJECTION, ResultObject
from node.dispatch.outbox import deliver as dispatch
from node.dispatch.outbox import destination_wants, enqueue_results, superseded_deliveries
from node.dispatch.report import ReportContext
from node.dispatch.table import Delivery
from node.jobs import lifecycle
from node.jobs.broker import app, publish_delivery, publish_job
from node.jobs.inputs import InputInstance, job_inputs
from node.jobs.table import FAILED, INAPPLICABLE, RETRYING, SUCCEEDED, Job
from workers.analysis.contract import NotApplicable
from workers.analysis.findings import Findings, Volume
from workers.analysis.imaging import SeriesError, load_groups
from workers.analysis.registry import AnalysisError
from workers.analysis.registry import run_analysis as run_registered
from workers.results import ResultContext, check_writable, write_results
from workers.results.context import order_overrides
from workers.results.notice import write_not_applicable_sr
from workers.results.rejection import write_rejection_note

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


def error_reason(err: BaseException, job: Job | None = None, inputs: Sequence[InputInstance] = ()) -> str:
    """The job's error text, never empty, that a hospital can act on: our own refusals as written,
    others with their class; stored file names replaced by the SOP Instance UIDs they hold, a
    missing attribute named as such, and (for a permanent error) the study and series named when no
    instance is.
    Quoted values that could be patient data are redacted (``core.errors``)."""
    if isinstance(err, (AnalysisError, PermanentJobError)):
        text = redact(str(err).strip()) or "(no message)"
    else:
        text = describe_error(err, limit=2000)
    missing = _MISSING_ATTRIBUTE.search(str(err)) if isinstance(err, AttributeError) else None
    if missing:
        text = f"attribute {missing.group(1)} missing ({text})"
    text = name_instances(text, inputs)
    # A permanent error is about the input: say which (a transient one is about the machine).
    if job is not None and job.study_uid and "SOP Instance UID" not in text and not is_transient(err):
        where = f"study {job.study_uid}" + (f", series {job.series_uid}" if job.series_uid else "")
        text = f"{where}: {text}"
    return text[:2000]


_MISSING_ATTRIBUTE = re.compile(r"has no attribute '([A-Za-z0-9_]+)'")


def name_instances(text: str, inputs: Sequence[InputInstance]) -> str:
    """``text`` with each input's stored path (or file name, a hash) replaced by its SOP Instance UID."""
    for item in inputs:
        for shown in (str(item.path), item.path.name):
            if shown and shown in text:
                text = text.replace(shown, f"SOP Instance UID {item.sop_instance_uid}")
    return text


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
    """The real path: every series (and group of images) of the inputs the analysis accepts is
    loaded, analysed and written as DICOM results; see the module's docstring for the outcomes."""
    if not inputs:
        raise PermanentJobError("the job's input instances are no longer in the index")
    missing = [i.path for i in inputs if not i.path.exists()]
    if missing:
        raise PermanentJobError(f"{len(missing)} input file(s) missing from storage")
    by_series: dict[str, list[Path]] = {}
    for item in inputs:
        by_series.setdefault(item.series_uid, []).append(item.path)
    context = ResultContext(
        # Output UIDs follow from the key and the inputs' content (the fingerprint hashes each
        # instance's bytes): a re-run on the same data rewrites the same objects, while a
        # corrected re-send (same UIDs, new demographics) makes new objects, as DICOM asks of
        # changed content.
        job_key=f"{job.key}@{job.input_fingerprint}" if job.input_fingerprint else job.key,
        output_dir=Path(settings.storage.path) / "results" / f"job-{job.id}",
        destinations=[
            settings.destination(n).capabilities
            for n in job.destination_names()
            if any(d.name == n for d in settings.destinations)
        ]
        or [CapabilityProfile()],
        # A workitem's order (Accession Number, Requested Procedure) wins over the images'.
        **order_overrides(job.params_dict()),  # type: ignore[arg-type]
    )
    outputs: list[ResultObject] = []
    analysed: list[dict[str, Any]] = []
    inapplicable: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for series_uid, members in by_series.items():
        started = time.perf_counter()
        try:
            groups = load_groups(members)
        except SeriesError as err:
            failed.append({"series_uid": series_uid, "error": str(err)[:500]})
            continue
        load_s = time.perf_counter() - started
        for volume in groups:
            where = {"series_uid": series_uid, "group": volume.label} if volume.label else {"series_uid": series_uid}
            try:
                written, findings = analyse_group(settings, job, volume, context)
            except NotApplicable as err:
                inapplicable.append({**where, "reason": str(err)[:500]})
                continue
            except Exception as err:  # noqa: BLE001 - transient ones end the attempt; permanent ones this group
                if is_transient(err):
                    raise
                log.warning("job %s: %s failed: %s", job.id, _named(where), error_reason(err))
                failed.append({**where, "error": error_reason(err)[:500]})
                continue
            outputs += written
            analysed.append(
                {
                    **where,
                    "kind": volume.kind,
                    # "streamed" (the series' volume decoded at ingest) or "files: <why not>".
                    "pixels": volume.pixels_from,
                    "outputs": len(written),
                    **findings_summary(findings, load_s=load_s),
                }
            )
            load_s = 0.0  # the series was loaded once, for all its groups: counted with the first
    summary: dict[str, Any] = {
        "outputs": [str(o.path) for o in outputs],
        "series": analysed,
        **merged_findings(analysed),
    }
    if inapplicable:
        summary["not_applicable"] = inapplicable
    if failed:
        summary["failed"] = failed
    if not analysed and failed:
        raise PermanentJobError("; ".join(f"{_named(f)}: {f['error']}" for f in failed))
    if not analysed:
        raise NotApplicable("; ".join(f"{_named(f)}: {f['reason']}" for f in inapplicable))
    if inapplicable or failed:
        log.info(
            "job %s: %d group(s) analysed, %d not applicable, %d failed",
            job.id,
            len(analysed),
            len(inapplicable),
            len(failed),
        )
    return outputs, summary


def analyse_group(
    settings: Settings, job: Job, volume: Volume, context: ResultContext
) -> tuple[list[ResultObject], Findings]:
    """One series (or group of its images): the analysis (which checks it accepts the images
    first) and its DICOM results. Output UIDs follow from the job key and this group's inputs."""
    # IHE AIR: the results' Content Date/Time and Contribution DateTime are the analysis' start.
    context = dataclasses.replace(context, analysis_started=datetime.datetime.now())
    findings = run_registered(
        job.analysis,
        volume,
        job.params_dict(),
        settings=settings,
        # After the intended-use check (not applicable comes first), before inference.
        before_inference=lambda analysis, images: check_writable(images, analysis.task),
    )
    started = time.perf_counter()
    written = list(write_results(findings, context))
    findings.timings_s["write"] = time.perf_counter() - started
    return written, findings


def _named(where: dict[str, Any]) -> str:
    group = f" ({where['group']})" if where.get("group") else ""
    return f"series {where['series_uid']}{group}"


def findings_summary(findings: Findings, load_s: float | None = None) -> dict[str, Any]:
    """What the job record shows of the findings (the dashboard's study page): the model version,
    each classification's probability and each measurement's value, and how many detections and
    segments there are; with ``load_s``, the seconds the series took to load. No patient data:
    codes' meanings and numbers only."""
    return {
        "algorithm_version": findings.algorithm_version,
        "classifications": [
            {"label": c.label, "finding": c.finding[2], "probability": float(c.probability), "present": c.present}
            for c in findings.classifications
        ],
        "measurements": [
            {"name": m.name[2], "value": float(m.value), "unit": m.unit[0], "label": m.segment_label or ""}
            for m in findings.measurements
        ],
        "detections": len(findings.detections),
        "segments": len(findings.segments),
        # The job's stages as the worker ran them (load, the analysis's load_model, preprocess,
        # inference, postprocess, then write): the time-to-result benches split the job's run.
        "timings_s": {
            stage: round(seconds, 4)
            for stage, seconds in (({"load": load_s} if load_s is not None else {}) | findings.timings_s).items()
        },
    }


def merged_findings(analysed: list[dict[str, Any]]) -> dict[str, Any]:
    """The findings of every analysed series together (the study page lists them all)."""
    if not analysed:
        return {}
    return {
        "algorithm_version": analysed[0]["algorithm_version"],
        "classifications": [c for a in analysed for c in a["classifications"]],
        "measurements": [m for a in analysed for m in a["measurements"]],
        "detections": sum(a["detections"] for a in analysed),
        "segments": sum(a["segments"] for a in analysed),
    }


class JobCollections:
    """Python's cyclic garbage collector kept off the path from a study to its results.

    A worker holds about 700,000 objects that outlive every job (torch, MONAI, the loaded
    models); a full collection walks all of them, about 0.3 s of one core on the 2-core machine,
    and starts whenever the allocation counters say so: measured inside the SEG's build, the KOS's
    or the inference, by chance, on a 300 x 512² CT's path to its result. So the collector is
    paused while a job runs (reference counting still frees everything without cycles; the SEG's
    child process, ``workers.results.aside``, inherits the pause) and collects when it ends.
    What survived a job is moved out of the collector's view (``gc.freeze``), so the collection
    after a job (before the worker turns to the job's deliveries) walks what that job made, not
    the worker's long-lived objects. Every ``full_every`` jobs the frozen objects are collected too,
    so cycles among them that became garbage (a model reloaded, a connection replaced) are freed.
    """

    def __init__(self, full_every: int = 100):
        self.full_every = full_every
        self.until_full = 0  # the first job ends with a full collection (its models just loaded)

    @contextmanager
    def after_job(self) -> Iterator[None]:
        """The collector paused for the job inside, then one collection."""
        if not gc.isenabled():  # nested, or the operator's choice: leave it as it is
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
            self.collect()

    def collect(self) -> None:
        """The collection after a job: of its own objects, or every ``full_every`` jobs all."""
        if self.until_full <= 0:
            gc.unfreeze()
            gc.collect()
            self.until_full = self.full_every
        else:
            gc.collect()
            self.until_full -= 1
        gc.freeze()


_collections = JobCollections()


def collection_after_job() -> contextlib.AbstractContextManager[None]:
    """The worker's garbage collection around one job (see ``JobCollections``)."""
    return _collections.after_job()


def execute_job(settings: Settings, job_id: int) -> str:
    """Claim and run one job to its final state; returns that state (or 'skipped').

    The cyclic garbage collector waits until the job's results are recorded
    (``collection_after_job``)."""
    with collection_after_job():
        return _execute_job(settings, job_id)


def _execute_job(settings: Settings, job_id: int) -> str:
    claim = lifecycle.claim_job(settings, job_id)
    if claim is None:
        return "skipped"
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
    log.info("job %s started (%s, attempt %d/%d)", job_id, job.analysis, claim.attempt, job.max_attempts)
    inputs: list[InputInstance] = []
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
        return refuse_job(settings, job, claim, str(err), inputs)
    except Exception as err:  # noqa: BLE001 - sorted into permanent and transient below
        return record_error(settings, job, claim, err, inputs)
    return deliver_results(settings, job, claim, outputs, summary)


def notice_destinations(settings: Settings, job: Job) -> list[str]:
    """The job's DICOM and DICOMweb destinations that asked to be told of a refusal."""
    wanted = {d.name for d in settings.destinations if d.notify_not_applicable and d.type in ("dicom", "dicomweb")}
    return [name for name in job.destination_names() if name in wanted]


def refuse_job(
    settings: Settings, job: Job, claim: lifecycle.Claim, reason: str, inputs: Sequence[InputInstance]
) -> str:
    """Record the job not applicable (never retried). Destinations that asked for it also get a
    short SR saying the study was not analysed and why: the file is written first, then the
    outcome and its outbox rows go in one transaction."""
    names = notice_destinations(settings, job)
    sources = [i.path for i in inputs if i.path.exists()]
    notice = None
    if names and sources:
        context = ResultContext(
            job_key=f"{job.key}@{job.input_fingerprint}" if job.input_fingerprint else job.key,
            output_dir=Path(settings.storage.path) / "results" / f"job-{job.id}",
        )
        try:
            notice = write_not_applicable_sr(sources, job.analysis, reason, context)
        except Exception as err:  # noqa: BLE001 - the refusal stands without its note
            log_traceback(log, f"job {job.id}: the not-applicable SR could not be written", err)
    delivery_ids: list[int] = []
    with database_session(settings.database.url) as session:
        if not lifecycle.record_not_applicable(session, claim, reason):
            log.warning("job %s refused but was taken over meanwhile; outcome not recorded twice", job.id)
            return "skipped"
        if notice is not None:
            delivery_ids = enqueue_results(session, job.id, [notice], names)
    log.info("job %s not applicable: %s", job.id, reason)
    for delivery_id in delivery_ids:
        publish_delivery(settings, delivery_id)
    return INAPPLICABLE


def record_error(
    settings: Settings, job: Job, claim: lifecycle.Claim, err: BaseException, inputs: Sequence[InputInstance] = ()
) -> str:
    """Fail the job once for a permanent error; retry a transient one while attempts remain.

    The reason names SOP Instance UIDs, not storage paths (``error_reason``); an unexpected
    error's traceback goes to the log with its message redacted (``core.errors.log_traceback``).
    """
    reason = error_reason(err, job, inputs)
    if not is_transient(err):
        if isinstance(err, (AnalysisError, PermanentJobError)):
            log.error("job %s failed: %s", job.id, reason)
        else:
            log_traceback(log, f"job {job.id} failed: {reason}", err)
        lifecycle.fail_job(settings, claim, reason)
        return FAILED
    state = lifecycle.retry_or_bury(settings, claim, reason, job.max_attempts)
    if state == RETRYING:
        log.warning("job %s attempt %d failed (%s); retrying", job.id, claim.attempt, reason)
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
        if outputs:
            # Before the new results (lower row ids are sent first): what they supersede is withdrawn.
            delivery_ids += reject_superseded(settings, session, job, outputs)
        if outputs and job.destination_names():
            report = ReportContext(job.key, job.analysis, job.rule, correction=job.supersedes_job_id is not None)
            delivery_ids += enqueue_results(
                session, job.id, outputs, job.destination_names(), settings=settings, report=report
            )
    log.info("job %s succeeded (%d result objects)", job.id, len(outputs))
    for delivery_id in delivery_ids:
        publish_delivery(settings, delivery_id)
    return SUCCEEDED


def reject_superseded(settings: Settings, session: Session, job: Job, outputs: Sequence[ResultObject]) -> list[int]:
    """IHE IOCM: send each destination that acknowledged results this re-run supersedes a
    rejection note (``workers.results.rejection``) listing exactly those, in the caller's
    transaction (the note's outbox rows and the rejected rows' mark commit with the new results).

    Superseded: delivered by an earlier job of the same key and not written again by this one
    (same UIDs: same inputs and model, nothing to withdraw). Destinations whose capability
    profile turns ``rejection_notes`` off get none. Destinations with the same superseded
    instances of a study share one note. Returns the notes' outbox row ids.
    """
    if job.supersedes_job_id is None:
        return []
    configured = {d.name: d for d in settings.destinations}
    names = [n for n, d in configured.items() if destination_wants(d, REJECTION)]
    earlier = list(session.scalars(select(Job.id).where(Job.key == job.key, Job.id < job.id)))
    rows = superseded_deliveries(session, earlier, (o.sop_instance_uid for o in outputs), names)
    # (study, rejected UIDs) -> the rows per destination; one note per distinct set.
    by_destination: dict[tuple[str, str], list[Delivery]] = {}
    for row in rows:
        by_destination.setdefault((row.destination, row.study_instance_uid), []).append(row)
    groups: dict[tuple[str, frozenset[str]], list[Delivery]] = {}
    for (_, study), members in by_destination.items():
        groups.setdefault((study, frozenset(r.sop_instance_uid for r in members)), []).extend(members)
    context = ResultContext(
        job_key=f"{job.key}@{job.input_fingerprint}" if job.input_fingerprint else job.key,
        output_dir=Path(settings.storage.path) / "results" / f"job-{job.id}",
    )
    ids: list[int] = []
    for (_, uids), members in groups.items():
        paths = {r.sop_instance_uid: Path(r.path) for r in members}
        missing = [uid for uid, path in paths.items() if not path.exists()]
        if missing:
            # Its series is in the file only: the note cannot name it (never a guess).
            log.warning("job %s: %d superseded result file(s) gone; not in the rejection note", job.id, len(missing))
        present = [path for uid, path in paths.items() if uid not in missing]
        if not present:
            continue
        try:
            note = write_rejection_note(present, context, job.analysis)
        except OSError:
            raise  # storage: the job's outcome is not recorded; the reconciler runs it again
        except Exception as err:  # noqa: BLE001 - the new results still go out without the note
            log_traceback(log, f"job {job.id}: a rejection note could not be written", err)
            continue
        destinations = sorted({r.destination for r in members})
        ids += enqueue_results(session, job.id, [note], destinations, settings=settings)
        for row in members:
            if row.sop_instance_uid not in missing:
                row.rejected_by = note.sop_instance_uid
        log.info(
            "job %s: rejection note for %d superseded result(s) queued to %s",
            job.id,
            len(present),
            ", ".join(destinations),
        )
    return ids


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
    """The node's embedded worker child (``node.jobs.embedded``), which gets its settings as JSON
    on stdin (never the environment, which would expose their secrets).

    ``--serve FD``: run jobs one after another, as long as the node keeps stdin open: the settings
    are the first line, then one job id per line; after each job ``done ID`` is written to file
    descriptor FD. The models the registry loads stay loaded between jobs. ``JOB_ID``: run that
    one job and exit.
    """
    configure_logging()  # before anything can warn: this process's stderr is the node's log
    if argv and argv[0] == "--serve":
        return _serve_jobs(int(argv[1]))
    settings = use_settings(Settings.model_validate_json(sys.stdin.buffer.read()))
    _run_with_soft_limit(settings, int(argv[0]))
    return 0


def _serve_jobs(answer_fd: int) -> int:
    settings = use_settings(Settings.model_validate_json(sys.stdin.buffer.readline()))
    with os.fdopen(answer_fd, "w", buffering=1) as answers:
        for line in sys.stdin:
            if not line.strip():
                continue
            job_id = int(line)
            # An exception ends this process: the node releases the job as crashed and starts
            # a fresh child for the next one, as it did with a child per job.
            _run_with_soft_limit(settings, job_id)
            answers.write(f"done {job_id}\n")
    return 0


def _run_with_soft_limit(settings: Settings, job_id: int) -> None:
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        soft = job.soft_time_limit_s if job else 600

    def on_alarm(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(soft))
    try:
        execute_job(settings, job_id)
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(_embedded_main(sys.argv[1:]))
