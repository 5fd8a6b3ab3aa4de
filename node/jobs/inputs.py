"""What a job analyses: its input instances as the index holds them, for the worker that runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from node.core.db import database_session
from node.core.settings import Settings
from node.index import NODE_OUTPUT, Instance, Series
from node.jobs.table import Job


@dataclass(frozen=True)
class InputInstance:
    """One input instance of a job: its series, its SOP Instance UID, its file in storage."""

    series_uid: str
    sop_instance_uid: str
    path: Path


def job_inputs(settings: Settings, job: Job) -> list[InputInstance]:
    """The job's input instances (its series, or the series of its study its rule selected), in
    series and instance order."""
    with database_session(settings.database.url) as session:
        query = select(Series.series_uid, Instance.sop_instance_uid, Instance.path).join(
            Series, Instance.series_pk == Series.id
        )
        if job.series_pk is not None:
            query = query.where(Series.id == job.series_pk)
        else:
            # The node's own results sent back by a PACS are never an input (index.NODE_OUTPUT).
            query = query.where(Series.study_pk == job.study_pk, Series.state != NODE_OUTPUT)
            selected = job.selected_series()
            if selected is not None:
                query = query.where(Series.series_uid.in_(selected))
        rows = session.execute(query.order_by(Series.id, Instance.instance_number, Instance.id)).all()
    return [InputInstance(s, u, Path(settings.storage.path) / p) for s, u, p in rows]
