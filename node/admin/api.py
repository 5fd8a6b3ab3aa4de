"""The admin API, the dashboard and /metrics (FastAPI, run by uvicorn inside `ainode serve`).

Reads: studies (pipeline phase, per-stage timings, rules matched), jobs, deliveries, peers,
destinations, workers, configuration (secrets masked), an overview for the dashboard, key-slice
PNGs. Actions: re-run a job, retry a dead or failed job, re-send a study's results, C-ECHO a
destination, reload the configuration (validated first).

Access: with ``api.token`` set every ``/api`` call needs ``Authorization: Bearer <token>``; with
no token the API answers loopback clients only and refuses every change (read-only). Every change
and every refused token is written to the audit trail. The jobs and outbox tables belong to other
stages: they are imported lazily and the API degrades to the index when they are absent.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import shutil
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from node.core.clock import aware, utcnow
from node.core import audit
from node.core.db import ChangeGate, engine_for, session_scope
from node.index import Instance, Series, Study

from node.core.settings import ConfigError, Settings, load_settings

log = logging.getLogger("ainode.api")

DASHBOARD = Path(__file__).resolve().parent / "dashboard"
SECRET_KEYS = ("password", "token", "private_key")
QUERY_AUDIT_INTERVAL_S = 300.0
PHASES = ("received", "ready", "queued", "running", "delivered", "done", "unrouted", "failed")


# --- helpers -----------------------------------------------------------------------------------


def _jobs_module() -> Any:
    try:
        import node.jobs.table as jobs

        return jobs if hasattr(jobs, "Job") else None
    except ImportError:
        return None


def _dispatcher_module() -> Any:
    try:
        import node.dispatch.outbox as dispatcher

        return dispatcher if hasattr(dispatcher, "Delivery") else None
    except ImportError:
        return None


def iso(dt: datetime | None) -> str | None:
    """UTC ISO time (SQLite returns naive datetimes; every stored time is UTC)."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(timespec="milliseconds")


def seconds_between(later: datetime | None, earlier: datetime | None) -> float | None:
    """later - earlier in seconds, or None when either is missing."""
    if later is None or earlier is None:
        return None
    later = later.replace(tzinfo=None) if later.tzinfo else later
    earlier = earlier.replace(tzinfo=None) if earlier.tzinfo else earlier
    return round((later - earlier).total_seconds(), 3)


def mask_secrets(value: Any) -> Any:
    """The configuration with passwords, tokens and URL credentials replaced by '***'."""
    if isinstance(value, dict):
        return {k: ("***" if any(s in k for s in SECRET_KEYS) and v else mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return value


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


# --- access control ------------------------------------------------------------------------------


class Access:
    """Decides who may read and who may change, and audits authentication."""

    def __init__(self, settings: Settings):
        self.token = settings.api.token

    def client(self, request: Request) -> str:
        return request.client.host if request.client else ""

    def _token_ok(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def read(self, request: Request) -> str:
        """Dependency for reads: returns the user name recorded in audits."""
        address = self.client(request)
        if self.token:
            if not self._token_ok(request):
                audit.user_authentication(user="api-client", address=address, success=False)
                raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
            return "api-token"
        if not _is_loopback(address):
            raise HTTPException(403, "without api.token the API answers only on the local machine")
        return "local"

    def write(self, request: Request) -> str:
        """Dependency for changes: a token must be configured and presented."""
        if not self.token:
            raise HTTPException(403, "the API is read-only until api.token is configured")
        return self.read(request)


# --- study pipeline view -----------------------------------------------------------------------


def study_phase(study: Study, jobs: list[Any], deliveries: list[Any]) -> str:
    """Where a study stands: received → ready → queued → running → delivered (or failed/unrouted/done)."""
    if study.state == "received":
        return "received"
    if study.state == "unrouted":
        return "unrouted"
    states = {j.state for j in jobs}
    if states & {"dead", "failed"} or any(d.state == "failed" for d in deliveries):
        return "failed"
    if "running" in states:
        return "running"
    if states & {"queued", "retrying"}:
        return "queued"
    if deliveries:
        return "delivered" if all(d.state in ("delivered", "skipped") for d in deliveries) else "running"
    if jobs:
        return "done"
    return "ready"


def _study_jobs(session: Session, study_uid: str) -> list[Any]:
    jobs = _jobs_module()
    if jobs is None:
        return []
    return list(session.scalars(select(jobs.Job).where(jobs.Job.study_uid == study_uid).order_by(jobs.Job.id)))


def _study_deliveries(session: Session, study_uid: str) -> list[Any]:
    dispatcher = _dispatcher_module()
    if dispatcher is None:
        return []
    return list(session.scalars(select(dispatcher.Delivery)
                                .where(dispatcher.Delivery.study_instance_uid == study_uid)
                                .order_by(dispatcher.Delivery.id)))


def stage_timings(study: Study, jobs: list[Any], deliveries: list[Any]) -> dict[str, float | None]:
    """Seconds spent in each stage, from the timestamps the stages record."""
    created = min((j.created_at for j in jobs), default=None)
    started = min((j.started_at for j in jobs if j.started_at), default=None)
    finished = max((j.finished_at for j in jobs if j.finished_at), default=None)
    delivered = max((d.delivered_at for d in deliveries if d.delivered_at), default=None)
    return {
        "receiving": seconds_between(study.last_received_at, study.first_received_at),
        "completion": seconds_between(study.ready_at, study.last_received_at),
        "routing": seconds_between(created, study.ready_at),
        "queue_wait": seconds_between(started, created),
        "analysis": seconds_between(finished, started),
        "delivery": seconds_between(delivered, finished),
        "total": seconds_between(delivered or finished, study.first_received_at),
    }


def job_view(job: Any) -> dict[str, Any]:
    """A job as the API shows it (no patient data)."""
    result: dict[str, Any] = {}
    try:
        result = json.loads(job.result or "{}")
    except ValueError:
        pass
    return {
        "id": job.id, "study_uid": job.study_uid, "series_uid": job.series_uid, "rule": job.rule,
        "analysis": job.analysis, "priority": job.priority, "state": job.state, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "worker": job.worker, "error": job.error,
        "model_version": result.get("algorithm_version") or result.get("model_version") or "",
        "outputs": len(result.get("outputs", [])) if isinstance(result.get("outputs"), list) else 0,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at), "supersedes_job_id": job.supersedes_job_id,
    }


def delivery_view(row: Any) -> dict[str, Any]:
    """A delivery (outbox row) as the API shows it."""
    return {
        "id": row.id, "job_id": row.job_id, "destination": row.destination, "kind": row.kind,
        "sop_instance_uid": row.sop_instance_uid, "study_uid": row.study_instance_uid, "state": row.state,
        "attempts": row.attempts, "retries": max(0, row.attempts - 1), "last_status": row.last_status,
        "reason": row.reason, "created_at": iso(row.created_at), "delivered_at": iso(row.delivered_at),
        "next_attempt_at": iso(row.next_attempt_at), "commitment": row.commitment,
    }


def study_views(session: Session, studies: list[Study]) -> list[dict[str, Any]]:
    """Views of many studies with three queries in all (the dashboard polls this every few seconds)."""
    uids = [st.study_uid for st in studies]
    jobs: dict[str, list[Any]] = {u: [] for u in uids}
    deliveries: dict[str, list[Any]] = {u: [] for u in uids}
    modalities: dict[int, set[str]] = {st.id: set() for st in studies}
    for chunk in range(0, len(uids), 500):  # bounded IN lists
        part = uids[chunk:chunk + 500]
        if (mod := _jobs_module()) is not None:
            for j in session.scalars(select(mod.Job).where(mod.Job.study_uid.in_(part)).order_by(mod.Job.id)):
                jobs[j.study_uid].append(j)
        if (mod := _dispatcher_module()) is not None:
            for d in session.scalars(select(mod.Delivery).where(mod.Delivery.study_instance_uid.in_(part))):
                deliveries[d.study_instance_uid].append(d)
    ids = list(modalities)
    for chunk in range(0, len(ids), 500):
        for pk, modality in session.execute(select(Series.study_pk, Series.modality)
                                            .where(Series.study_pk.in_(ids[chunk:chunk + 500]))):
            if modality:
                modalities[pk].add(modality)
    return [_study_view(st, jobs[st.study_uid], deliveries[st.study_uid], sorted(modalities[st.id])) for st in studies]


def study_view(session: Session, study: Study, detail: bool = False) -> dict[str, Any]:
    """A study with its phase, timings and rules matched (no patient names or IDs)."""
    jobs = _study_jobs(session, study.study_uid)
    deliveries = _study_deliveries(session, study.study_uid)
    modalities = sorted({m for (m,) in session.execute(select(Series.modality).where(Series.study_pk == study.id)) if m})
    view = _study_view(study, jobs, deliveries, modalities)
    if detail:
        view["jobs"] = [job_view(j) for j in jobs]
        view["deliveries"] = [delivery_view(d) for d in deliveries]
        view["series"] = [{"series_uid": s.series_uid, "modality": s.modality, "description": s.description,
                           "instances": s.instance_count, "state": s.state}
                          for s in session.scalars(select(Series).where(Series.study_pk == study.id))]
    return view


def _study_view(study: Study, jobs: list[Any], deliveries: list[Any], modalities: list[str]) -> dict[str, Any]:
    view = {
        "study_uid": study.study_uid, "description": study.description, "modalities": modalities,
        "instances": study.instance_count, "calling_ae": study.calling_ae, "state": study.state,
        "phase": study_phase(study, jobs, deliveries), "ready_reason": study.ready_reason,
        "first_received_at": iso(study.first_received_at), "last_received_at": iso(study.last_received_at),
        "ready_at": iso(study.ready_at), "timings_s": stage_timings(study, jobs, deliveries),
        "rules_matched": sorted({j.rule for j in jobs if j.rule}),
        "failures": [f"job {j.id} ({j.analysis}): {j.error}" for j in jobs if j.state in ("dead", "failed")]
        + [f"delivery {d.id} to {d.destination}: {d.reason}" for d in deliveries if d.state == "failed"],
    }
    return view


# --- the app ---------------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application of one node (API under /api, dashboard at /, metrics at /metrics)."""
    # Swagger UI and ReDoc load their scripts from a CDN, which a hospital network does not reach:
    # the OpenAPI document itself is served at /openapi.json.
    app = FastAPI(title="ainode admin API", version="1", description=__doc__, docs_url=None, redoc_url=None)
    access = Access(settings)
    engine = engine_for(settings.database.url)
    reader, writer = Depends(access.read), Depends(access.write)

    def session() -> Any:
        return session_scope(engine)

    last_query: dict[tuple[str, str, str], float] = {}

    def query_audit(user: str, address: str, text: str) -> None:
        # The dashboard repeats the same search every few seconds: one Query message per client
        # and search every QUERY_AUDIT_INTERVAL_S keeps the trail readable.
        key, now = (user, address, text), time.monotonic()
        if now - last_query.get(key, -QUERY_AUDIT_INTERVAL_S) >= QUERY_AUDIT_INTERVAL_S:
            last_query[key] = now
            audit.query(user=user, address=address, text=text)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[..., Any]) -> Any:
        from node.core.metrics import API_REQUESTS

        response = await call_next(request)
        API_REQUESTS.labels(request.method, str(response.status_code)).inc()
        return response

    @app.get("/", include_in_schema=False)
    def root() -> Any:
        return RedirectResponse("/dashboard/")

    @app.get("/dashboard/", include_in_schema=False)
    def dashboard() -> Any:
        return FileResponse(DASHBOARD / "index.html")

    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD), name="dashboard")

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from node.core.metrics import exposition

        return Response(exposition(settings.database.url), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """Liveness: the database answers (no authentication, no data)."""
        with session() as s:
            s.execute(select(1))
        return {"status": "ok"}

    @app.get("/api/overview")
    def overview(user: str = reader) -> dict[str, Any]:
        """What the dashboard's first page shows: phases, queue depth, failures, disk, workers."""
        return overview_data(settings, engine)

    @app.get("/api/studies")
    def studies(request: Request, limit: int = 50, phase: str | None = None, user: str = reader) -> list[dict[str, Any]]:
        """The most recent studies with phase, timings and rules matched."""
        query_audit(user, access.client(request), f"studies limit={limit} phase={phase or ''}")
        with session() as s:
            rows = s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(max(1, min(limit, 500))))
            out = study_views(s, list(rows))
        return [v for v in out if phase is None or v["phase"] == phase]

    @app.get("/api/studies/{study_uid}")
    def study(study_uid: str, user: str = reader) -> dict[str, Any]:
        """One study with its series, jobs and deliveries; key slices for the study page."""
        with session() as s:
            st = s.scalar(select(Study).where(Study.study_uid == study_uid))
            if st is None:
                raise HTTPException(404, "no such study")
            view = study_view(s, st, detail=True)
        view["key_slices"] = _key_slices(settings, study_uid)
        return view

    @app.get("/api/studies/{study_uid}/slices/{k}.png")
    def slice_png(study_uid: str, k: int, user: str = reader) -> Response:
        """Slice k of the study's largest series with segment outlines and lesion boxes."""
        from node.admin.keyslice import NoImages, render_png, study_overlay

        try:
            return Response(render_png(study_overlay(settings, study_uid), k), media_type="image/png")
        except NoImages as err:
            raise HTTPException(404, str(err)) from None
        except IndexError as err:
            raise HTTPException(404, str(err)) from None

    @app.get("/api/jobs")
    def jobs(state: str | None = None, limit: int = 100, user: str = reader) -> list[dict[str, Any]]:
        """Jobs, newest first (optionally of one state)."""
        mod = _jobs_module()
        if mod is None:
            return []
        with session() as s:
            q = select(mod.Job).order_by(mod.Job.id.desc()).limit(max(1, min(limit, 1000)))
            if state:
                q = q.where(mod.Job.state == state)
            return [job_view(j) for j in s.scalars(q)]

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int, user: str = reader) -> dict[str, Any]:
        """One job."""
        mod = _require(_jobs_module(), "jobs")
        with session() as s:
            j = s.get(mod.Job, job_id)
            if j is None:
                raise HTTPException(404, "no such job")
            return job_view(j)

    @app.post("/api/jobs/{job_id}/retry")
    def retry_job(job_id: int, request: Request, user: str = writer) -> dict[str, Any]:
        """Give a dead or failed job a fresh set of attempts."""
        mod = _require(_jobs_module(), "jobs")
        with session() as s:
            j = s.get(mod.Job, job_id)
            if j is None:
                raise HTTPException(404, "no such job")
            if j.state not in ("dead", "failed"):
                raise HTTPException(409, f"job {job_id} is {j.state}; only dead or failed jobs are retried")
            j.state, j.attempts, j.error, j.worker, j.finished_at = "queued", 0, "", "", None
            study_uid = j.study_uid
        mod.publish_job(settings, job_id)
        _audit_action(access, request, user, f"retry job {job_id}", [study_uid])
        return {"job_id": job_id, "state": "queued"}

    @app.post("/api/jobs/{job_id}/rerun")
    def rerun_job(job_id: int, request: Request, user: str = writer) -> dict[str, Any]:
        """Run a job's analysis again as a new job that supersedes it."""
        mod = _require(_jobs_module(), "jobs")
        with session() as s:
            old = s.get(mod.Job, job_id)
            if old is None:
                raise HTTPException(404, "no such job")
            if old.state in mod.PENDING_STATES:
                raise HTTPException(409, f"job {job_id} is still {old.state}")
            new = mod.queue_job(s, settings, key=old.key, analysis=old.analysis, params=old.params_dict(),
                                rule=old.rule, level=old.level, priority=old.priority,
                                destinations=old.destination_names(), study_pk=old.study_pk, series_pk=old.series_pk,
                                study_uid=old.study_uid, series_uid=old.series_uid,
                                fingerprint=old.input_fingerprint, supersedes=old.id)
            s.flush()
            new_id, study_uid = new.id, old.study_uid
        mod.publish_job(settings, new_id)
        _audit_action(access, request, user, f"re-run job {job_id} as job {new_id}", [study_uid])
        return {"job_id": new_id, "supersedes": job_id, "state": "queued"}

    @app.get("/api/deliveries")
    def deliveries(state: str | None = None, destination: str | None = None, limit: int = 100,
                   user: str = reader) -> list[dict[str, Any]]:
        """Result deliveries, newest first."""
        mod = _dispatcher_module()
        if mod is None:
            return []
        with session() as s:
            q = select(mod.Delivery).order_by(mod.Delivery.id.desc()).limit(max(1, min(limit, 1000)))
            if state:
                q = q.where(mod.Delivery.state == state)
            if destination:
                q = q.where(mod.Delivery.destination == destination)
            return [delivery_view(d) for d in s.scalars(q)]

    @app.post("/api/studies/{study_uid}/resend")
    def resend(study_uid: str, request: Request, user: str = writer) -> dict[str, Any]:
        """Send every result object of a study again to its destinations."""
        mod = _require(_dispatcher_module(), "dispatcher")
        now = datetime.now(timezone.utc)
        with session() as s:
            rows = _study_deliveries(s, study_uid)
            if not rows:
                raise HTTPException(404, "the study has no result objects in the outbox")
            for row in rows:
                row.state, row.next_attempt_at, row.lease_until, row.reason = mod.PENDING, now, None, ""
            ids = [r.id for r in rows]
        jobs = _jobs_module()
        if jobs is not None:
            for delivery_id in ids:
                jobs.publish_delivery(settings, delivery_id)
        _audit_action(access, request, user, f"re-send {len(ids)} result object(s)", [study_uid])
        return {"study_uid": study_uid, "deliveries": ids, "state": "pending"}

    @app.get("/api/peers")
    def peers(user: str = reader) -> list[dict[str, Any]]:
        """Configured peers with the time each last sent us an instance."""
        with session() as s:
            last = dict(s.execute(select(Instance.calling_ae, func.max(Instance.received_at))
                                  .group_by(Instance.calling_ae)).all())
        return [{"ae_title": p.ae_title, "hosts": p.hosts, "allow": p.allow, "last_contact": iso(last.get(p.ae_title))}
                for p in settings.peers]

    @app.get("/api/destinations")
    def destinations(user: str = reader) -> list[dict[str, Any]]:
        """Configured destinations with their last success, last error and circuit breaker."""
        mod = _dispatcher_module()
        health: dict[str, Any] = {}
        if mod is not None and hasattr(mod, "DestinationHealth"):
            with session() as s:
                health = {h.name: (iso(h.last_success_at), h.last_error, iso(h.open_until), h.consecutive_failures)
                          for h in s.scalars(select(mod.DestinationHealth))}
        out = []
        for d in settings.destinations:
            success, error, open_until, failures = health.get(d.name, (None, "", None, 0))
            out.append({"name": d.name, "type": d.type, "ae_title": d.ae_title, "host": d.host, "port": d.port,
                        "url": d.url, "last_contact": success, "last_error": error, "breaker_open_until": open_until,
                        "consecutive_failures": failures})
        return out

    @app.post("/api/destinations/{name}/echo")
    def echo_destination(name: str, request: Request, user: str = reader) -> dict[str, Any]:
        """C-ECHO a DICOM destination (a test only: allowed to readers, audited)."""
        try:
            dest = settings.destination(name)
        except KeyError:
            raise HTTPException(404, "no such destination") from None
        if dest.type != "dicom":
            raise HTTPException(400, "C-ECHO needs a DICOM destination")
        outcome = c_echo(settings.node.ae_title, dest.ae_title or "", dest.host or "", int(dest.port or 0))
        audit.security_alert(audit.NODE_AUTHENTICATION, user=user, address=access.client(request),
                             detail=f"C-ECHO {name}: {outcome['result']}",
                             outcome=audit.SUCCESS if outcome["ok"] else audit.MINOR_FAILURE)
        return {"destination": name, **outcome}

    @app.get("/api/workers")
    def workers(user: str = reader) -> dict[str, Any]:
        """Workers seen in the job table, and this machine's GPUs and installed analyses."""
        return workers_data(settings, engine)

    @app.get("/api/config")
    def config(user: str = reader) -> dict[str, Any]:
        """The configuration in force, with secrets masked."""
        data = mask_secrets(settings.model_dump(mode="json", by_alias=True))
        return {"source": str(settings.source_path or ""), "settings": data}

    @app.post("/api/config/reload")
    def reload_config(request: Request, user: str = writer) -> JSONResponse:
        """Validate the configuration file; when valid, put its rules in force (others need a restart)."""
        path = settings.source_path
        if not path:
            raise HTTPException(409, "the node runs on embedded defaults: there is no file to reload")
        try:
            fresh = load_settings(Path(path))
        except ConfigError as err:
            audit.security_alert(audit.SOFTWARE_CONFIGURATION, user=user, address=access.client(request),
                                 detail="configuration reload refused: invalid", outcome=audit.MINOR_FAILURE)
            return JSONResponse({"ok": False, "errors": list(err.errors)}, status_code=422)
        from node.router import rule_book

        rule_book(settings).request_reload()
        changed = [k for k in type(fresh).model_fields if k != "rules"
                   and getattr(fresh, k) != getattr(settings, k)]
        audit.security_alert(audit.SOFTWARE_CONFIGURATION, user=user, address=access.client(request),
                             detail=f"configuration reloaded ({len(fresh.rules)} rules)")
        return JSONResponse({"ok": True, "rules": [r.name for r in fresh.rules], "restart_required_for": changed})

    return app


def _require(module: Any, name: str) -> Any:
    if module is None:
        raise HTTPException(501, f"the {name} stage is not installed in this build")
    return module


def _audit_action(access: Access, request: Request, user: str, what: str, study_uids: list[str]) -> None:
    log.info("api action by %s: %s", user, what)
    audit.security_alert(audit.RESTRICTED_FUNCTION, user=user, address=access.client(request), detail=what,
                         study_uids=[u for u in study_uids if u])


def _key_slices(settings: Settings, study_uid: str) -> list[int]:
    from node.admin.keyslice import NoImages, key_slices, study_overlay

    try:
        return key_slices(study_overlay(settings, study_uid))
    except NoImages:
        return []
    except Exception as err:  # noqa: BLE001 - an unreadable object must not break the study page
        log.warning("key slices of a study could not be computed: %s", type(err).__name__)
        return []


def c_echo(calling_ae: str, ae_title: str, host: str, port: int) -> dict[str, Any]:
    """C-ECHO a remote AE: {'ok', 'result', 'round_trip_ms'}."""
    from pynetdicom import AE
    from node.dispatch.scu import associate
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    start = time.monotonic()
    assoc = associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        return {"ok": False, "result": "association rejected" if assoc.is_rejected else "no answer or aborted",
                "round_trip_ms": None}
    status = assoc.send_c_echo()
    assoc.release()
    ms = round((time.monotonic() - start) * 1000, 1)
    code = int(status.Status) if status and "Status" in status else None
    return {"ok": code == 0, "result": f"status 0x{code:04X}" if code is not None else "no response",
            "round_trip_ms": ms}


def overview_data(settings: Settings, engine: Any) -> dict[str, Any]:
    """Phase counts of recent studies, queue depth per priority, failures, disk space."""
    phases = {p: 0 for p in PHASES}
    failures: list[dict[str, Any]] = []
    queue = {"stat": 0, "routine": 0, "low": 0}
    with session_scope(engine) as s:
        for view in study_views(s, list(s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(200)))):
            phases[view["phase"]] = phases.get(view["phase"], 0) + 1
            if view["failures"]:
                failures.append({"study_uid": view["study_uid"], "reasons": view["failures"]})
        jobs = _jobs_module()
        if jobs is not None:
            for priority, n in s.execute(select(jobs.Job.priority, func.count())
                                         .where(jobs.Job.state.in_(jobs.PENDING_STATES)).group_by(jobs.Job.priority)):
                queue[priority] = n
        index = {"studies": s.scalar(select(func.count()).select_from(Study)) or 0,
                 "instances": s.scalar(select(func.count()).select_from(Instance)) or 0,
                 "bytes": int(s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0)}
    root = Path(settings.storage.path)
    while not root.exists() and root != root.parent:
        root = root.parent
    usage = shutil.disk_usage(root)
    return {"phases": phases, "queue_depth": queue, "failures": failures[:20], "index": index,
            "disk": {"free_bytes": usage.free, "total_bytes": usage.total,
                     "reserve_bytes": int(settings.storage.min_free_bytes)},
            "node": {"ae_title": settings.node.ae_title, "port": settings.node.port,
                     "broker": "embedded" if not settings.broker.url else "redis"}}


_analyses_cache: list[dict[str, Any]] | None = None


def _installed_analyses(settings: Settings) -> list[dict[str, Any]]:
    global _analyses_cache
    if _analyses_cache is None:
        try:
            from workers.analysis.registry import available_analyses, weights_present

            _analyses_cache = [{"name": a.name, "version": getattr(a, "version", ""), "weights": weights_present(a)}
                               for a in available_analyses(settings).values()]
        except Exception as err:  # noqa: BLE001 - the analysis side may not be installed on this machine
            log.warning("installed analyses unknown: %s", type(err).__name__)
            _analyses_cache = []
    return _analyses_cache


def workers_data(settings: Settings, engine: Any) -> dict[str, Any]:
    """Worker identities with their last heartbeat and analyses; this machine's GPUs."""
    seen: list[dict[str, Any]] = []
    jobs = _jobs_module()
    if jobs is not None:
        with session_scope(engine) as s:
            rows = s.execute(select(jobs.Job.worker, func.max(jobs.Job.heartbeat_at), func.count())
                             .where(jobs.Job.worker != "").group_by(jobs.Job.worker)).all()
            for worker, beat, n in rows:
                analyses = sorted(set(s.scalars(select(jobs.Job.analysis).where(jobs.Job.worker == worker))))
                running = s.scalar(select(func.count()).select_from(jobs.Job)
                                   .where(jobs.Job.worker == worker, jobs.Job.state == "running")) or 0
                seen.append({"worker": worker, "last_heartbeat": iso(beat), "jobs": n, "running": running,
                             "analyses": analyses})
    from node.core.metrics import gpu_status

    gpus = gpu_status()
    return {"workers": seen, "gpus": gpus, "analyses": _installed_analyses(settings),
            "mode": "embedded" if not settings.broker.url else "celery"}


# --- running inside `ainode serve` ---------------------------------------------------------------


def start_services(settings: Settings) -> list[Callable[[], None]]:
    """Start the audit trail and the API server (uvicorn in a thread); return their stop functions."""
    trail = audit.configure(settings.audit, settings.node.ae_title)
    audit.application_activity(True, settings.node.ae_title)
    stoppers: list[Callable[[], None]] = []
    if settings.api.enabled:
        stoppers.append(_start_uvicorn(settings))

    def stop_audit() -> None:
        audit.application_activity(False, settings.node.ae_title)
        trail.close(timeout=2.0)

    stoppers.append(stop_audit)
    return stoppers


def _start_uvicorn(settings: Settings) -> Callable[[], None]:
    import uvicorn

    config = uvicorn.Config(create_app(settings), host=settings.api.host, port=settings.api.port,
                            log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign] - the node owns signals
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        log.error("admin API could not listen on %s:%d; the node runs without API, dashboard and /metrics",
                  settings.api.host, settings.api.port)
        return lambda: None
    log.info("admin API and dashboard on http://%s:%d/ (%s)", settings.api.host, settings.api.port,
             "token required" if settings.api.token else "read-only, local clients only")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return stop


class TransferAuditor:
    """DICOM Instances Transferred messages: one per study once it is complete (import, from its
    modality) and one per job, destination and study once all its result objects are delivered
    (export, to the PACS).

    A node runs for years, so a pass reads only what changed lately: studies that became ready,
    and delivery groups with an object delivered, since ``WINDOW_S`` before the previous pass
    (the overlap covers rows committed after the timestamp they carry), through indexes on those
    times; and it remembers what it reported only for that window. Neither the scans nor the
    memory grow with the history the database holds. Passes run only after a commit
    (``db.ChangeGate``). What completed before this auditor was made is the previous run's to
    report (its last pass runs when the node stops: ``run_at_stop``); what completed after, even
    before the first pass, is this run's. A study completed again after late arrivals is reported
    again.
    """

    WINDOW_S = 300.0
    run_at_stop = True  # ``ainode serve`` runs one last pass after the other stages have stopped

    def __init__(self, settings: Settings):
        self.settings = settings
        self.gate = ChangeGate(settings.database.url)
        self.started = utcnow()
        self.since = self.started - timedelta(seconds=self.WINDOW_S)
        self.reported: dict[tuple, datetime] = {}  # what was reported (or skipped) -> when it completed

    def __call__(self) -> None:
        if audit.trail() is None or not self.gate.due():
            return
        started = utcnow()
        self._imports(self.since)
        self._exports(self.since)
        self.since = started - timedelta(seconds=self.WINDOW_S)
        self.reported = {key: at for key, at in self.reported.items() if aware(at) >= self.since}

    def _to_report(self, key: tuple, completed_at: datetime) -> bool:
        """True the first time ``key`` is seen, unless it completed before this run began."""
        if key in self.reported:
            return False
        self.reported[key] = completed_at
        return aware(completed_at) >= self.started

    def _imports(self, since: datetime) -> None:
        with session_scope(engine_for(self.settings.database.url)) as s:
            rows = s.execute(select(Study.id, Study.ready_at, Study.study_uid, Study.instance_count, Study.calling_ae)
                             .where(Study.ready_at >= since)).all()
        for pk, ready_at, uid, count, calling in rows:
            if self._to_report(("study", pk, ready_at), ready_at):
                audit.instances_transferred(imported=True, study_uid=uid, instances=count, source_ae=calling,
                                            source_host="", destination_ae=self.settings.node.ae_title)

    def _exports(self, since: datetime) -> None:
        dispatcher = _dispatcher_module()
        if dispatcher is None:
            return
        D = dispatcher.Delivery
        group = (D.job_id, D.destination, D.study_instance_uid)
        recent = select(*group).where(D.delivered_at >= since).distinct().subquery()
        with session_scope(engine_for(self.settings.database.url)) as s:
            groups = s.execute(
                select(*group, func.count(), func.sum(case((D.state == "delivered", 1), else_=0)), func.max(D.delivered_at))
                .join(recent, (D.job_id == recent.c.job_id) & (D.destination == recent.c.destination)
                      & (D.study_instance_uid == recent.c.study_instance_uid))
                .group_by(*group)).all()
        host = socket.gethostname()
        for job_id, destination, study_uid, total, delivered, last in groups:
            if delivered != total or not self._to_report(("export", str(job_id), destination, study_uid), last):
                continue
            try:
                dest = self.settings.destination(destination)
                dest_ae, dest_host = dest.ae_title or dest.url or destination, dest.host or ""
            except KeyError:
                dest_ae, dest_host = destination, ""
            audit.instances_transferred(imported=False, study_uid=study_uid, instances=int(total),
                                        source_ae=self.settings.node.ae_title, source_host=host,
                                        destination_ae=dest_ae, destination_host=dest_host)


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """Audit completed studies and delivered results (DICOM Instances Transferred); sample the GPUs."""
    from node.core.metrics import record_gpu

    host = socket.gethostname()
    # The embedded worker runs on this machine: its GPUs' memory and utilisation go to /metrics.
    return [("audit-transfers", 2.0, TransferAuditor(settings)), ("gpu-sample", 15.0, lambda: record_gpu(host))]
