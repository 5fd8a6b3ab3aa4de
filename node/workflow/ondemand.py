"""On-demand analysis of a study in the PACS: retrieve what the node lacks, then queue one job.

``ainode run ANALYSIS --study UID --from SOURCE`` and ``POST /api/studies/{uid}/analyses`` both
end here. ``start_request`` answers at once with a request id; a background thread retrieves the
study (``node.workflow.retrieve``), then queues the analysis as the router queues a rule's
(``node.router.create_jobs``: same key scheme, inputs fingerprint, intended-use check), under
the rule name ``on-demand``, with the given destinations or, when none is given, those of the
rules that run this analysis. Requests are kept in this process's memory (``GET
/api/analysis-requests/{id}``): a restart forgets a request, never an instance it retrieved or a
job it queued (those are in the database).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from node.core.clock import utcnow
from node.core.db import engine_for, session_scope
from node.core.errors import describe_error
from node.core.settings import AnalysisRef, Rule, Settings
from node.index import Series, Study
from node.ingest.arrival import instance_tag
from node.jobs.broker import publish_job
from node.jobs.table import PENDING_STATES, Job
from node.router import create_jobs
from node.workflow.retrieve import RetrieveError, RetrieveOutcome, find_prior_studies, retrieve_study

log = logging.getLogger("ainode.ondemand")

ON_DEMAND_RULE = "on-demand"
# A request's states, in order; "failed" may follow any but the last.
QUEUED, RETRIEVING, JOB_QUEUED, FAILED = "queued", "retrieving", "job-queued", "failed"
_KEEP = 1000  # requests remembered (the oldest finished ones are forgotten first)


class RequestError(ValueError):
    """A request that cannot be started (unknown source or destination, nothing to send to)."""


@dataclass
class AnalysisRequest:
    """One on-demand analysis: what was asked, and where it stands."""

    id: int
    study_uid: str
    analysis: str
    source: str | None
    destinations: list[str]
    priority: str = "stat"
    params: dict[str, Any] = field(default_factory=dict)
    # How many earlier studies of the patient (same modality) to retrieve as extra inputs.
    priors: int = 0
    state: str = QUEUED
    retrieval: dict[str, Any] | None = None
    job_id: int | None = None
    job_state: str = ""
    prior_study_uids: list[str] = field(default_factory=list)
    prior_errors: list[str] = field(default_factory=list)
    error: str = ""
    created_at: str = field(default_factory=lambda: utcnow().isoformat())
    finished_at: str | None = None

    def view(self) -> dict[str, Any]:
        """The request for the API (the job's current state read by the caller)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


_requests: dict[int, AnalysisRequest] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def default_destinations(settings: Settings, analysis: str) -> list[str]:
    """The destinations of every rule that runs ``analysis`` (in rule order, once each)."""
    out: list[str] = []
    for rule in settings.rules:
        if any(ref.name == analysis for ref in rule.analyses):
            out += [d for d in rule.destinations if d not in out]
    return out


def check_request(settings: Settings, analysis: str, source: str | None, destinations: list[str] | None) -> list[str]:
    """The destinations to use; RequestError naming what is unknown or missing."""
    if not analysis:
        raise RequestError("name the analysis to run")
    if source is not None:
        try:
            settings.source(source)
        except KeyError:
            known = ", ".join(s.name for s in settings.sources) or "none configured"
            raise RequestError(f"unknown source {source!r} (known: {known})") from None
    chosen = list(destinations) if destinations else default_destinations(settings, analysis)
    names = {d.name for d in settings.destinations}
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise RequestError(
            f"unknown destination(s): {', '.join(unknown)} (known: {', '.join(sorted(names)) or 'none'})"
        )
    if not chosen:
        raise RequestError(f"no rule sends {analysis!r} results anywhere: name the destinations")
    return chosen


def start_request(
    settings: Settings,
    study_uid: str,
    analysis: str,
    source: str | None = None,
    destinations: list[str] | None = None,
    priority: str = "stat",
    params: dict[str, Any] | None = None,
    priors: int = 0,
) -> AnalysisRequest:
    """Check the request and run it on a background thread; the request as it starts."""
    chosen = check_request(settings, analysis, source, destinations)
    if priors and source is None:
        raise RequestError("prior studies are retrieved from a source: name one")
    with _lock:
        request = AnalysisRequest(next(_ids), study_uid, analysis, source, chosen, priority, dict(params or {}), priors)
        _requests[request.id] = request
        _forget_old()
    threading.Thread(target=run_request, args=(settings, request), name=f"on-demand-{request.id}", daemon=True).start()
    return request


def get_request(request_id: int) -> AnalysisRequest | None:
    """A request started in this process (None when unknown or forgotten)."""
    with _lock:
        return _requests.get(request_id)


def requests_for(study_uid: str) -> list[AnalysisRequest]:
    """This process's requests for a study, newest first."""
    with _lock:
        return sorted((r for r in _requests.values() if r.study_uid == study_uid), key=lambda r: -r.id)


def _forget_old() -> None:
    finished = [r.id for r in _requests.values() if r.finished_at is not None]
    for request_id in sorted(finished)[: max(0, len(_requests) - _KEEP)]:
        del _requests[request_id]


def run_request(settings: Settings, request: AnalysisRequest) -> None:
    """Retrieve (when a source is named), then queue the job; the request records each step."""
    try:
        if request.source is not None:
            request.state = RETRIEVING

            def progress(outcome: RetrieveOutcome) -> None:
                request.retrieval = outcome.as_dict()

            outcome = retrieve_study(settings, request.study_uid, request.source, progress=progress)
            request.retrieval = outcome.as_dict()
            if not outcome.ok:
                _fail(request, outcome.error)
                return
        if request.priors and request.source is not None:
            _retrieve_priors(settings, request)
            request.params["prior_study_uids"] = request.prior_study_uids
        request.job_id, request.job_state = queue_analysis(
            settings, request.study_uid, request.analysis, request.destinations, request.priority, request.params
        )
        request.state = JOB_QUEUED
    except RequestError as err:
        _fail(request, str(err))
    except Exception as err:  # noqa: BLE001 - the request must end with a reason, never silently
        _fail(request, describe_error(err))
    finally:
        request.finished_at = request.finished_at or utcnow().isoformat()


def _retrieve_priors(settings: Settings, request: AnalysisRequest) -> None:
    """The most recent earlier studies of the patient (same modality), as extra inputs: their
    UIDs go to the job's parameters (``prior_study_uids``) for analyses that want them. A prior
    that cannot be had is noted, and the analysis runs without it."""
    assert request.source is not None
    try:
        priors = find_prior_studies(settings, request.study_uid, request.source)[: request.priors]
    except RetrieveError as err:
        request.prior_errors.append(str(err))
        return
    for prior in priors:
        outcome = retrieve_study(settings, prior.study_uid, request.source)
        if outcome.ok:
            request.prior_study_uids.append(prior.study_uid)
            held_as_input(settings, prior.study_uid)
        else:
            request.prior_errors.append(outcome.error)


def held_as_input(settings: Settings, study_uid: str) -> None:
    """A prior retrieved as an input is not routed by the rules (nothing runs on it): done."""
    with session_scope(engine_for(settings.database.url)) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is not None and study.state in ("received", "ready"):
            study.state, study.ready_at, study.ready_reason = "done", study.ready_at or utcnow(), "prior study"
            for series in session.scalars(
                select(Series).where(Series.study_pk == study.id, Series.state.in_(("received", "ready")))
            ):
                series.state, series.ready_at = "routed", series.ready_at or utcnow()


def _fail(request: AnalysisRequest, reason: str) -> None:
    request.state, request.error, request.finished_at = FAILED, reason, utcnow().isoformat()
    # The study named by a short hash in the log, as everywhere (the API shows the full reason).
    said = reason.replace(request.study_uid, f"#{instance_tag(request.study_uid)}")
    log.warning("on-demand request %d (%s) failed: %s", request.id, request.analysis, said)


def queue_analysis(
    settings: Settings,
    study_uid: str,
    analysis: str,
    destinations: list[str],
    priority: str = "stat",
    params: dict[str, Any] | None = None,
    rule_name: str = ON_DEMAND_RULE,
) -> tuple[int, str]:
    """Queue ``analysis`` of a study the node holds, as a rule would; (job id, its state).

    Inputs already analysed the same way are not analysed again: the existing job is returned.
    The study counts as routed from here (its job decides when it is done). ``rule_name`` names
    who asked (``on-demand``; ``ups`` for the Task Performer): part of the job's key.
    """
    rule = Rule(
        name=rule_name,
        analyses=[AnalysisRef(name=analysis, params=params or {})],
        destinations=destinations,
        priority=priority,  # type: ignore[arg-type]
    )
    with session_scope(engine_for(settings.database.url)) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise RequestError(f"the node holds no instance of study {study_uid}: name a source to retrieve it from")
        created = create_jobs(session, settings, rule, study)
        key = f"{rule.name}/{analysis}/{rule.level}/{study_uid}"
        job = session.scalars(select(Job).where(Job.key == key).order_by(Job.id.desc()).limit(1)).first()
        if job is None:
            raise RequestError(f"no job could be queued for {analysis!r}")
        _routed_on_demand(session, study, job.state)
        job_id, state = job.id, job.state
    for new in created:
        publish_job(settings, new)
    log.info(
        "on-demand %s of study %s: job %d %s", analysis, instance_tag(study_uid), job_id, "queued" if created else state
    )
    return job_id, state


def _routed_on_demand(session: Any, study: Study, job_state: str) -> None:
    """The study and its series count as routed (done when its job has already ended): the
    assembler's timers and the configured rules leave what was routed on demand alone."""
    now = utcnow()
    pending = session.scalar(select(Job.id).where(Job.study_pk == study.id, Job.state.in_(PENDING_STATES)).limit(1))
    study.state = "routed" if pending is not None else "done"
    study.ready_at = study.ready_at or now
    study.ready_reason = study.ready_reason or ON_DEMAND_RULE
    for series in session.scalars(
        select(Series).where(Series.study_pk == study.id, Series.state.in_(("received", "ready")))
    ):
        series.state, series.ready_at = "routed", series.ready_at or now
