"""Routes of studies: the list, one study with its key slices, the key-slice images, and on-demand
analyses (retrieved from a source first when the node does not hold the study)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from node.admin.access import Access
from node.admin.keyslice import NoImages, key_slices, render_png, study_overlay
from node.admin.views import study_view, study_views
from node.core import audit
from node.core.db import session_scope
from node.core.errors import describe_error
from node.core.settings import Settings
from node.index import Study
from node.jobs.table import Job
from node.workflow import ondemand

log = logging.getLogger("ainode.api")


def _key_slices(settings: Settings, study_uid: str) -> list[int]:
    try:
        return key_slices(study_overlay(settings, study_uid))
    except NoImages:
        return []
    except Exception as err:  # noqa: BLE001 - an unreadable object must not break the study page
        log.warning("key slices of a study could not be computed: %s", describe_error(err))
        return []


class AnalysisOrder(BaseModel):
    """An on-demand analysis: which analysis, where the study is (when the node lacks it), and
    where the results go (default: the destinations of the rules running this analysis)."""

    model_config = {"extra": "forbid"}

    analysis: str = Field(min_length=1)
    source: str | None = None
    destinations: list[str] | None = None
    priority: Literal["stat", "routine", "low"] = "stat"
    params: dict[str, Any] = Field(default_factory=dict)
    # Earlier studies of the patient (same modality) to retrieve from the source as extra inputs.
    priors: int = Field(default=0, ge=0, le=5)


def _request_view(engine: Any, request: ondemand.AnalysisRequest) -> dict[str, Any]:
    """A request with its job's state as the database has it now."""
    view = request.view()
    if request.job_id is not None:
        with session_scope(engine) as s:
            job = s.get(Job, request.job_id)
            if job is not None:
                view["job_state"], view["job_error"] = job.state, job.error or ""
    return view


def _patient_of(study: Study) -> audit.PatientIdentity | None:
    patient = study.patient
    return audit.patient_identity(patient.patient_id, patient.name, patient.issuer) if patient is not None else None


def router(settings: Settings, access: Access, engine: Any) -> APIRouter:
    """``/api/studies``, ``/api/studies/{uid}``, ``/api/studies/{uid}/slices/{k}.png``,
    ``/api/studies/{uid}/analyses`` and ``/api/analysis-requests/{id}``."""
    api = APIRouter()
    reader, writer = Depends(access.read), Depends(access.write)

    @api.get("/api/studies")
    def studies(
        request: Request, limit: int = 50, phase: str | None = None, user: str = reader
    ) -> list[dict[str, Any]]:
        """The most recent studies with phase, timings and rules matched."""
        access.audit_query(user, access.client(request), f"studies limit={limit} phase={phase or ''}")
        with session_scope(engine) as s:
            rows = s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(max(1, min(limit, 500))))
            out = study_views(s, list(rows))
        return [v for v in out if phase is None or v["phase"] == phase]

    @api.get("/api/studies/{study_uid}")
    def study(request: Request, study_uid: str, user: str = reader) -> dict[str, Any]:
        """One study with its series, jobs and deliveries; key slices for the study page."""
        with session_scope(engine) as s:
            st = s.scalar(select(Study).where(Study.study_uid == study_uid))
            if st is None:
                raise HTTPException(404, "no such study")
            view = study_view(s, st, detail=True)
            patient = _patient_of(st)
        access.audit_access(user, access.client(request), study_uid, patient)
        view["key_slices"] = _key_slices(settings, study_uid)
        return view

    @api.get("/api/studies/{study_uid}/slices/{k}.png")
    def slice_png(request: Request, study_uid: str, k: int, user: str = reader) -> Response:
        """Slice k of the study's largest series with segment outlines and lesion boxes."""
        with session_scope(engine) as s:
            st = s.scalar(select(Study).where(Study.study_uid == study_uid))
            patient = _patient_of(st) if st is not None else None
        if st is not None:
            access.audit_access(user, access.client(request), study_uid, patient)
        try:
            return Response(render_png(study_overlay(settings, study_uid), k), media_type="image/png")
        except NoImages as err:
            raise HTTPException(404, str(err)) from None
        except IndexError as err:
            raise HTTPException(404, str(err)) from None

    @api.post("/api/studies/{study_uid}/analyses", status_code=202)
    def order_analysis(study_uid: str, order: AnalysisOrder, request: Request, user: str = writer) -> dict[str, Any]:
        """Run one analysis of a study now: retrieved from ``source`` first (only what the node
        lacks), then queued as a job. Answers at once; GET /api/analysis-requests/{id} follows it."""
        try:
            started = ondemand.start_request(
                settings,
                study_uid,
                order.analysis,
                order.source,
                order.destinations,
                order.priority,
                order.params,
                order.priors,
            )
        except ondemand.RequestError as err:
            raise HTTPException(400, str(err)) from None
        where = f" from {order.source}" if order.source else ""
        access.audit_action(request, user, f"on-demand {order.analysis}{where} (request {started.id})", [study_uid])
        return _request_view(engine, started)

    @api.get("/api/studies/{study_uid}/analyses")
    def study_requests(study_uid: str, user: str = reader) -> list[dict[str, Any]]:
        """The on-demand requests for a study made since the node started, newest first."""
        return [_request_view(engine, r) for r in ondemand.requests_for(study_uid)]

    @api.get("/api/analysis-requests/{request_id}")
    def analysis_request(request_id: int, user: str = reader) -> dict[str, Any]:
        """One on-demand request: its retrieval's progress and counts, its job, its error."""
        found = ondemand.get_request(request_id)
        if found is None:
            raise HTTPException(404, "no such request (requests are forgotten when the node restarts)")
        return _request_view(engine, found)

    return api
