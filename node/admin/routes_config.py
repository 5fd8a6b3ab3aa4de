"""Routes of the node's configuration: peers, destinations (with C-ECHO), the settings, reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from node.admin.access import Access
from node.core import audit
from node.core.clock import iso
from node.core.db import session_scope
from node.core.settings import ConfigError, Settings, load_settings
from node.dispatch.scu import verify
from node.dispatch.table import DestinationHealth
from node.index import Instance
from node.router import rule_book

SECRET_KEYS = ("password", "token", "private_key")


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


def router(settings: Settings, access: Access, engine: Any) -> APIRouter:
    """``/api/peers``, ``/api/destinations``, ``/api/destinations/{name}/echo``, ``/api/config``,
    ``/api/config/reload``."""
    api = APIRouter()
    reader, writer = Depends(access.read), Depends(access.write)

    @api.get("/api/peers")
    def peers(user: str = reader) -> list[dict[str, Any]]:
        """Configured peers with the time each last sent us an instance."""
        with session_scope(engine) as s:
            last = dict(
                s.execute(
                    select(Instance.calling_ae, func.max(Instance.received_at)).group_by(Instance.calling_ae)
                ).all()
            )
        return [
            {"ae_title": p.ae_title, "hosts": p.hosts, "allow": p.allow, "last_contact": iso(last.get(p.ae_title))}
            for p in settings.peers
        ]

    @api.get("/api/destinations")
    def destinations(user: str = reader) -> list[dict[str, Any]]:
        """Configured destinations with their last success, last error and circuit breaker."""
        with session_scope(engine) as s:
            health = {
                h.name: (iso(h.last_success_at), h.last_error, iso(h.open_until), h.consecutive_failures)
                for h in s.scalars(select(DestinationHealth))
            }
        out = []
        for d in settings.destinations:
            success, error, open_until, failures = health.get(d.name, (None, "", None, 0))
            out.append(
                {
                    "name": d.name,
                    "type": d.type,
                    "ae_title": d.ae_title,
                    "host": d.host,
                    "port": d.port,
                    "url": d.url,
                    "last_contact": success,
                    "last_error": error,
                    "breaker_open_until": open_until,
                    "consecutive_failures": failures,
                }
            )
        return out

    @api.post("/api/destinations/{name}/echo")
    def echo_destination(name: str, request: Request, user: str = writer) -> dict[str, Any]:
        """C-ECHO a DICOM destination (a test, but it opens an association: a change, audited)."""
        try:
            dest = settings.destination(name)
        except KeyError:
            raise HTTPException(404, "no such destination") from None
        if dest.type != "dicom":
            raise HTTPException(400, "C-ECHO needs a DICOM destination")
        outcome = verify(settings.node.ae_title, dest.ae_title or "", dest.host or "", int(dest.port or 0))
        audit.security_alert(
            audit.NODE_AUTHENTICATION,
            user=user,
            address=access.client(request),
            detail=f"C-ECHO {name}: {outcome['result']}",
            outcome=audit.SUCCESS if outcome["ok"] else audit.MINOR_FAILURE,
        )
        return {
            "destination": name,
            "ok": outcome["ok"],
            "result": outcome["result"],
            "round_trip_ms": outcome["round_trip_ms"],
        }

    @api.get("/api/config")
    def config(user: str = reader) -> dict[str, Any]:
        """The configuration in force, with secrets masked."""
        data = mask_secrets(settings.model_dump(mode="json", by_alias=True))
        return {"source": str(settings.source_path or ""), "settings": data}

    @api.post("/api/config/reload")
    def reload_config(request: Request, user: str = writer) -> JSONResponse:
        """Validate the configuration file; when valid, put its rules in force (others need a restart)."""
        path = settings.source_path
        if not path:
            raise HTTPException(409, "the node runs on embedded defaults: there is no file to reload")
        try:
            fresh = load_settings(Path(path))
        except ConfigError as err:
            audit.security_alert(
                audit.SOFTWARE_CONFIGURATION,
                user=user,
                address=access.client(request),
                detail="configuration reload refused: invalid",
                outcome=audit.MINOR_FAILURE,
            )
            return JSONResponse({"ok": False, "errors": list(err.errors)}, status_code=422)
        rule_book(settings).request_reload()
        changed = [k for k in type(fresh).model_fields if k != "rules" and getattr(fresh, k) != getattr(settings, k)]
        audit.security_alert(
            audit.SOFTWARE_CONFIGURATION,
            user=user,
            address=access.client(request),
            detail=f"configuration reloaded ({len(fresh.rules)} rules)",
        )
        return JSONResponse({"ok": True, "rules": [r.name for r in fresh.rules], "restart_required_for": changed})

    return api
