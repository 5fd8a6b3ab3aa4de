"""Routes of studies: the list, one study with its key slices, and the key-slice images."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from sqlalchemy import select

from node.admin.access import Access
from node.admin.keyslice import NoImages, key_slices, render_png, study_overlay
from node.admin.views import study_view, study_views
from node.core import audit
from node.core.db import session_scope
from node.core.errors import describe_error
from node.core.settings import Settings
from node.index import Study

log = logging.getLogger("ainode.api")


def _key_slices(settings: Settings, study_uid: str) -> list[int]:
    try:
        return key_slices(study_overlay(settings, study_uid))
    except NoImages:
        return []
    except Exception as err:  # noqa: BLE001 - an unreadable object must not break the study page
        log.warning("key slices of a study could not be computed: %s", describe_error(err))
        return []


def _patient_of(study: Study) -> audit.PatientIdentity | None:
    patient = study.patient
    return audit.patient_identity(patient.patient_id, patient.name, patient.issuer) if patient is not None else None


def router(settings: Settings, access: Access, engine: Any) -> APIRouter:
    """``/api/studies``, ``/api/studies/{uid}``, ``/api/studies/{uid}/slices/{k}.png``."""
    api = APIRouter()
    reader = Depends(access.read)

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

    return api
