"""The UPS tables: workitems, subscriptions and the N-EVENT-REPORT outbox.

A workitem row holds the UPS data set (DICOM JSON, without the Transaction UID: that is kept in
its own column and never answered to N-GET or C-FIND, PS3.4 CC.2.5.1.2), its state, the columns
C-FIND narrows by, and a version that every change moves (two performers racing for the same
workitem: the second one's update finds the version moved and sees IN PROGRESS). Completed and
canceled workitems are kept at least ``workflow.keep_final_hours`` (24 h or more) and while a
subscriber holds a deletion lock on them.

An event row is one N-EVENT-REPORT owed to one subscriber: written in the transaction that
changed the workitem, sent by ``node.workflow.events`` in id order per subscriber and kept
until the subscriber's SCP answered it, so a watcher that was down gets them when it is back.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from node.core.clock import utcnow
from node.core.db import Base

# The subscription key of a global subscription (to every workitem, present and future).
GLOBAL = ""

PENDING, DELIVERED = "pending", "delivered"


class Workitem(Base):
    """One Unified Procedure Step instance."""

    __tablename__ = "workitems"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    # The Locking UID of the performer that claimed it ("" while SCHEDULED). Never answered.
    transaction_uid: Mapped[str] = mapped_column(String(64), default="")
    # The UPS data set as DICOM JSON (PS3.18 F), Transaction UID left out.
    dataset: Mapped[str] = mapped_column(Text, default="{}")
    # Copied from the data set for C-FIND and the admin views (no patient data in logs).
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    scheduled_start: Mapped[str] = mapped_column(String(26), default="")
    creator_ae: Mapped[str] = mapped_column(String(16), default="")
    performer_ae: Mapped[str] = mapped_column(String(16), default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The job performing it (node.workflow.performer): set when the node's performer queued the
    # analysis, or at creation for the workitem mirroring a job the rules queued. One per job.
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)

    def json_dataset(self) -> dict[str, Any]:
        """The stored data set, DICOM JSON."""
        return dict(json.loads(self.dataset or "{}"))


class Subscription(Base):
    """One watcher (UPS Watch SCU) subscribed to one workitem, or globally (workitem_uid "")."""

    __tablename__ = "ups_subscriptions"
    __table_args__ = (UniqueConstraint("ae_title", "workitem_uid", name="uq_ups_subscription"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    workitem_uid: Mapped[str] = mapped_column(String(64), default=GLOBAL, index=True)
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    # A filtered global subscription's matching keys (DICOM JSON), "" for all workitems.
    filter: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UpsEvent(Base):
    """One N-EVENT-REPORT owed to one subscriber (the outbox row)."""

    __tablename__ = "ups_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscriber_ae: Mapped[str] = mapped_column(String(16), index=True)
    workitem_uid: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[int] = mapped_column(Integer)
    # The Event Information, DICOM JSON.
    info: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(12), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
