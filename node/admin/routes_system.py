"""Routes of the node itself: dashboard, /metrics, health, overview, workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import select

from node.admin.access import Access, Principal
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
    async def login(request: Request, response: Response) -> dict[str, Any]:
        """Log the dashboard in: a user name and password (JSON ``{"name", "password"}`` or HTTP
        Basic) or the bearer token become an HttpOnly, SameSite=Strict session cookie."""
        form: dict[str, Any] | None = None
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise HTTPException(400, "the body is not JSON") from None
            form = body if isinstance(body, dict) else None
        # scrypt takes a tenth of a second: off the event loop.
        who = await run_in_threadpool(access.login, request, response, form)
        return {"user": who.name, "role": who.role}

    @api.get("/api/session")
    def current_session(who: Principal = Depends(access.whoami)) -> dict[str, Any]:
        """Who is logged in, and with which role (the dashboard hides what a viewer may not do)."""
        return {"user": who.name, "role": who.role}

    @api.delete("/api/session")
    def logout(request: Request, response: Response, who: Principal = Depends(access.whoami)) -> dict[str, Any]:
        """Log the dashboard out (any role): the session ends and its cookie is cleared."""
        access.logout(request, response)
        return {"user": None}

    @api.get("/metrics", include_in_schema=False)
    def metrics(allowed: None = Depends(access.metrics)) -> Response:
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
