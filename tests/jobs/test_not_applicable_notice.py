"""A job the worker refuses (a real tibia radiograph sent to the chest radiograph model) ends not
applicable; a destination with ``notify_not_applicable`` gets a short SR saying so, one without
gets nothing. The SR passes dciodvfy and PixelMed's DicomSRValidator."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from node.core.db import database_session
from node.core.dicom import NODE_MANUFACTURER
from node.core.settings import Settings
from node.dispatch.table import Delivery
from node.index import Instance
from node.jobs import lifecycle
from node.jobs.table import INAPPLICABLE, Job
from tests.jobs.conftest import add_study
from tests.real_files import real_file
from tests.results.validators import dciodvfy_errors, sr_validator_errors
from workers.tasks import execute_job

STUDY = "1.2.826.0.1.3680043.8.498.14014"


def _destination(name: str, notify: bool) -> dict:
    return {"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "notify_not_applicable": notify}


def _refused_job(settings: Settings, destinations: list[str]) -> int:
    """A routed study of one real tibia radiograph (RG3), queued for the chest radiograph model."""
    study_pk = add_study(settings, study_uid=STUDY, modality="CR", instances=1, state="routed")
    ds = pydicom.dcmread(real_file("RG3_UNCI.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, f"{STUDY}.1", f"{STUDY}.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    stored = Path(settings.storage.path) / "rg3.dcm"
    ds.save_as(stored, enforce_file_format=True)
    with database_session(settings.database.url) as session:
        session.execute(update(Instance).where(Instance.sop_instance_uid == f"{STUDY}.1.1").values(path="rg3.dcm"))
        job = lifecycle.queue_job(
            session,
            settings,
            key=f"{STUDY}/chest-xr/nodule-classification",
            analysis="nodule-classification",
            params={"device": "cpu"},
            rule="chest-xr",
            destinations=destinations,
            study_pk=study_pk,
            study_uid=STUDY,
        )
        session.flush()
        return job.id


def _deliveries(settings: Settings) -> list[Delivery]:
    with database_session(settings.database.url) as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        for row in rows:
            session.expunge(row)
        return rows


@pytest.mark.parametrize("notify", [True, False])
def test_a_refused_job_sends_its_notice_only_where_asked(make_settings, notify):
    settings = make_settings(destinations=[_destination("pacs", notify), _destination("archive", False)])
    job_id = _refused_job(settings, ["pacs", "archive"])

    assert execute_job(settings, job_id) == INAPPLICABLE
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        assert job.state == INAPPLICABLE and "EXTREMITY" in job.error
    rows = _deliveries(settings)
    if not notify:
        assert rows == []
        return
    assert [(r.destination, r.kind) for r in rows] == [("pacs", "sr")]
    sr = pydicom.dcmread(rows[0].path)
    assert sr.StudyInstanceUID == STUDY and sr.Manufacturer == NODE_MANUFACTURER
    assert sr.ContentSequence[0].TextValue.startswith("Not analysed by nodule-classification")
    assert "EXTREMITY" in sr.ContentSequence[0].TextValue
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == f"{STUDY}.1"
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == f"{STUDY}.1.1"
    assert dciodvfy_errors(Path(rows[0].path)) == []
    assert sr_validator_errors(Path(rows[0].path)) == []
