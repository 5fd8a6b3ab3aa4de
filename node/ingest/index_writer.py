"""The index writer: a batch of arrivals recorded in the index in one transaction.

SQLAlchemy Core with statements built once; patient, study and series rows are created as
needed and their counters and times move with the instance rows (``index_batch``). The caller
owns the transaction (``begin_write`` takes SQLite's write lock up front).
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import Connection, bindparam, case, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from node.index import Instance, Patient, Series, Study
from node.ingest.arrival import Arrival
from node.ingest.index_values import fit_ae


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
_SELECT_SERIES = select(_SERIES.c.id, _SERIES.c.study_pk).where(_SERIES.c.series_uid == bindparam("uid"))
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


def index_batch(conn: Connection, arrivals: list[Arrival], policy: str) -> None:
    """Record arrivals in the index (in the caller's transaction); sets each ``outcome``.

    SQLAlchemy Core, one lookup per distinct study and series and one multi-row insert, so
    a batch costs about as much as one instance did through the ORM.
    """
    uids = sorted({a.header.SOPInstanceUID for a in arrivals})
    existing: dict[str, dict[str, Any]] = {
        row.sop_instance_uid: dict(row._mapping) for row in conn.execute(_SELECT_EXISTING, {"uids": uids})
    }
    series_ids: dict[str, tuple[int, int]] = {}  # series UID -> (series id, study id)
    new_rows: list[dict[str, Any]] = []
    counts: dict[tuple[int, int], list[Any]] = {}  # (series id, study id) -> [count, last time]
    for arrival in arrivals:
        ds, stored = arrival.header, arrival.stored
        uid = ds.SOPInstanceUID
        row = existing.get(uid)
        if row is not None:
            if row["sha256"] == stored.sha256:
                arrival.outcome = "same"
            elif policy == "keep_first":
                arrival.outcome, arrival.kept_relpath = "kept_first", row["path"]
            else:
                arrival.outcome, arrival.old_relpath = "replaced", row["path"]
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
    for (series_pk, study_pk), (n, last) in counts.items():
        conn.execute(_UPDATE_SERIES_COUNT, {"pk": series_pk, "n": n, "t": last})
        total = per_study.setdefault(study_pk, [0, last])
        total[0] += n
        total[1] = max(total[1], last)
    for study_pk, (n, last) in per_study.items():
        conn.execute(_UPDATE_STUDY_COUNT, {"pk": study_pk, "n": n, "t": last})


def _series_of(conn: Connection, arrival: Arrival) -> tuple[int, int]:
    """(series id, study id) of an arrival's series, creating patient, study and series rows."""
    ds, now = arrival.header, arrival.received_at
    row = conn.execute(_SELECT_SERIES, {"uid": ds.SeriesInstanceUID}).first()
    if row is not None:
        return row.id, row.study_pk
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
        ),
    )
    return series_pk, study_pk


def begin_write(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        # Take the write lock up front so concurrent receivers never race on get-or-create.
        conn.execute(text("BEGIN IMMEDIATE"))
