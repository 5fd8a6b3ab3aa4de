"""Modality Performed Procedure Step SCP: the modality tells us when an acquisition is finished.

A modality creates a step (N-CREATE, status IN PROGRESS) when it starts acquiring and sets it to
COMPLETED or DISCONTINUED (N-SET) at the end, listing in its Performed Series Sequence every
instance it produced. The assembler makes a study ready at once when a COMPLETED step's instances
have all arrived; DISCONTINUED steps are only recorded (the quiet timers decide then).

The handlers run in the receiver processes; ``handlers(settings)`` gives them to the receiver's
AE. Step state lives in the database, so every process and a restart see the same steps.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy import Boolean, DateTime, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.core.clock import utcnow
from node.core.db import Base, database_session
from node.core.dicom import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MAY_NO_LONGER_BE_UPDATED,
    MISSING_ATTRIBUTE,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
)
from node.core.settings import Settings

log = logging.getLogger("ainode.mpps")

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
FINAL_STATES = (COMPLETED, DISCONTINUED)


class PerformedProcedureStep(Base):
    """One MPPS instance as the modality reported it."""

    __tablename__ = "mpps_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    # JSON list of Study Instance UIDs from the Scheduled Step Attributes Sequence.
    study_uids: Mapped[str] = mapped_column(Text, default="[]")
    # JSON list of [series_uid, sop_instance_uid] from the Performed Series Sequence.
    performed_instances: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set once the assembler has made the step's studies ready (each step triggers once).
    applied: Mapped[bool] = mapped_column(Boolean, default=False, index=True)

    def studies(self) -> list[str]:
        """Study Instance UIDs this step acquired for."""
        return list(json.loads(self.study_uids or "[]"))

    def instances(self) -> list[tuple[str, str]]:
        """(Series Instance UID, SOP Instance UID) of every instance the step lists."""
        return [tuple(pair) for pair in json.loads(self.performed_instances or "[]")]  # type: ignore[misc]


def _study_uids(ds: Dataset) -> list[str]:
    uids = [
        str(item.StudyInstanceUID)
        for item in ds.get("ScheduledStepAttributesSequence", [])
        if item.get("StudyInstanceUID")
    ]
    return sorted(set(uids))


def _performed_instances(ds: Dataset) -> list[list[str]]:
    # Images and non-image objects (SR, PR...) are both listed per performed series.
    pairs: list[list[str]] = []
    for series in ds.get("PerformedSeriesSequence", []) or []:
        series_uid = str(series.get("SeriesInstanceUID", ""))
        for seq in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in series.get(seq, []) or []:
                if ref.get("ReferencedSOPInstanceUID"):
                    pairs.append([series_uid, str(ref.ReferencedSOPInstanceUID)])
    return pairs


def create_step(session: Session, uid: str, ds: Dataset, calling_ae: str) -> int:
    """Record an N-CREATE; returns the DIMSE status to answer."""
    status = str(ds.get("PerformedProcedureStepStatus", "")).strip()
    if not status:
        return MISSING_ATTRIBUTE
    if status != IN_PROGRESS:
        # PS3.4 F.7.2.1.2: a step is created IN PROGRESS; anything else is an invalid value.
        return INVALID_ATTRIBUTE_VALUE
    if session.scalar(select(PerformedProcedureStep.id).where(PerformedProcedureStep.sop_instance_uid == uid)):
        return DUPLICATE_SOP_INSTANCE
    session.add(
        PerformedProcedureStep(
            sop_instance_uid=uid,
            status=status,
            calling_ae=calling_ae,
            study_uids=json.dumps(_study_uids(ds)),
            performed_instances=json.dumps(_performed_instances(ds)),
        )
    )
    return SUCCESS


def set_step(session: Session, uid: str, mods: Dataset) -> int:
    """Apply an N-SET; returns the DIMSE status to answer."""
    step = session.scalar(select(PerformedProcedureStep).where(PerformedProcedureStep.sop_instance_uid == uid))
    if step is None:
        return NO_SUCH_OBJECT_INSTANCE
    if step.status in FINAL_STATES:
        return MAY_NO_LONGER_BE_UPDATED
    status = str(mods.get("PerformedProcedureStepStatus", step.status) or step.status).strip()
    if status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
        return INVALID_ATTRIBUTE_VALUE
    if "PerformedSeriesSequence" in mods:
        step.performed_instances = json.dumps(_performed_instances(mods))
    if "ScheduledStepAttributesSequence" in mods:
        step.study_uids = json.dumps(_study_uids(mods))
    step.status = status
    step.updated_at = utcnow()
    return SUCCESS


def _calling_ae(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return ""


def _ends_step(mods: Dataset) -> bool:
    """Whether an N-SET's modifications end the step (COMPLETED or DISCONTINUED)."""
    return str(mods.get("PerformedProcedureStepStatus", "") or "").strip() in FINAL_STATES


def handlers(
    settings: Settings, study_may_be_complete: Callable[[], None] | None = None
) -> list[tuple[Any, Callable[..., Any]]]:
    """pynetdicom (event, handler) pairs for MPPS N-CREATE and N-SET, bound by the receiver.

    ``study_may_be_complete`` is called once an N-SET to COMPLETED or DISCONTINUED is committed
    and answered Success (the node wakes the assembler with it instead of waiting for its tick).
    """
    url = settings.database.url

    def on_n_create(event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if not uid:
            return MISSING_ATTRIBUTE, None
        ds = event.attribute_list
        try:
            with database_session(url) as session:
                status = create_step(session, uid, ds, _calling_ae(event))
        except Exception:  # noqa: BLE001 - answer with a status, never drop the association
            log.exception("MPPS N-CREATE could not be recorded")
            return PROCESSING_FAILURE, None
        log.info("MPPS N-CREATE step=%s status=0x%04X", uid, status)
        return status, (ds if status == SUCCESS else None)

    def on_n_set(event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "")
        mods = event.modification_list
        try:
            with database_session(url) as session:
                status = set_step(session, uid, mods)
        except Exception:  # noqa: BLE001
            log.exception("MPPS N-SET could not be recorded")
            return PROCESSING_FAILURE, None
        log.info(
            "MPPS N-SET step=%s new status=%s answer=0x%04X",
            uid,
            str(mods.get("PerformedProcedureStepStatus", "")),
            status,
        )
        if status == SUCCESS and study_may_be_complete is not None and _ends_step(mods):
            study_may_be_complete()
        return status, (mods if status == SUCCESS else None)

    return [(evt.EVT_N_CREATE, on_n_create), (evt.EVT_N_SET, on_n_set)]
