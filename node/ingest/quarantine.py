"""Quarantine: an answered instance the index cannot take is moved aside, never left to block.

An instance that was answered Success is durable (journal record or landed file) until it is
indexed. When its rows cannot be written for a reason that will not go away by waiting (the
database refuses a value, the record cannot be read back), it is written out as a complete
DICOM file into ``<storage>/.quarantine`` with a sidecar ``.json`` saying why, audited (DICOM
Instances Transferred, serious failure) and counted; its journal record is retired, so the
records around it are indexed and the journal keeps working. Nothing is deleted: an operator
reads the alert (``ainode status``, ``/api/overview``, ``ainode_instances_quarantined``),
looks at the file and sends it again or removes it. ``alerts`` lists what needs that look,
including journals a receiver could not use (``node.ingest.journal.unavailable_journals``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from node.core import audit, metrics
from node.core.clock import iso, utcnow
from node.ingest import journal, store
from node.ingest.arrival import Arrival, instance_tag

log = logging.getLogger("ainode.receiver")

FOLDER = ".quarantine"


def lasting(err: BaseException) -> bool:
    """True when indexing failed for a reason waiting will not cure: the database refused a
    value (DataError) or the rows could not even be built. A database that is down or busy,
    a race with another receiver (IntegrityError) and a full disk are worth retrying."""
    if isinstance(err, (OSError, store.OutOfSpace, IntegrityError)):
        return False
    if isinstance(err, DBAPIError):
        return isinstance(err, DataError)
    return True  # a value the driver cannot send, a header that cannot be read, ...


def reason_of(err: BaseException) -> str:
    """A reason without the values (a database error quotes the row, i.e. patient data)."""
    orig = getattr(err, "orig", None)
    return f"{type(err).__name__}/{type(orig).__name__}" if orig is not None else type(err).__name__


def _name(root: Path, tag: str) -> Path:
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        store.fsync_dir(folder.parent)
    return folder / f"{utcnow().strftime('%Y%m%dT%H%M%S%f')}-{tag}.dcm"


def _write(root: Path, target: Path, details: dict[str, Any]) -> None:
    store.write_durable(Path(root), f"{FOLDER}/{target.name}", [json.dumps(details, indent=1).encode()])


def _patient_of(arrival: Arrival | None) -> audit.PatientIdentity | None:
    """The patient an arrival names, for the audit message; None when its header cannot say (a
    header that cannot be read may be why it is quarantined)."""
    if arrival is None:
        return None
    try:
        header = arrival.header
        return audit.patient_identity(
            header.get("PatientID", ""), header.get("PatientName", ""), header.get("IssuerOfPatientID", "")
        )
    except Exception:  # noqa: BLE001 - the audit message goes out without the patient
        return None


def _record(
    root: Path,
    target: Path,
    reason: str,
    source: str,
    calling_ae: str,
    called_ae: str,
    study: str,
    patient: audit.PatientIdentity | None = None,
) -> None:
    _write(
        root,
        target.with_suffix(".json"),
        {
            "reason": reason,
            "source": source,
            "quarantined_at": iso(utcnow()),
            "calling_ae": calling_ae,
            "study_instance_uid": study,
        },
    )
    metrics.INSTANCES_QUARANTINED.inc()
    log.error(
        "instance %s answered Success cannot be indexed (%s): moved to %s/%s; the instances around it go on",
        target.stem.rsplit("-", 1)[-1],
        reason,
        FOLDER,
        target.name,
    )
    audit.instances_transferred(
        imported=True,
        study_uid=study,
        instances=1,
        source_ae=calling_ae or "unknown",
        source_host="",
        destination_ae=called_ae or "unknown",
        outcome=audit.SERIOUS_FAILURE,
        reason=f"answered instance quarantined, not indexed ({reason}): {FOLDER}/{target.name}",
        patient=patient,
    )


def quarantine_record(
    root: Path, record: journal.Record, reason: str, called_ae: str = "", arrival: Arrival | None = None
) -> Path:
    """Write a journal record out as a DICOM file in the quarantine folder, then retire it."""
    tag = (
        instance_tag(arrival.header.SOPInstanceUID)
        if arrival is not None
        else f"{record.journal.path.stem}-{record.seq}"
    )
    target = _name(root, tag)
    payload = record.payload()
    try:
        store.write_durable(Path(root), f"{FOLDER}/{target.name}", [payload])
    finally:
        payload.release()
    _record(
        root,
        target,
        reason,
        f"journal {record.journal.path.name} record {record.seq}",
        arrival.calling_ae if arrival is not None else "",
        called_ae,
        str(arrival.header.get("StudyInstanceUID", "")) if arrival is not None else "",
        _patient_of(arrival),
    )
    record.journal.retire([record])
    record.journal.checkpoint()
    return target


def quarantine_landed(
    root: Path, landed: Path, reason: str, called_ae: str = "", arrival: Arrival | None = None
) -> Path:
    """Move a landed file into the quarantine folder (a rename: nothing is copied)."""
    tag = instance_tag(arrival.header.SOPInstanceUID) if arrival is not None else landed.stem
    target = _name(root, tag)
    os.replace(landed, target)
    store.fsync_dir(target.parent)
    store.fsync_dir(landed.parent)
    _record(
        root,
        target,
        reason,
        f"landed file {landed.name}",
        arrival.calling_ae if arrival is not None else "",
        called_ae,
        str(arrival.header.get("StudyInstanceUID", "")) if arrival is not None else "",
        _patient_of(arrival),
    )
    return target


def quarantine_arrival(root: Path, arrival: Arrival, reason: str) -> Path | None:
    """Quarantine an answered arrival from wherever it is durable (None: nothing was left)."""
    if arrival.record is not None:
        return quarantine_record(root, arrival.record, reason, arrival.called_ae, arrival)
    if arrival.landed is not None and arrival.landed.exists():
        return quarantine_landed(root, arrival.landed, reason, arrival.called_ae, arrival)
    return None


def quarantined(root: Path) -> list[Path]:
    """The quarantined instance files, oldest first."""
    folder = Path(root) / FOLDER
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def alerts(root: Path) -> list[dict[str, Any]]:
    """What an operator must look at on the ingest side: quarantined instances, journals that
    could not be used (the receiver refuses instances with A700 meanwhile)."""
    found: list[dict[str, Any]] = []
    files = quarantined(root)
    if files:
        found.append(
            {
                "kind": "instances_quarantined",
                "count": len(files),
                "where": str(Path(root) / FOLDER),
                "message": f"{len(files)} instance(s) answered Success could not be indexed and were moved to "
                f"{FOLDER}: look at them, send them again or remove them",
            }
        )
    for name, reason in journal.unavailable_journals(root):
        found.append(
            {
                "kind": "journal_unavailable",
                "journal": name,
                "message": f"journal {name} cannot be used ({reason}): its receiver refuses instances (A700)",
            }
        )
    return found
