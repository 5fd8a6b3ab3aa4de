"""The job table: one row per analysis of a study or series, the truth about every job.

A job row is committed (state ``queued``) before its message is published. A worker claims it
atomically (``running``, attempts + 1, heartbeat), and finishes it as ``succeeded``,
``inapplicable`` (the input is outside the analysis' intended use: "not applicable", never
retried), ``failed`` (time limit, bad input, a writer's refusal: running it again would not help),
``retrying`` (a transient error; published again) or ``dead`` (attempts used up). Every transition is written by ``node.jobs.lifecycle``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.core.clock import aware, utcnow
from node.core.db import Base

QUEUED, RUNNING, SUCCEEDED, FAILED, RETRYING, DEAD = "queued", "running", "succeeded", "failed", "retrying", "dead"
# "not applicable" (the state column is 12 characters wide).
INAPPLICABLE = "inapplicable"
PENDING_STATES = (QUEUED, RUNNING, RETRYING)
FINAL_STATES = (SUCCEEDED, INAPPLICABLE, FAILED, DEAD)
ALL_STATES = (QUEUED, RUNNING, RETRYING, SUCCEEDED, INAPPLICABLE, FAILED, DEAD)

# Redis priorities: a lower number is served first. STAT overtakes routine, routine overtakes low.
PRIORITY_RANK = {"stat": 0, "routine": 3, "low": 6}
PRIORITY_STEPS = [0, 3, 6, 9]
ANALYSIS_QUEUE, DELIVERY_QUEUE = "gpu", "cpu"
RUN_ANALYSIS_TASK, DELIVER_TASK = "ainode.run_analysis", "ainode.deliver"


class Job(Base):
    """One analysis of one study or series, from routing to its final state."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # rule/analysis/level/uid: the same key with new inputs is a re-run that supersedes the last.
    key: Mapped[str] = mapped_column(String(300), index=True)
    study_pk: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="SET NULL"), nullable=True, index=True
    )
    series_pk: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="SET NULL"), nullable=True)
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    # A study-level job: JSON list of the Series Instance UIDs its rule selected (None: every series).
    series_uids: Mapped[str | None] = mapped_column(Text, nullable=True)
    level: Mapped[str] = mapped_column(String(8), default="study")
    rule: Mapped[str] = mapped_column(String(128), default="")
    analysis: Mapped[str] = mapped_column(String(128))
    params: Mapped[str] = mapped_column(Text, default="{}")
    destinations: Mapped[str] = mapped_column(Text, default="[]")
    priority: Mapped[str] = mapped_column(String(8), default="routine")
    priority_rank: Mapped[int] = mapped_column(Integer, default=3, index=True)
    queue: Mapped[str] = mapped_column(String(16), default=ANALYSIS_QUEUE)
    soft_time_limit_s: Mapped[int] = mapped_column(Integer, default=600)
    time_limit_s: Mapped[int] = mapped_column(Integer, default=900)
    # sha256 of the sorted input SOP Instance UIDs: tells a late arrival from a duplicate.
    input_fingerprint: Mapped[str] = mapped_column(String(64), default="")
    supersedes_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(12), default=QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    task_id: Mapped[str] = mapped_column(String(64), default="")
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    # A short JSON summary of what the job produced (counts, output paths), no patient data.
    result: Mapped[str] = mapped_column(Text, default="")

    def params_dict(self) -> dict[str, Any]:
        """The analysis parameters from the rule."""
        return dict(json.loads(self.params or "{}"))

    def selected_series(self) -> list[str] | None:
        """The series a study-level job analyses (None: every series of its study)."""
        return list(json.loads(self.series_uids)) if self.series_uids else None

    def destination_names(self) -> list[str]:
        """Names of the destinations the results go to."""
        return list(json.loads(self.destinations or "[]"))


def input_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """A stable digest of a job's inputs (order does not matter)."""
    digest = hashlib.sha256()
    for uid in sorted(sop_instance_uids):
        digest.update(uid.encode() + b"\n")
    return digest.hexdigest()


def status_summary(session: Session) -> dict[str, Any]:
    """Job counts per state; the dead, failed and not-applicable jobs with their reasons; the oldest
    waiting job."""
    counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state.in_((QUEUED, RETRYING))))
    problems = session.scalars(
        select(Job).where(Job.state.in_((DEAD, FAILED))).order_by(Job.finished_at.desc()).limit(20)
    ).all()
    inapplicable = session.scalars(
        select(Job).where(Job.state == INAPPLICABLE).order_by(Job.finished_at.desc()).limit(20)
    ).all()
    oldest_age = (utcnow() - aware(oldest)).total_seconds() if oldest else None
    return {
        "jobs": {state: counts.get(state, 0) for state in ALL_STATES},
        "oldest_waiting_s": round(oldest_age, 1) if oldest_age is not None else None,
        "dead": [
            {"id": j.id, "analysis": j.analysis, "rule": j.rule, "attempts": j.attempts, "error": j.error[:200]}
            for j in problems
            if j.state == DEAD
        ],
        "failed": [
            {"id": j.id, "analysis": j.analysis, "rule": j.rule, "error": j.error[:200]}
            for j in problems
            if j.state == FAILED
        ],
        "not_applicable": [
            {"id": j.id, "analysis": j.analysis, "rule": j.rule, "reason": j.error[:200]} for j in inapplicable
        ],
    }
