"""Query/Retrieve SCU against a real PACS (Orthanc) holding a study the node has never seen."""

from __future__ import annotations

import pydicom
from sqlalchemy import select

from node.core.db import engine_for, session_scope
from node.index import Instance, Study
from node.workflow.retrieve import retrieve_study, stop_retrieval_stores
from tests.workflow.conftest import local_settings, source_of


def indexed(settings) -> dict[str, str]:
    """SOP Instance UID -> stored path of every indexed instance."""
    with session_scope(engine_for(settings.database.url)) as s:
        return dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())


def test_c_get_brings_every_instance_through_the_store_path(tmp_path, pacs, study_in_pacs):
    study_uid, uids = study_in_pacs
    settings = local_settings(tmp_path, [source_of(pacs, "c-get")])
    try:
        outcome = retrieve_study(settings, study_uid, "orthanc")
        assert outcome.ok, outcome.error
        assert (outcome.state, outcome.at_source, outcome.held_before) == ("retrieved", len(uids), 0)
        assert (outcome.completed, outcome.failed, outcome.warning, outcome.not_indexed) == (len(uids), 0, 0, 0)
        rows = indexed(settings)
        assert sorted(rows) == uids
        for uid, path in rows.items():  # stored as received: whole, readable files
            assert pydicom.dcmread(settings.storage.path / path).SOPInstanceUID == uid
        with session_scope(engine_for(settings.database.url)) as s:
            assert s.scalar(select(Study.calling_ae)) == pacs.aet  # the PACS recorded as the sender

        again = retrieve_study(settings, study_uid, "orthanc")  # everything held: nothing fetched
        assert (again.state, again.held_before, again.completed) == ("held", len(uids), 0)
    finally:
        stop_retrieval_stores()
