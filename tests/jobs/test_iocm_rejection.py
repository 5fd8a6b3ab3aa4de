"""Issue 15, item 5: a re-run that supersedes delivered results withdraws them with an IHE IOCM
rejection note, against the node as deployed (`ainode serve`, embedded worker), DCMTK storescu,
Orthanc (rejection notes on) and a second storage SCP whose profile turns them off.

The re-run is the hospital's: the RIS corrects the patient's name and the modality sends the study
again with the same UIDs; the changed content gives the results new UIDs (a corrected re-send), so
the first results, wrong name and all, must be withdrawn where they were delivered.
"""

from __future__ import annotations

import io
import json

import pydicom
import pytest

from tests.helpers import wait_for
from tests.jobs.test_hospital_behaviour import finished, jobs_of, storescu, threshold_node
from tests.jobs.test_node_end_to_end import query
from tests.results.peers import Orthanc, StoreSCP
from tests.results.validators import dciodvfy_errors
from workers.synthetic import phantoms

pytestmark = pytest.mark.slow

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
RESULT_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.66.4",  # SEG
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    KOS,
]


def sop_uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def all_delivered(node, count: int) -> bool:
    rows = query(node, "SELECT state FROM deliveries")
    return len(rows) >= count and all(state == "delivered" for (state,) in rows)


def rejection_notes_in(orthanc: Orthanc) -> list[pydicom.Dataset]:
    notes = []
    for orthanc_id in orthanc.instances():
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        if ds.SOPClassUID == KOS and ds.ConceptNameCodeSequence[0].CodeValue == "113001":
            notes.append(ds)
    return notes


def evidence(ds: pydicom.Dataset) -> dict[str, set[str]]:
    """Series UID -> the SOP Instance UIDs of the Current Requested Procedure Evidence Sequence."""
    out: dict[str, set[str]] = {}
    for study in ds.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            out.setdefault(series.SeriesInstanceUID, set()).update(
                item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence
            )
    return out


def test_a_superseding_re_run_sends_a_rejection_note_of_exactly_the_superseded_results(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    scp = StoreSCP(RESULT_CLASSES, aet="NOIOCM").start()
    node = threshold_node(
        tmp_path,
        destinations=[
            {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            {
                "name": "viewer",
                "ae_title": scp.aet,
                "host": "127.0.0.1",
                "port": scp.port,
                "capabilities": {"rejection_notes": False},
            },
        ],
        rules=[
            {
                "name": "ct-threshold",
                "match": {"modality": "CT"},
                "analyses": ["threshold-test"],
                "destinations": ["pacs", "viewer"],
            }
        ],
    )
    series = tmp_path / "series"
    phantoms.write_ct_series(phantoms.make_ct_phantom(5, shape=(16, 32, 32)), series, patient_name="Wrong^Name")
    files = sorted(series.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        with node:
            storescu(node.port, files)
            assert wait_for(lambda: finished(node, study_uid), 300), node.log_text()[-4000:]
            [first_job] = jobs_of(node, study_uid)
            first = sop_uids(json.loads(first_job[4])["outputs"])
            assert first and wait_for(lambda: all_delivered(node, 2 * len(first)), 120), node.log_text()[-4000:]
            assert rejection_notes_in(orthanc) == []  # a first run supersedes nothing

            # The corrected re-send: same UIDs, changed content.
            for path in files:
                ds = pydicom.dcmread(path)
                ds.PatientName = "Right^Name"
                ds.save_as(path)
            storescu(node.port, files)
            assert wait_for(lambda: finished(node, study_uid, 2), 300), node.log_text()[-4000:]
            jobs = jobs_of(node, study_uid)
            assert [j[1] for j in jobs] == ["succeeded", "succeeded"] and jobs[1][5] == jobs[0][0]
            second = sop_uids(json.loads(jobs[1][4])["outputs"])
            assert second and first.isdisjoint(second)
            # Both destinations get the new results; only the PACS gets a note.
            assert wait_for(lambda: all_delivered(node, 2 * len(first) + 2 * len(second) + 1), 120), node.log_text()[
                -4000:
            ]
            rows = query(node, "SELECT id, destination, kind, sop_instance_uid, job_id FROM deliveries ORDER BY id")
            notes = [r for r in rows if r[2] == "rejection"]
            assert [(r[1], r[4]) for r in notes] == [("pacs", jobs[1][0])]
            [(note_row, _, _, note_uid, _)] = notes
            # Queued before the new results, so sent before (or with) them.
            assert all(note_row < r[0] for r in rows if r[4] == jobs[1][0] and r[2] != "rejection")
            assert {
                uid
                for (uid,) in query(node, "SELECT sop_instance_uid FROM deliveries WHERE rejected_by = :n", n=note_uid)
            } == first
            # The PACS holds the note: it lists exactly the superseded instances, by their series.
            assert wait_for(lambda: len(rejection_notes_in(orthanc)) == 1, 60)
            [note] = rejection_notes_in(orthanc)
            assert note.SOPInstanceUID == note_uid and note.StudyInstanceUID == study_uid
            title = note.ConceptNameCodeSequence[0]
            assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
                "113001",
                "DCM",
                "Rejected for Quality Reasons",
            )
            listed = evidence(note)
            assert set().union(*listed.values()) == first
            by_series = {}
            for path in json.loads(first_job[4])["outputs"]:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                by_series.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
            assert listed == by_series
            referenced = {
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for item in note.ContentSequence
                if item.ValueType in ("IMAGE", "COMPOSITE")
            }
            assert referenced == first
            # The note is about what the PACS holds: the rejected objects' own patient.
            assert str(note.PatientName) == "Wrong^Name"
            saved = tmp_path / "note.dcm"
            note.save_as(saved, enforce_file_format=True)
            assert dciodvfy_errors(saved) == []
            # The destination that turned rejection notes off received the results, no note.
            assert set(scp.received) == first | second
    finally:
        scp.stop()
        orthanc.stop()
    for text_ in (node.log_text(),):
        assert "Right^Name" not in text_ and "Wrong^Name" not in text_
