"""The DICOM Instances Transferred audit messages of the node (imports from modalities, exports of results)."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta

from sqlalchemy import case, func, select

from node.core import audit
from node.core.clock import aware, utcnow
from node.core.db import ChangeGate, database_session
from node.core.settings import Settings
from node.dispatch.table import Delivery
from node.index import Patient, Study


class TransferAuditor:
    """DICOM Instances Transferred messages: one per study once it is complete (import, from its
    modality) and one per job, destination and study once all its result objects are delivered
    (export, to the PACS).

    A node runs for years, so a pass reads only what changed lately: studies that became ready,
    and delivery groups with an object delivered, since ``WINDOW_S`` before the previous pass
    (the overlap covers rows committed after the timestamp they carry), through indexes on those
    times; and it remembers what it reported only for that window. Neither the scans nor the
    memory grow with the history the database holds. Passes run only after a commit
    (``core.db.ChangeGate``). What completed before this auditor was made is the previous run's to
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
        with database_session(self.settings.database.url) as s:
            rows = s.execute(
                select(
                    Study.id,
                    Study.ready_at,
                    Study.study_uid,
                    Study.instance_count,
                    Study.calling_ae,
                    Patient.patient_id,
                    Patient.name,
                    Patient.issuer,
                )
                .outerjoin(Patient, Patient.id == Study.patient_pk)
                .where(Study.ready_at >= since)
            ).all()
        for pk, ready_at, uid, count, calling, patient_id, name, issuer in rows:
            if self._to_report(("study", pk, ready_at), ready_at):
                audit.instances_transferred(
                    imported=True,
                    study_uid=uid,
                    instances=count,
                    source_ae=calling,
                    source_host="",
                    destination_ae=self.settings.node.ae_title,
                    patient=audit.patient_identity(patient_id, name, issuer),
                )

    def _exports(self, since: datetime) -> None:
        D = Delivery
        group = (D.job_id, D.destination, D.study_instance_uid)
        recent = select(*group).where(D.delivered_at >= since).distinct().subquery()
        with database_session(self.settings.database.url) as s:
            groups = s.execute(
                select(
                    *group, func.count(), func.sum(case((D.state == "delivered", 1), else_=0)), func.max(D.delivered_at)
                )
                .join(
                    recent,
                    (D.job_id == recent.c.job_id)
                    & (D.destination == recent.c.destination)
                    & (D.study_instance_uid == recent.c.study_instance_uid),
                )
                .group_by(*group)
            ).all()
        patients = self._patients_of({row[2] for row in groups})
        host = socket.gethostname()
        for job_id, destination, study_uid, total, delivered, last in groups:
            if delivered != total or not self._to_report(("export", str(job_id), destination, study_uid), last):
                continue
            try:
                dest = self.settings.destination(destination)
                dest_ae, dest_host = dest.ae_title or dest.url or destination, dest.host or ""
            except KeyError:
                dest_ae, dest_host = destination, ""
            audit.instances_transferred(
                imported=False,
                study_uid=study_uid,
                instances=int(total),
                source_ae=self.settings.node.ae_title,
                source_host=host,
                destination_ae=dest_ae,
                destination_host=dest_host,
                patient=patients.get(study_uid),
            )

    def _patients_of(self, study_uids: set[str]) -> dict[str, audit.PatientIdentity | None]:
        """The patient of each study still in the index (a study retention removed has none)."""
        if not study_uids:
            return {}
        with database_session(self.settings.database.url) as s:
            rows = s.execute(
                select(Study.study_uid, Patient.patient_id, Patient.name, Patient.issuer)
                .join(Patient, Patient.id == Study.patient_pk)
                .where(Study.study_uid.in_(study_uids))
            ).all()
        return {uid: audit.patient_identity(pid, name, issuer) for uid, pid, name, issuer in rows}
