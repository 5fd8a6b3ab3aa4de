"""Routes of result deliveries: the outbox, and re-sending a study's results."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy import select

from node.admin.access import Access
from node.admin.views import delivery_view, study_deliveries
from node.core.clock import utcnow
from node.core.db import session_scope
from node.core.settings import Settings
from node.dispatch.table import PENDING, Delivery
from node.jobs import broker


def router(settings: Settings, access: Access, engine: Any) -> APIRouter:
    """``/api/deliveries``, ``/api/studies/{uid}/resend``."""
    api = APIRouter()
    reader, writer = Depends(access.read), Depends(access.write)

    @api.get("/api/deliveries")
    def deliveries(
        state: str | None = None, destination: str | None = None, limit: int = 100, user: str = reader
    ) -> list[dict[str, Any]]:
        """Result deliveries, newest first."""
        with session_scope(engine) as s:
            q = select(Delivery).order_by(Delivery.id.desc()).limit(max(1, min(limit, 1000)))
            if state:
                q = q.where(Delivery.state == state)
            if destination:
                q = q.where(Delivery.destination == destination)
            return [delivery_view(d) for d in s.scalars(q)]

    @api.post("/api/studies/{study_uid}/resend")
    def resend(study_uid: str, request: Request, user: str = writer) -> dict[str, Any]:
        """Send every result object of a study again to its destinations."""
        now = utcnow()
        with session_scope(engine) as s:
            rows = study_deliveries(s, study_uid)
            if not rows:
                raise HTTPException(404, "the study has no result objects in the outbox")
            for row in rows:
                row.state, row.next_attempt_at, row.lease_until, row.reason = PENDING, now, None, ""
            ids = [r.id for r in rows]
        for delivery_id in ids:
            broker.publish_delivery(settings, delivery_id)
        access.audit_action(request, user, f"re-send {len(ids)} result object(s)", [study_uid])
        return {"study_uid": study_uid, "deliveries": ids, "state": "pending"}

    return api
