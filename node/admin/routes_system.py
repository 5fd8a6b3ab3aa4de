"""Routes of the node itself: dashboard, /metrics, health, overview, workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import select

from node.admin.access import Access
from node.admin.metrics import exposition
from node.admin.views import overview_data, workers_data
from node.core.db import session_scope
from node.core.settings import Settings

DASHBOARD = Path(__file__).resolve().parent / "dashboard"


def router(
    settings: Settings, access: Access, engine: Any, installed_analyses: Callable[[], list[dict[str, Any]]]
) -> APIRouter:
    """``/``, ``/dashboard/``, ``/metrics``, ``/api/health``, ``/api/overview``, ``/api/workers``."""
    api = APIRouter()
    reader = Depends(access.read)

    @api.get("/", include_in_schema=False)
    def root() -> Any:
        return RedirectResponse("/dashboard/")

    @api.get("/dashboard/", include_in_schema=False)
    def dashboard() -> Any:
        return FileResponse(DASHBOARD / "index.html")

    @api.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(exposition(settings.database.url), media_type=CONTENT_TYPE_LATEST)

    @api.get("/api/health")
    def health() -> dict[str, Any]:
        """Liveness: the database answers (no authentication, no data)."""
        with session_scope(engine) as s:
            s.execute(select(1))
        return {"status": "ok"}

    @api.get("/api/overview")
    def overview(user: str = reader) -> dict[str, Any]:
        """What the dashboard's first page shows: phases, queue depth, failures, disk, workers."""
        return overview_data(settings, engine)

    @api.get("/api/workers")
    def workers(user: str = reader) -> dict[str, Any]:
        """Workers seen in the job table, and this machine's GPUs and installed analyses."""
        return workers_data(settings, engine, installed_analyses())

    return api
