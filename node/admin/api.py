"""The admin API, the dashboard and /metrics (FastAPI, run by uvicorn inside `ainode serve`).

Reads: studies (pipeline phase, per-stage timings, rules matched), jobs, deliveries, peers,
destinations, workers, configuration (secrets masked), an overview for the dashboard, key-slice
PNGs. Actions: re-run a job, retry a dead or failed job, re-send a study's results, C-ECHO a
destination, reload the configuration (validated first).

Access (``node/admin/access.py``): the Host header must name this node (DNS rebinding); every
``/api`` call except ``/api/health`` needs a login (a user of ``api.users`` by HTTP Basic, the
token as a bearer token, or the dashboard's session cookie); only administrators change things;
changes made with the cookie must pass the cross-site check. Every change, every refused change
and every refused login is written to the audit trail. With ``api.tls`` the server speaks HTTPS
only.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from node.admin import (
    routes_config,
    routes_deliveries,
    routes_jobs,
    routes_studies,
    routes_system,
    routes_workitems,
)
from node.admin.access import Access, HostCheck, allowed_host_names, token_path
from node.admin.routes_system import DASHBOARD
from node.admin.transfers import TransferAuditor
from node.core import audit
from node.core.db import engine_for
from node.core.errors import describe_error
from node.core.metrics import API_REQUESTS, record_gpu
from node.core.settings import Settings
from node.ingest.policy import server_tls_context

log = logging.getLogger("ainode.api")

__all__ = [
    "Access",
    "AnalysesProvider",
    "TransferAuditor",
    "api_tls_context",
    "create_app",
    "periodic_tasks",
    "start_services",
]

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
    access = Access.from_settings(settings)
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
    app.include_router(routes_workitems.router(settings, access, engine))
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


def api_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The API's HTTPS context from ``api.tls`` (None for plain HTTP); raises ValueError naming
    the setting and the file when a certificate or key cannot be read or used."""
    tls = settings.api.tls
    if not tls.enabled:
        return None
    for name in ("certificate", "private_key", "ca_certificates"):
        path = getattr(tls, name)
        try:
            if path is not None:
                with open(path, "rb") as f:
                    f.read(1)
        except OSError as err:
            raise ValueError(f"api.tls.{name}: cannot read {path}: {err.strerror or describe_error(err)}") from None
    try:
        return server_tls_context(tls)
    except (OSError, ssl.SSLError) as err:
        files = f"certificate {tls.certificate} with private_key {tls.private_key}"
        if tls.ca_certificates:
            files += f" and ca_certificates {tls.ca_certificates}"
        raise ValueError(f"api.tls: cannot use {files}: {describe_error(err)}") from None


class _TLSConfig(uvicorn.Config):
    """uvicorn's configuration with the node's own TLS context (TLS 1.2 or newer, client
    certificates when configured): the same rules as the DICOM listener's."""

    def __init__(self, app: Any, context: ssl.SSLContext | None, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._context = context

    def load(self) -> None:
        super().load()
        if self._context is not None:
            self.ssl = self._context


def _start_uvicorn(settings: Settings, analyses: AnalysesProvider | None) -> Callable[[], None]:
    try:
        app = create_app(settings, analyses)
    except (OSError, ValueError) as err:
        log.error("admin API not started: its token file cannot be written or read (%s)", err)
        return lambda: None
    config = _TLSConfig(
        app,
        api_tls_context(settings),
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
        "admin API and dashboard on %s://%s:%d/ (token %s, %d user(s))",
        "https" if settings.api.tls.enabled else "http",
        settings.api.host,
        settings.api.port,
        "from api.token" if settings.api.token else f"in {token_path(settings)}",
        len(settings.api.users),
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
