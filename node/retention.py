"""Retention: removes unrouted studies after storage.unrouted_retention_h, processed studies after
storage.retention_days, and the oldest processed studies first when the disk passes the high-water mark.

Only studies that are finished are removed: ``unrouted``, or ``done`` (every job final). A study
still receiving, waiting, or with a job pending is never touched. Index rows go first (one
transaction), then the files: a crash in between leaves orphan files, never index rows that point
at nothing. Each removal is audited (DICOM Study Deleted, PS3.15 A.5.3.6) with the study and its
patient once the index rows are gone.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Callable

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from node.assembler import SeriesExpectation
from node.core import audit, volumes
from node.core.clock import utcnow
from node.core.db import database_session
from node.core.settings import Settings
from node.index import Instance, Patient, Series, Study
from node.jobs.table import PENDING_STATES, Job

log = logging.getLogger("ainode.retention")

REMOVABLE_STATES = ("unrouted", "done")


def _has_pending_jobs(session: Session, study: Study) -> bool:
    return bool(
        session.scalar(select(func.count(Job.id)).where(Job.study_pk == study.id, Job.state.in_(PENDING_STATES)))
    )


def remove_study(session: Session, study: Study) -> list[str]:
    """Delete a study's index rows; returns its instance file paths (relative) for the caller to unlink."""
    series_pks = list(session.scalars(select(Series.id).where(Series.study_pk == study.id)))
    paths = list(session.scalars(select(Instance.path).where(Instance.series_pk.in_(series_pks))))
    session.execute(delete(Instance).where(Instance.series_pk.in_(series_pks)))
    session.execute(delete(SeriesExpectation).where(SeriesExpectation.series_pk.in_(series_pks)))
    session.execute(Job.__table__.update().where(Job.study_pk == study.id).values(study_pk=None, series_pk=None))
    session.execute(delete(Series).where(Series.id.in_(series_pks)))
    patient_pk = study.patient_pk
    session.delete(study)
    session.flush()
    if not session.scalar(select(func.count(Study.id)).where(Study.patient_pk == patient_pk)):
        session.execute(delete(Patient).where(Patient.id == patient_pk))
    return paths


def _unlink(storage: Path, paths: list[str]) -> None:
    for rel in paths:
        try:
            (storage / rel).unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not remove a stored file (%s)", err.strerror)
    for series_folder in {(storage / rel).parent for rel in paths}:
        volumes.remove(series_folder)  # the series' streamed volume goes with its files


def _remove(settings: Settings, study_pks: list[int], why: str) -> int:
    removed = 0
    for pk in study_pks:
        with database_session(settings.database.url) as session:
            study = session.get(Study, pk)
            if study is None or study.state not in REMOVABLE_STATES or _has_pending_jobs(session, study):
                continue
            study_uid, patient = study.study_uid, _patient_of(study)
            paths = remove_study(session, study)
        _unlink(Path(settings.storage.path), paths)
        log.info("study %s removed (%s, %d files)", pk, why, len(paths))
        audit.study_deleted(
            study_uid=study_uid,
            instances=len(paths),
            node_ae=settings.node.ae_title,
            reason=f"retention: {why}",
            patient=patient,
        )
        removed += 1
    return removed


def _patient_of(study: Study) -> audit.PatientIdentity | None:
    """The study's patient for the audit message (read before the rows go)."""
    patient = study.patient
    return audit.patient_identity(patient.patient_id, patient.name, patient.issuer) if patient is not None else None


def disk_use_fraction(path: Path) -> float:
    """Used fraction of the file system holding path."""
    usage = shutil.disk_usage(path)
    return usage.used / usage.total if usage.total else 0.0


def apply_retention(settings: Settings) -> dict[str, int]:
    """One retention pass; returns how many studies were removed for each reason."""
    now = utcnow()
    storage = Path(settings.storage.path)
    with database_session(settings.database.url) as session:
        unrouted = list(
            session.scalars(
                select(Study.id).where(
                    Study.state == "unrouted",
                    Study.ready_at < now - timedelta(hours=settings.storage.unrouted_retention_h),
                )
            )
        )
        expired: list[int] = []
        if settings.storage.retention_days > 0:
            expired = list(
                session.scalars(
                    select(Study.id).where(
                        Study.state.in_(REMOVABLE_STATES),
                        Study.last_received_at < now - timedelta(days=settings.storage.retention_days),
                    )
                )
            )
    counts = {
        "unrouted": _remove(settings, unrouted, "unrouted, retention passed"),
        "expired": _remove(settings, [pk for pk in expired if pk not in unrouted], "retention passed"),
        "high_water": 0,
    }
    if storage.exists() and disk_use_fraction(storage) > settings.storage.high_water_mark:
        with database_session(settings.database.url) as session:
            oldest = list(
                session.scalars(
                    select(Study.id).where(Study.state.in_(REMOVABLE_STATES)).order_by(Study.last_received_at)
                )
            )
        for pk in oldest:
            if disk_use_fraction(storage) <= settings.storage.high_water_mark:
                break
            counts["high_water"] += _remove(settings, [pk], "disk above high-water mark")
    return counts


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """A retention pass every minute."""
    return [("retention", 60.0, lambda: apply_retention(settings))]
