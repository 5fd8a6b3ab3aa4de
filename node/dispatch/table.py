"""The outbox tables: one row per result object and destination, and each destination's circuit breaker."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from node.core.clock import utcnow
from node.core.db import Base

PENDING, SENDING, DELIVERED, FAILED, SKIPPED = "pending", "sending", "delivered", "failed", "skipped"
STATES = (PENDING, SENDING, DELIVERED, FAILED, SKIPPED)


class Delivery(Base):
    """One result object to be sent to one destination (the outbox row)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_delivery_object"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    destination: Mapped[str] = mapped_column(String(128), index=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[str] = mapped_column(String(32), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    # Storage Commitment: "", "requested", "committed", "failed".
    commitment: Mapped[str] = mapped_column(String(16), default="")
    transaction_uid: Mapped[str] = mapped_column(String(64), default="")
    # When the last N-ACTION was sent and how many were sent: a "requested" row with no report
    # after the destination's storage_commitment_timeout_s is asked again, then fails.
    commitment_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    commitment_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # IHE IOCM: the SOP Instance UID of the rejection note that withdrew this delivered object at
    # its destination (a re-run superseded it); "" while it stands. A later re-run rejects only
    # what no note has rejected yet.
    rejected_by: Mapped[str] = mapped_column(String(64), default="", server_default="")


class DestinationHealth(Base):
    """The circuit breaker of one destination."""

    __tablename__ = "destination_health"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    open_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
