"""The admin API, the dashboard and /metrics (FastAPI, run by uvicorn inside `ainode serve`).

Reads: studies (pipeline phase, per-stage timings, rules matched), jobs, deliveries, peers,
destinations, workers, configuration (secrets masked), an overview for the dashboard, key-slice
PNGs. Actions: re-run a job, retry a dead or failed job, re-send a study's results, C-ECHO a
destination, reload the configuration (validated first).

Access (``node/admin/access.py``): the Host header must name this node (DNS rebinding); every
``/api`` call except ``/api/health`` needs the token (``api.token``, else the one generated into
``<storage>/api-token``) as a bearer token or as the dashboard's session cookie; changes made with
the cookie must pass the cross-site check. Every change and every refused token is written to the
audit trail.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from node.admin import routes_config, routes_deliveries, routes_jobs, routes_studies, routes_system
from node.admin.access import Access, HostCheck, allowed_host_names, ensure_api_token, token_path
from node.admin.routes_system import DASHBOARD
from node.admin.transfers import TransferAuditor
from node.core import audit
from node.core.db import engine_for
from node.core.errors import describe_error
from node.core.metrics import API_REQUESTS, record_gpu
from node.core.settings import Settings

log = logging.getLogger("ainode.api")

__all__ = ["Access", "AnalysesProvider", "TransferAuditor", "create_app", "periodic_tasks", "start_services"]

# The analyses installed on this machine, for the workers page: the analysis code belongs to the
# workers, so the composition root (node/service.py) injects the function that lists them.
AnalysesProvider = Callable[[Settings], list[dict[str, Any]]]


def no_analyses(settings: Settings) -> list[dict[str, Any]]:
    """The default provider: no analyses known to the API."""
    return []


def _listed_once(analyses: AnalysesProvider, settings: Settings) -> Callable[[], list[dict[str, Any]]]:
    # Listing the analyses may load their code: done once, on the first call, then remembered.
    cache: list[list[dict[str, Any]]] = []

    def installed() -> list[dict[str, Any]]:
        if not cache:
            try:
                cache.append(list(analyses(settings)))
            except Exception as err:  # noqa: BLE001 - the analysis side may not be installed on this machine
                log.warning("installed analyses unknown: %s", describe_error(err))
                cache.append([])
        return cache[0]

    return installed


def create_app(settings: Settings, analyses: AnalysesProvider | None = None) -> FastAPI:
    """The FastAPI application of one node (API under /api, dashboard at /, metrics at /metrics).

    ``analyses(settings)`` lists the analyses installed on this machine for ``/api/workers``
    (dicts with name, version, weights); without it the list is empty. Without ``api.token`` the
    token is read from, or first generated into, the storage folder.
    """
    # Swagger UI and ReDoc load their scripts from a CDN, which a hospital network does not reach:
    # the OpenAPI document itself is served at /openapi.json.
    app = FastAPI(title="ainode admin API", version="1", description=__doc__, docs_url=None, redoc_url=None)
    access = Access(ensure_api_token(settings))
    engine = engine_for(settings.database.url)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[..., Any]) -> Any:
        response = await call_next(request)
        API_REQUESTS.labels(request.method, str(response.status_code)).inc()
        return response

    app.include_router(routes_system.router(settings, access, engine, _listed_once(analyses or no_analyses, settings)))
    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD), name="dashboard")
    app.include_router(routes_studies.router(settings, access, engine))
    app.include_router(routes_jobs.router(settings, access, engine))
    app.include_router(routes_deliveries.router(settings, access, engine))
    app.include_router(routes_config.router(settings, access, engine))
    # Outermost: a request naming another site is refused before any route or middleware runs.
    app.add_middleware(HostCheck, allowed=allowed_host_names(settings))
    return app


# --- running inside `ainode serve` ---------------------------------------------------------------


def start_services(settings: Settings, analyses: AnalysesProvider | None = None) -> list[Callable[[], None]]:
    """Start the audit trail and the API server (uvicorn in a thread); return their stop functions."""
    trail = audit.configure(settings.audit, settings.node.ae_title)
    audit.application_activity(True, settings.node.ae_title)
    stoppers: list[Callable[[], None]] = []
    if settings.api.enabled:
        stoppers.append(_start_uvicorn(settings, analyses))

    def stop_audit() -> None:
        audit.application_activity(False, settings.node.ae_title)
        trail.close(timeout=2.0)

    stoppers.append(stop_audit)
    return stoppers


def _start_uvicorn(settings: Settings, analyses: AnalysesProvider | None) -> Callable[[], None]:
    try:
        app = create_app(settings, analyses)
    except (OSError, ValueError) as err:
        log.error("admin API not started: its token file cannot be written or read (%s)", err)
        return lambda: None
    config = uvicorn.Config(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign] - the node owns signals
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        log.error(
            "admin API could not listen on %s:%d; the node runs without API, dashboard and /metrics",
            settings.api.host,
            settings.api.port,
        )
        return lambda: None
    log.info(
        "admin API and dashboard on http://%s:%d/ (token %s)",
        settings.api.host,
        settings.api.port,
        "from api.token" if settings.api.token else f"in {token_path(settings)}",
    )

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return stop


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """Audit completed studies and delivered results (DICOM Instances Transferred); sample the GPUs."""
    host = socket.gethostname()
    # The embedded worker runs on this machine: its GPUs' memory and utilisation go to /metrics.
    return [("audit-transfers", 2.0, TransferAuditor(settings)), ("gpu-sample", 15.0, lambda: record_gpu(host))]
