"""Routes of the node itself: dashboard, /metrics, health, overview, workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, Request
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
    """``/``, ``/dashboard/``, ``/metrics``, ``/api/health``, ``/api/session``, ``/api/overview``,
    ``/api/workers``."""
    api = APIRouter()
    reader = Depends(access.read)

    @api.get("/", include_in_schema=False)
    def root() -> Any:
        return RedirectResponse("/dashboard/")

    @api.get("/dashboard/", include_in_schema=False)
    def dashboard(request: Request, token: str | None = None) -> Any:
        if token is None:
            return FileResponse(DASHBOARD / "index.html")
        # A login link (`/dashboard/?token=...`, as Jupyter prints): the token becomes a session
        # cookie and leaves the address bar (and the browser history) at once.
        if not access.token_ok(token):
            raise access.refused(request, "invalid token")
        response = RedirectResponse("/dashboard/", status_code=303)
        access.start_session(request, response)
        return response

    @api.post("/api/session")
    def login(request: Request, response: Response) -> dict[str, Any]:
        """Log the dashboard in: the bearer token becomes an HttpOnly, SameSite=Strict session cookie."""
        return {"user": access.login(request, response)}

    @api.delete("/api/session")
    def logout(request: Request, response: Response, user: str = Depends(access.write)) -> dict[str, Any]:
        """Log the dashboard out: the session ends and its cookie is cleared."""
        access.logout(request, response)
        return {"user": None}

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
