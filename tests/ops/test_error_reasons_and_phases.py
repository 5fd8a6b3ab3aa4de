"""What a hospital reads: job error reasons naming SOP Instance UIDs and attributes, log messages
without patient values, and a study's phase when only some of its results were delivered."""

from __future__ import annotations

from pathlib import Path

from node.admin.views import study_phase
from node.core.errors import describe_error
from node.dispatch.table import Delivery
from node.index import Study
from node.jobs.inputs import InputInstance
from node.jobs.table import Job
from workers.tasks import error_reason


def test_a_reason_names_the_sop_instance_not_the_stored_file_and_the_missing_attribute():
    job = Job(id=7, study_uid="1.2.3", series_uid="1.2.3.4")
    stored = Path("/store/ab/cd/3f9a0c1e2b.dcm")
    inputs = [InputInstance("1.2.3.4", "1.2.3.4.5", stored)]
    reason = error_reason(ValueError(f"{stored.name}: not a readable DICOM file"), job, inputs)
    assert reason == "ValueError: SOP Instance UID 1.2.3.4.5: not a readable DICOM file"
    missing = error_reason(AttributeError("'FileDataset' object has no attribute 'PixelSpacing'"), job, inputs)
    assert missing.startswith("study 1.2.3, series 1.2.3.4: attribute PixelSpacing missing")


def test_log_messages_keep_keywords_uids_and_tags_but_not_quoted_values():
    text = describe_error(ValueError("Invalid value 'Doe^John' for 'PatientName' (0010,0010) in '1.2.840.10008.1.2.1'"))
    assert "Doe^John" not in text
    assert "'PatientName'" in text and "(0010,0010)" in text and "'1.2.840.10008.1.2.1'" in text
    assert describe_error(KeyError()) == "KeyError: (no message)"


def test_a_study_with_delivered_results_and_a_failed_job_is_partial_not_failed():
    study = Study(study_uid="1.2.3", state="done")
    done = Job(id=1, state="succeeded")
    failed = Job(id=2, state="failed")
    delivered = Delivery(id=1, state="delivered")
    assert study_phase(study, [done, failed], [delivered]) == "partial"
    assert study_phase(study, [failed], []) == "failed"
    # A failed job superseded by a successful re-run no longer counts.
    rerun = Job(id=3, state="succeeded", supersedes_job_id=2)
    assert study_phase(study, [failed, rerun], [delivered]) == "delivered"
