"""Assembler: decides when a study or a series is complete ("ready"), from state in the database.

Evidence first, timers last:
1. MPPS: a COMPLETED step whose listed instances have all arrived makes its studies ready at once.
2. Expected counts: a series whose instances state Images in Acquisition is ready when that many
   have arrived.
3. Quiet timers: a series (study) with no new instance for series_quiet_s (study_quiet_s) is ready;
   force_complete_s after the first instance (or after its reopening) a study is ready however
   much keeps arriving.
   A rule that matches the study may shorten or lengthen these (its ``timers``).
Every input is a column (last_received_at, MPPS rows), so a restart loses no timer. An instance
arriving after a study was routed puts it back to ``received`` (``reopened_at``, from which its
force-complete timer counts again): it is routed again once it is quiet, and analyses whose inputs
changed run again (see node/router.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import pydicom
from sqlalchemy import ForeignKey, Integer, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.core.clock import aware, utcnow
from node.core.db import Base, ChangeGate, database_session
from node.core.settings import Settings, Timers
from node.core.wake import StudyWake
from node.index import Instance, Series, Study
from node.ingest import mpps
from node.router import current_rules, route_ready, study_verdict

log = logging.getLogger("ainode.assembler")

RECEIVED, READY = "received", "ready"
AFTER_READY = ("ready", "routed", "unrouted", "done")


class SeriesExpectation(Base):
    """How many instances a series' own data says it has (Images in Acquisition), once read."""

    __tablename__ = "series_expectations"
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), primary_key=True)
    expected_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)


def effective_timers(session: Session, settings: Settings, study: Study) -> Timers:
    """The global timers, or the shortest of those set by rules matching this study."""
    overriding = [r for r in current_rules(settings) if r.timers is not None]
    if not overriding:
        return settings.timers
    chosen = [r.timers for r in overriding if study_verdict(session, study, r.match)[0]]
    if not chosen:
        return settings.timers
    return Timers(
        series_quiet_s=min(t.series_quiet_s for t in chosen),
        study_quiet_s=min(t.study_quiet_s for t in chosen),
        force_complete_s=min(t.force_complete_s for t in chosen),
    )


def _mark_study_ready(session: Session, study: Study, reason: str, now: datetime) -> None:
    study.state, study.ready_at, study.ready_reason = READY, now, reason
    for series in session.scalars(select(Series).where(Series.study_pk == study.id, Series.state == RECEIVED)):
        series.state, series.ready_at = READY, now
    log.info("study %s ready (%s, %d instances)", study.id, reason, study.instance_count)


def reopen_late_arrivals(session: Session, now: datetime | None = None) -> int:
    """Studies/series that received instances after they were ready go back to received; a
    reopened study's force-complete timer starts again (``reopened_at``)."""
    reopened = 0
    for study in session.scalars(
        select(Study).where(
            Study.state.in_(AFTER_READY), Study.ready_at.is_not(None), Study.last_received_at > Study.ready_at
        )
    ):
        log.info("study %s received instances after it was %s: completing it again", study.id, study.state)
        study.state, study.ready_reason = RECEIVED, ""
        study.reopened_at = now or utcnow()
        reopened += 1
    for series in session.scalars(
        select(Series).where(
            Series.state.in_(AFTER_READY), Series.ready_at.is_not(None), Series.last_received_at > Series.ready_at
        )
    ):
        series.state = RECEIVED
    return reopened


def apply_mpps(session: Session, now: datetime) -> int:
    """Make studies ready whose COMPLETED step's instances have all arrived; returns how many."""
    made_ready = 0
    steps = session.scalars(
        select(mpps.PerformedProcedureStep).where(
            mpps.PerformedProcedureStep.status == mpps.COMPLETED, mpps.PerformedProcedureStep.applied.is_(False)
        )
    ).all()
    for step in steps:
        listed = {sop for _, sop in step.instances()}
        if not listed:
            step.applied = True  # nothing to wait for: the timers decide
            continue
        arrived = session.scalar(select(func.count(Instance.id)).where(Instance.sop_instance_uid.in_(listed)))
        if arrived < len(listed):
            continue
        for study in session.scalars(select(Study).where(Study.study_uid.in_(step.studies()), Study.state == RECEIVED)):
            _mark_study_ready(session, study, "mpps-completed", now)
            made_ready += 1
        step.applied = True
    return made_ready


def _expected_instances(session: Session, settings: Settings, series: Series) -> int | None:
    row = session.get(SeriesExpectation, series.id)
    if row is None:
        path = session.scalar(select(Instance.path).where(Instance.series_pk == series.id).limit(1))
        expected = None
        if path:
            try:
                ds = pydicom.dcmread(
                    Path(settings.storage.path) / path,
                    stop_before_pixels=True,
                    force=True,
                    specific_tags=["ImagesInAcquisition"],
                )
                expected = int(ds.ImagesInAcquisition) if ds.get("ImagesInAcquisition") else None
            except Exception:  # noqa: BLE001 - unreadable or absent: timers decide
                expected = None
        row = SeriesExpectation(series_pk=series.id, expected_instances=expected)
        session.add(row)
    return row.expected_instances if row.expected_instances and row.expected_instances > 0 else None


def apply_timers(session: Session, settings: Settings, now: datetime) -> int:
    """Quiet timers, forced completion and expected counts for every study still receiving."""
    made_ready = 0
    for study in session.scalars(select(Study).where(Study.state == RECEIVED)).all():
        timers = effective_timers(session, settings, study)
        for series in session.scalars(select(Series).where(Series.study_pk == study.id, Series.state == RECEIVED)):
            quiet = now - aware(series.last_received_at) >= timedelta(seconds=timers.series_quiet_s)
            expected = _expected_instances(session, settings, series)
            if quiet or (expected is not None and series.instance_count >= expected):
                series.state, series.ready_at = READY, now
        if now - aware(study.last_received_at) >= timedelta(seconds=timers.study_quiet_s):
            _mark_study_ready(session, study, "quiet-timer", now)
            made_ready += 1
        elif now - aware(study.reopened_at or study.first_received_at) >= timedelta(seconds=timers.force_complete_s):
            _mark_study_ready(session, study, "forced-complete", now)
            made_ready += 1
    return made_ready


def complete_studies(settings: Settings) -> int:
    """One pass: reopen late arrivals, apply MPPS, then timers; returns how many studies became ready."""
    with database_session(settings.database.url) as session:
        now = utcnow()
        reopen_late_arrivals(session, now)
        ready = apply_mpps(session, now)
        ready += apply_timers(session, settings, now)
    return ready


def tick(settings: Settings) -> None:
    """Complete what is complete and route it at once (no extra wait between the two stages)."""
    complete_studies(settings)
    route_ready(settings)


def studies_in_progress(settings: Settings) -> bool:
    """Whether any study or series is still receiving or ready but not yet routed (timers run)."""
    open_states = (RECEIVED, READY)
    with database_session(settings.database.url) as session:
        return (
            session.scalar(select(Study.id).where(Study.state.in_(open_states)).limit(1)) is not None
            or session.scalar(select(Series.id).where(Series.state.in_(open_states)).limit(1)) is not None
        )


class CompletionTicker:
    """The periodic completion check, skipped while nothing can have changed: no study is in
    progress and the database has seen no commit (``core.db.ChangeGate``). An idle node then costs
    one ``PRAGMA data_version`` per tick instead of a handful of queries. A pass the receivers
    woke (a study may have just become complete) always runs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.gate = ChangeGate(settings.database.url)
        self.in_progress = True  # until a pass has shown otherwise

    def __call__(self, woken: bool = False) -> None:
        """One check; ``woken``: a receiver said a study may be complete, whatever the gate says."""
        due = self.gate.due()  # read first even when woken: it remembers the token this pass saw
        if not (woken or due or self.in_progress):
            return
        self.in_progress = True  # stays so if the pass fails
        tick(self.settings)
        self.in_progress = studies_in_progress(self.settings)


def periodic_tasks(
    settings: Settings, wake: StudyWake | None = None
) -> list[tuple[str, float, Callable[..., None], StudyWake | None]]:
    """The completion check, four times a second, so a timer fires within a quarter second; and at
    once when ``wake`` (which the receivers notify after an MPPS step ends, or after indexing what
    an ended association left) is notified, so a complete study does not wait for the tick."""
    return [("assembler", 0.25, CompletionTicker(settings), wake)]


def status_summary(session: Session) -> dict[str, object]:
    """Studies per pipeline state and MPPS steps per status, for `ainode status`."""
    studies = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
    steps = dict(
        session.execute(
            select(mpps.PerformedProcedureStep.status, func.count()).group_by(mpps.PerformedProcedureStep.status)
        ).all()
    )
    return {"studies_" + state: count for state, count in sorted(studies.items())} | {
        "mpps_" + status.lower().replace(" ", "_"): count for status, count in sorted(steps.items())
    }
