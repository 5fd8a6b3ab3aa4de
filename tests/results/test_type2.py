"""Sources that lack Type 2 attributes (absent, not empty) still get every result object.

highdicom reads patient and study attributes of the source as attributes (``src.PatientID``),
so a CT without them used to give no SEG, SR, KOS or GSPS at all. The writers now fill what the
source lacks, empty, on their in-memory copies; the objects must pass dciodvfy (and the SRs
DicomSRValidator) and carry the attributes present and empty.
"""

from __future__ import annotations

import pydicom
import pytest

from node.core.settings import CapabilityProfile
from tests.results.synthetic import detection_findings, segmentation_findings, volume_of, write_ct_series
from tests.results.validators import dciodvfy_errors, dsrdump, sr_validator_errors
from workers.results import ResultContext, write_results

ALL_PROFILES = [CapabilityProfile(), CapabilityProfile(seg=False, secondary_capture=True)]
# Type 2 attributes of the Patient and General Study modules, which every result object copies.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Type 2 attributes a modality may leave out, each removed on its own below.
TYPE2 = (
    *PATIENT_STUDY_TYPE2,
    "SeriesNumber",
    "Manufacturer",
    "InstanceNumber",
    "PositionReferenceIndicator",
    "SliceThickness",
)


def ct_without(folder, keywords) -> tuple:
    """A small synthetic CT whose files lack ``keywords``; (volume, paths)."""
    paths, hu, ids = write_ct_series(folder, shape=(6, 48, 48))
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    return volume_of(paths, hu, ids), paths


def write_all(volume, out) -> list:
    written = []
    for n, findings in enumerate([segmentation_findings(volume), detection_findings(volume)]):
        context = ResultContext(job_key=f"job-{n}", output_dir=out / str(n), destinations=ALL_PROFILES)
        written += write_results(findings, context)
    return written


# A SEG's Pixel Measures need a Slice Thickness (Type 1C) that a source without one cannot give;
# it is not guessed (see docs/conformance.md), so this is the one dciodvfy error such a SEG has.
SEG_WITHOUT_SLICE_THICKNESS = (
    "Error - </SharedFunctionalGroupsSequence(5200,9229)[1]/PixelMeasuresSequence(0028,9110)[1]"
    "/SliceThickness(0018,0050)> - Missing attribute for Type 1C Conditional - Module=<PixelMeasuresMacro>"
)


def check_objects(written, keywords) -> None:
    kinds = {obj.kind for obj in written}
    assert kinds == {"seg", "sr", "kos", "gsps", "sc", "derived"}
    for obj in written:
        errors = dciodvfy_errors(obj.path)
        if obj.kind == "seg" and "SliceThickness" in keywords:
            errors = [e for e in errors if e != SEG_WITHOUT_SLICE_THICKNESS]
        assert errors == [], (obj.kind, obj.path.name)
        ds = pydicom.dcmread(obj.path, stop_before_pixels=True)
        for keyword in PATIENT_STUDY_TYPE2:
            assert keyword in ds, (obj.kind, keyword)
        for keyword in set(keywords) & set(PATIENT_STUDY_TYPE2):
            # Filled empty, never invented (the accession number is not given by the job here).
            assert ds[keyword].is_empty, (obj.kind, keyword, ds[keyword].value)


def test_source_lacking_study_id_patient_id_and_name(tmp_path):
    """The reported case: a CT without StudyID, PatientID and PatientName."""
    keywords = ("StudyID", "PatientID", "PatientName")
    volume, paths = ct_without(tmp_path / "ct", keywords)
    written = write_all(volume, tmp_path / "out")
    check_objects(written, keywords)
    srs = [obj.path for obj in written if obj.kind == "sr"]
    assert len(srs) == 2
    for path in srs:
        errors = sr_validator_errors(path)
        assert errors == [], path
        sr = pydicom.dcmread(path)
        assert sr.PatientName == "" and sr.PatientID == "" and sr.StudyID == ""
        assert sr.PatientSex == "O" and sr.StudyDescription == "CT ABDOMEN"  # the rest still copied
    # The writers filled their copies; the stored source is as it was.
    for path in paths:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert not set(keywords) & set(source.dir())


@pytest.mark.parametrize("keyword", TYPE2)
def test_source_lacking_one_type2_attribute(tmp_path, keyword):
    volume, paths = ct_without(tmp_path / "ct", (keyword,))
    written = write_all(volume, tmp_path / "out")
    check_objects(written, (keyword,))
    if keyword == "SliceThickness":
        # The SR's image library describes the images without a slice thickness, not a made-up one.
        for obj in written:
            if obj.kind == "sr":
                errors = sr_validator_errors(obj.path)
                assert errors == [], obj.path
                text = dsrdump(obj.path)
                assert "Slice Thickness" not in text and "Horizontal Pixel Spacing" in text
    assert keyword not in pydicom.dcmread(paths[0], stop_before_pixels=True)


def test_values_the_source_has_are_kept(tmp_path):
    """Filling never overwrites: a source with the attributes keeps its values in every object."""
    volume, _ = ct_without(tmp_path / "ct", ())
    for obj in write_all(volume, tmp_path / "out"):
        ds = pydicom.dcmread(obj.path, stop_before_pixels=True)
        assert (ds.PatientID, ds.StudyID, str(ds.PatientName)) == ("PID-42", "S1", "Test^Phantom"), obj.kind
        assert (ds.StudyDate, ds.AccessionNumber, str(ds.ReferringPhysicianName)) != ("", "", ""), obj.kind
