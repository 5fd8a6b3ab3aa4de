"""Query/Retrieve SCU against a real PACS (Orthanc) holding a study the node has never seen."""

from __future__ import annotations

import pydicom
import pytest
from pydantic import ValidationError
from sqlalchemy import delete, select

from node.core.db import engine_for, session_scope
from node.core.settings import Settings
from node.index import Instance, Study
from node.workflow.retrieve import find_prior_studies, retrieve_study, stop_retrieval_stores
from tests.results.peers import Orthanc
from tests.workflow.conftest import local_settings, push_to_orthanc, source_of


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


def test_the_most_recent_earlier_study_of_the_patient_is_found_as_a_prior(
    tmp_path, pacs, study_in_pacs, priors_in_pacs
):
    study_uid, _ = study_in_pacs
    earlier, later = priors_in_pacs
    settings = local_settings(tmp_path, [source_of(pacs, "c-get")])
    try:
        assert retrieve_study(settings, study_uid, "orthanc").ok
        priors = find_prior_studies(settings, study_uid, "orthanc")
        assert [p.study_uid for p in priors] == [earlier]  # the later study is no prior
        assert retrieve_study(settings, earlier, "orthanc").state == "retrieved"
    finally:
        stop_retrieval_stores()


def test_c_get_of_a_partly_held_study_fetches_only_the_missing_instances(tmp_path, pacs, study_in_pacs):
    study_uid, uids = study_in_pacs
    settings = local_settings(tmp_path, [source_of(pacs, "c-get")])
    try:
        assert retrieve_study(settings, study_uid, "orthanc").ok
        with session_scope(engine_for(settings.database.url)) as s:  # the node lost three of them
            s.execute(delete(Instance).where(Instance.sop_instance_uid.in_(uids[:3])))
        outcome = retrieve_study(settings, study_uid, "orthanc")
        assert (outcome.state, outcome.held_before, outcome.completed) == ("retrieved", len(uids) - 3, 3)
        assert sorted(indexed(settings)) == uids
    finally:
        stop_retrieval_stores()


def test_unknown_study_and_unknown_source_are_named(tmp_path, pacs):
    settings = local_settings(tmp_path, [source_of(pacs, "c-get")])
    outcome = retrieve_study(settings, "1.2.3.4", "orthanc")
    assert (outcome.ok, outcome.error) == (False, "source orthanc holds no instance of study 1.2.3.4")
    outcome = retrieve_study(settings, "1.2.3.4", "elsewhere")
    assert outcome.error == "unknown source 'elsewhere' (known: orthanc)"
    assert indexed(settings) == {}


def test_a_source_that_does_not_know_the_node_says_so(tmp_path, pacs, study_in_pacs):
    study_uid, _ = study_in_pacs
    settings = local_settings(tmp_path, [source_of(pacs, "c-move")])
    settings.node.ae_title = "STRANGER"  # Orthanc has no modality with this AE title
    outcome = retrieve_study(settings, study_uid, "orthanc")
    assert not outcome.ok
    assert "STRANGER" in outcome.error, outcome.error


def test_wado_rs_brings_the_study_from_a_dicomweb_source(tmp_path, study_in_pacs):
    """The same study from Orthanc's DICOMweb plugin: QIDO-RS lists it, WADO-RS fetches each instance."""
    study_uid, uids = study_in_pacs
    web = Orthanc(tmp_path / "orthanc-web", dicomweb=True).start()
    try:
        push_to_orthanc(web, sorted((tmp_path / "ct").iterdir()))
        settings = local_settings(tmp_path, [{"name": "web", "method": "wado-rs", "url": web.dicomweb_url}])
        outcome = retrieve_study(settings, study_uid, "web")
        assert outcome.ok, outcome.error
        assert (outcome.method, outcome.completed, outcome.failed) == ("wado-rs", len(uids), 0)
        rows = indexed(settings)
        assert sorted(rows) == uids
        for uid, path in rows.items():
            ds = pydicom.dcmread(settings.storage.path / path)
            assert ds.SOPInstanceUID == uid and ds.pixel_array.shape == (48, 48)
        web.stop()
        down = retrieve_study(settings, study_uid, "web")
        assert down.error.startswith(f"source web ({web.dicomweb_url}) cannot be reached"), down.error
    finally:
        web.stop()
        stop_retrieval_stores()


def test_a_source_needs_the_address_its_method_uses():
    with pytest.raises(ValidationError, match="a c-move source needs ae_title, host, port"):
        Settings.model_validate({"sources": [{"name": "pacs"}]})
    with pytest.raises(ValidationError, match="a wado-rs source needs url"):
        Settings.model_validate({"sources": [{"name": "web", "method": "wado-rs"}]})
    with pytest.raises(ValidationError, match="source names must be unique"):
        Settings.model_validate({"sources": [{"name": "w", "method": "wado-rs", "url": "http://x"}] * 2})
