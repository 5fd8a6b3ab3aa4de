"""Routes of jobs: list, one job, retry a dead or failed job, re-run a finished one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy import select

from node.admin.access import Access
from node.admin.views import job_view
from node.core.db import session_scope
from node.core.settings import Settings
from node.jobs import broker, lifecycle
from node.jobs.table import Job


def router(settings: Settings, access: Access, engine: Any) -> APIRouter:
    """``/api/jobs``, ``/api/jobs/{id}``, ``/api/jobs/{id}/retry``, ``/api/jobs/{id}/rerun``."""
    api = APIRouter()
    reader, writer = Depends(access.read), Depends(access.write)

    @api.get("/api/jobs")
    def jobs(state: str | None = None, limit: int = 100, user: str = reader) -> list[dict[str, Any]]:
        """Jobs, newest first (optionally of one state)."""
        with session_scope(engine) as s:
            q = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, 1000)))
            if state:
                q = q.where(Job.state == state)
            return [job_view(j) for j in s.scalars(q)]

    @api.get("/api/jobs/{job_id}")
    def job(job_id: int, user: str = reader) -> dict[str, Any]:
        """One job."""
        with session_scope(engine) as s:
            j = s.get(Job, job_id)
            if j is None:
                raise HTTPException(404, "no such job")
            return job_view(j)

    @api.post("/api/jobs/{job_id}/retry")
    def retry_job(job_id: int, request: Request, user: str = writer) -> dict[str, Any]:
        """Give a dead or failed job a fresh set of attempts."""
        try:
            with session_scope(engine) as s:
                study_uid = lifecycle.retry_job(s, job_id).study_uid
        except lifecycle.JobNotFound:
            raise HTTPException(404, "no such job") from None
        except lifecycle.JobStateConflict as err:
            raise HTTPException(409, str(err)) from None
        broker.publish_job(settings, job_id)
        access.audit_action(request, user, f"retry job {job_id}", [study_uid])
        return {"job_id": job_id, "state": "queued"}

    @api.post("/api/jobs/{job_id}/rerun")
    def rerun_job(job_id: int, request: Request, user: str = writer) -> dict[str, Any]:
        """Run a job's analysis again as a new job that supersedes it."""
        try:
            with session_scope(engine) as s:
                new = lifecycle.rerun_job(s, settings, job_id)
                new_id, study_uid = new.id, new.study_uid
        except lifecycle.JobNotFound:
            raise HTTPException(404, "no such job") from None
        except lifecycle.JobStateConflict as err:
            raise HTTPException(409, str(err)) from None
        broker.publish_job(settings, new_id)
        access.audit_action(request, user, f"re-run job {job_id} as job {new_id}", [study_uid])
        return {"job_id": new_id, "supersedes": job_id, "state": "queued"}

    return api
