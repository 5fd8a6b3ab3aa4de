"""The index writer: a batch of arrivals recorded in the index in one transaction.

SQLAlchemy Core with statements built once; patient, study and series rows are created as
needed and their counters and times move with the instance rows (``index_batch``). The caller
owns the transaction (``begin_write`` takes SQLite's write lock up front).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pydicom
from sqlalchemy import Connection, bindparam, case, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from node.index import NODE_OUTPUT, Instance, Patient, Series, Study
from node.ingest.arrival import Arrival, made_here
from node.ingest.index_values import fit_ae
from node.ingest.wire import text_value

log = logging.getLogger("ainode.index")


def _get_or_create(conn: Connection, table: Any, where: Any, values: Callable[[], dict[str, Any]]) -> int:
    """The id of the row matching ``where``, inserted from ``values()`` when there is none."""
    found = conn.execute(select(table.c.id).where(where)).scalar()
    if found is not None:
        return found
    if conn.dialect.name == "sqlite":
        # SQLite writers are serialised by BEGIN IMMEDIATE: nobody can insert it meanwhile.
        return conn.execute(insert(table).values(**values())).inserted_primary_key[0]
    try:
        with conn.begin_nested():
            return conn.execute(insert(table).values(**values())).inserted_primary_key[0]
    except IntegrityError:
        # Another receiver process created it a moment ago.
        return conn.execute(select(table.c.id).where(where)).scalar_one()


_PATIENTS, _STUDIES, _SERIES, _INSTANCES = (m.__table__ for m in (Patient, Study, Series, Instance))


def _count_update(table: Any) -> Any:
    # instance_count += :n; last_received_at = the later of the stored time and :t.
    at = bindparam("t", type_=table.c.last_received_at.type)
    return (
        update(table)
        .where(table.c.id == bindparam("pk"))
        .values(
            instance_count=func.coalesce(table.c.instance_count, 0) + bindparam("n"),
            last_received_at=case(
                (table.c.last_received_at.is_(None), at),
                (table.c.last_received_at < at, at),
                else_=table.c.last_received_at,
            ),
        )
    )


# Built once: SQLAlchemy then reuses the compiled statements (building them per batch cost more
# than the database work).
_SELECT_EXISTING = select(_INSTANCES.c.id, _INSTANCES.c.sop_instance_uid, _INSTANCES.c.sha256, _INSTANCES.c.path).where(
    _INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True))
)
_SELECT_SERIES = select(_SERIES.c.id, _SERIES.c.study_pk, _SERIES.c.state).where(
    _SERIES.c.series_uid == bindparam("uid")
)
_INSERT_INSTANCES = insert(_INSTANCES)
_UPDATE_INSTANCE = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("pk"))
    .values(
        path=bindparam("path"),
        size_bytes=bindparam("size_bytes"),
        sha256=bindparam("sha256"),
        transfer_syntax_uid=bindparam("transfer_syntax_uid"),
        received_at=bindparam("received_at", type_=_INSTANCES.c.received_at.type),
        calling_ae=bindparam("calling_ae"),
    )
)
_UPDATE_SERIES_COUNT = _count_update(_SERIES)
_UPDATE_STUDY_COUNT = _count_update(_STUDIES)


# What identifies the patient and the order, as the index keeps it: (keyword, column, length).
# A re-send that changes one of these is a correction (``corrected_attributes``).
IDENTIFYING = (
    ("PatientName", "name", 324),
    ("PatientID", "patient_id", 64),
    ("IssuerOfPatientID", "issuer", 64),
    ("PatientBirthDate", "birth_date", 8),
    ("PatientSex", "sex", 16),
    ("AccessionNumber", "accession_number", 64),
)
_SELECT_STORED = (
    select(
        _PATIENTS.c.name,
        _PATIENTS.c.patient_id,
        _PATIENTS.c.issuer,
        _PATIENTS.c.birth_date,
        _PATIENTS.c.sex,
        _STUDIES.c.accession_number,
        _STUDIES.c.id.label("study_pk"),
        _SERIES.c.id.label("series_pk"),
        _SERIES.c.state.label("series_state"),
        _INSTANCES.c.path,
    )
    .select_from(
        _INSTANCES.join(_SERIES, _INSTANCES.c.series_pk == _SERIES.c.id)
        .join(_STUDIES, _SERIES.c.study_pk == _STUDIES.c.id)
        .join(_PATIENTS, _STUDIES.c.patient_pk == _PATIENTS.c.id)
    )
    .where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
)


def corrected_attributes(ds: Any, stored_file: Path | None, stored_row: Any) -> list[str]:
    """The identifying attributes (``IDENTIFYING``) in which a re-sent instance differs from the
    stored copy: its file's header (each instance is compared with its own copy, so a correction
    re-sent instance by instance is seen in every one), else the index's patient and study rows."""
    try:
        old = pydicom.dcmread(stored_file, stop_before_pixels=True, specific_tags=[k for k, _, _ in IDENTIFYING])
        before = {k: text_value(old, k, limit) for k, _, limit in IDENTIFYING}
    except Exception:  # noqa: BLE001 - no readable copy (or no root given): the index decides
        if stored_row is None:
            return []
        before = {k: stored_row._mapping[column] or "" for k, column, _ in IDENTIFYING}
    return [k for k, _, limit in IDENTIFYING if text_value(ds, k, limit) != before[k]]


def re_send_corrections(conn: Connection, ds: Any, root: Path | None) -> tuple[Any, list[str]]:
    """The stored instance's row (patient, study, series, path; None when not indexed) and the
    identifying attributes a re-send of it changes (``corrected_attributes``)."""
    stored = conn.execute(_SELECT_STORED, {"uid": ds.SOPInstanceUID}).first()
    if stored is None:
        return None, []
    return stored, corrected_attributes(ds, root / stored.path if root is not None else None, stored)


def _apply_correction(conn: Connection, ds: Any, stored: Any) -> None:
    """The corrected identification into the index: the patient row (the study moves to another
    patient when the Patient ID or its issuer changed) and the study's accession number."""
    patient_id, issuer = text_value(ds, "PatientID", 64), text_value(ds, "IssuerOfPatientID", 64)
    values = dict(
        name=text_value(ds, "PatientName", 324),
        birth_date=text_value(ds, "PatientBirthDate", 8),
        sex=text_value(ds, "PatientSex", 16),
    )
    patient_pk = _get_or_create(
        conn,
        _PATIENTS,
        (_PATIENTS.c.patient_id == patient_id) & (_PATIENTS.c.issuer == issuer),
        lambda: dict(patient_id=patient_id, issuer=issuer, **values),
    )
    conn.execute(update(_PATIENTS).where(_PATIENTS.c.id == patient_pk).values(**values))
    conn.execute(
        update(_STUDIES)
        .where(_STUDIES.c.id == stored.study_pk)
        .values(patient_pk=patient_pk, accession_number=text_value(ds, "AccessionNumber", 64))
    )


def index_batch(conn: Connection, arrivals: list[Arrival], policy: str, root: Path | None = None) -> None:
    """Record arrivals in the index (in the caller's transaction); sets each ``outcome``.

    SQLAlchemy Core, one lookup per distinct study and series and one multi-row insert, so
    a batch costs about as much as one instance did through the ORM.

    A re-sent instance with other content: kept_first under ``keep_first`` unless it corrects
    the patient's or the order's identification (``corrected_attributes``): a correction, like
    any replacement under ``replace``, takes the stored copy's place, updates the index and
    moves its series' and study's last arrival, so the study is completed and routed again and
    its analyses run again on the new content (the router's input fingerprint includes it).
    """
    uids = sorted({a.header.SOPInstanceUID for a in arrivals})
    existing: dict[str, dict[str, Any]] = {
        row.sop_instance_uid: dict(row._mapping) for row in conn.execute(_SELECT_EXISTING, {"uids": uids})
    }
    series_ids: dict[str, tuple[int, int, bool]] = {}  # series UID -> (series id, study id, node output)
    new_rows: list[dict[str, Any]] = []
    counts: dict[tuple[int, int, bool], list[Any]] = {}  # (series id, study id, node output) -> [count, last time]
    for arrival in arrivals:
        ds, stored = arrival.header, arrival.stored
        uid = ds.SOPInstanceUID
        row = existing.get(uid)
        if row is not None:
            if row["sha256"] == stored.sha256:
                arrival.outcome = "same"
            else:
                stored_row, corrected = re_send_corrections(conn, ds, root) if row.get("id") is not None else (None, [])
                if policy == "keep_first" and not corrected:
                    arrival.outcome, arrival.kept_relpath = "kept_first", row["path"]
                    continue
                arrival.outcome, arrival.old_relpath = ("corrected" if corrected else "replaced"), row["path"]
                arrival.corrected = corrected
                if corrected:
                    _apply_correction(conn, ds, stored_row)
                if stored_row is not None:  # new content: completed and routed again
                    times = {"n": 0, "t": arrival.received_at}
                    conn.execute(_UPDATE_SERIES_COUNT, {"pk": stored_row.series_pk, **times})
                    if stored_row.series_state != NODE_OUTPUT:
                        conn.execute(_UPDATE_STUDY_COUNT, {"pk": stored_row.study_pk, **times})
                values = dict(
                    path=stored.relpath,
                    size_bytes=stored.size_bytes,
                    sha256=stored.sha256,
                    transfer_syntax_uid=arrival.transfer_syntax,
                    received_at=arrival.received_at,
                    calling_ae=fit_ae(arrival.calling_ae),
                )
                if row.get("id") is not None:
                    conn.execute(_UPDATE_INSTANCE, {"pk": row["id"], **values})
                else:  # inserted earlier in this batch
                    row["pending"].update(values)
                row.update(sha256=stored.sha256, path=stored.relpath)
            continue
        key = series_ids.get(ds.SeriesInstanceUID)
        if key is None:
            key = series_ids[ds.SeriesInstanceUID] = _series_of(conn, arrival)
        values = dict(
            sop_instance_uid=uid,
            sop_class_uid=ds.SOPClassUID,
            series_pk=key[0],
            transfer_syntax_uid=arrival.transfer_syntax,
            path=stored.relpath,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            **arrival.index_values().instance,
            calling_ae=fit_ae(arrival.calling_ae),
            received_at=arrival.received_at,
        )
        new_rows.append(values)
        existing[uid] = {"id": None, "sha256": stored.sha256, "path": stored.relpath, "pending": values}
        count = counts.setdefault(key, [0, arrival.received_at])
        count[0] += 1
        count[1] = max(count[1], arrival.received_at)
        arrival.outcome = "new"
    if new_rows:
        conn.execute(_INSERT_INSTANCES, new_rows)
    # Counters and times move with the rows in the same transaction: the assembler's quiet
    # timers read last_received_at.
    per_study: dict[int, list[Any]] = {}
    for (series_pk, study_pk, node_output), (n, last) in counts.items():
        conn.execute(_UPDATE_SERIES_COUNT, {"pk": series_pk, "n": n, "t": last})
        if node_output:  # the node's own results coming back neither reopen nor extend the study
            continue
        total = per_study.setdefault(study_pk, [0, last])
        total[0] += n
        total[1] = max(total[1], last)
    for study_pk, (n, last) in per_study.items():
        conn.execute(_UPDATE_STUDY_COUNT, {"pk": study_pk, "n": n, "t": last})


def _series_of(conn: Connection, arrival: Arrival) -> tuple[int, int, bool]:
    """(series id, study id, whether the node made it) of an arrival's series, creating patient,
    study and series rows. A series the node made (``made_here``) is created as NODE_OUTPUT."""
    ds, now = arrival.header, arrival.received_at
    row = conn.execute(_SELECT_SERIES, {"uid": ds.SeriesInstanceUID}).first()
    if row is not None:
        return row.id, row.study_pk, row.state == NODE_OUTPUT
    node_output = made_here(ds)
    fitted = arrival.index_values()
    patient = fitted.patient
    patient_pk = _get_or_create(
        conn,
        _PATIENTS,
        (_PATIENTS.c.patient_id == patient["patient_id"]) & (_PATIENTS.c.issuer == patient["issuer"]),
        lambda: dict(patient),
    )
    study_pk = _get_or_create(
        conn,
        _STUDIES,
        _STUDIES.c.study_uid == ds.StudyInstanceUID,
        lambda: dict(
            study_uid=ds.StudyInstanceUID,
            patient_pk=patient_pk,
            **fitted.study,
            calling_ae=fit_ae(arrival.calling_ae),
            called_ae=fit_ae(arrival.called_ae),
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        ),
    )
    series_pk = _get_or_create(
        conn,
        _SERIES,
        _SERIES.c.series_uid == ds.SeriesInstanceUID,
        lambda: dict(
            series_uid=ds.SeriesInstanceUID,
            study_pk=study_pk,
            **fitted.series,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            state=NODE_OUTPUT if node_output else "received",
        ),
    )
    if node_output:
        log.info("series %s: made by this node (a result sent back); stored, never analysed", series_pk)
    return series_pk, study_pk, node_output


def begin_write(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        # Take the write lock up front so concurrent receivers never race on get-or-create.
        conn.execute(text("BEGIN IMMEDIATE"))
