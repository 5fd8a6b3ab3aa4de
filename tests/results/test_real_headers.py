"""Result writers over real headers nobody here wrote (pydicom's and pydicom-data's test files).

A chest CR with Pixel Spacing 0\\0 and no Imager Pixel Spacing (RG1), a CR with no spacing at all
(RG3), an Enhanced CT whose spacing is only in its functional groups (eCT_Supplemental), a CT
without Frame of Reference (693), an MR and a colour secondary capture: for each task a model
produces, the results are written and pass dciodvfy (and the SRs DicomSRValidator), or the task
is refused before inference with a reason naming the series and the attribute.
"""

from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.core.settings import Settings
from node.jobs.inputs import InputInstance
from node.jobs.table import Job
from tests.realdata.writers import TASKS, object_errors, source_errors, write_task
from tests.results.validators import dciodvfy_errors, sr_validator_errors
from workers.analysis.imaging import load_series
from workers.results import writable_reason
from workers.synthetic import phantoms
from workers.tasks import PermanentJobError, is_transient, run_model_job

# See tests/results/test_type2.py: a SEG over an image without Slice Thickness cannot fill Pixel
# Measures' Slice Thickness (Type 1C) and does not guess it (docs/conformance.md).
SEG_WITHOUT_SLICE_THICKNESS = "/PixelMeasuresSequence(0028,9110)[1]/SliceThickness(0018,0050)> - Missing attribute"

# file → tasks refused before inference, and the attribute the reason names.
CASES = {
    "RG1_UNCI.dcm": {"segmentation": "Pixel Spacing (0028,0030)", "detection": "Imager Pixel Spacing (0018,1164)"},
    "RG3_UNCR.dcm": {"segmentation": "Pixel Spacing (0028,0030)", "detection": "Imager Pixel Spacing (0018,1164)"},
    "eCT_Supplemental.dcm": {},
    "693_UNCI.dcm": {"segmentation": "Frame of Reference UID (0020,0052)"},
    "MR-SIEMENS-DICOM-WithOverlays.dcm": {},
    "SC_rgb.dcm": {},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_task_writes_valid_objects_or_is_refused(tmp_path, name):
    volume = load_series([get_testdata_file(name)])
    inherited = source_errors(volume)
    written = 0
    for task in TASKS:
        outcome = write_task(volume, task, tmp_path / task)
        refused = CASES[name].get(task)
        if refused:
            assert outcome.refused and refused in outcome.refused and volume.series_instance_uid in outcome.refused
            continue
        assert outcome.refused is None, outcome.refused
        assert outcome.objects, task
        for obj in outcome.objects:
            errors = [e for e in object_errors(obj, volume, inherited) if SEG_WITHOUT_SLICE_THICKNESS not in e]
            assert errors == [], (task, obj.kind)
            written += 1
    assert written


@pytest.mark.parametrize(
    ("name", "task"), [("RG1_UNCI.dcm", "classification"), ("eCT_Supplemental.dcm", "segmentation")]
)
def test_srs_of_real_headers_pass_dicom_sr_validator(tmp_path, name, task):
    """The reported crash: CR without Imager Pixel Spacing, Enhanced CT without top-level spacing."""
    volume = load_series([get_testdata_file(name)])
    outcome = write_task(volume, task, tmp_path)
    srs = [obj.path for obj in outcome.objects if obj.kind == "sr"]
    assert len(srs) == 1
    assert sr_validator_errors(srs[0]) == []
    sr = pydicom.dcmread(srs[0])
    text = str(sr)
    if name == "RG1_UNCI.dcm":
        # Pixel Spacing 0\0 is no spacing: the library entry leaves the spacing out.
        assert "Horizontal Pixel Spacing" not in text
    else:
        # The Enhanced CT's spacing comes from its functional groups.
        groups = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).SharedFunctionalGroupsSequence[0]
        spacing = groups.PixelMeasuresSequence[0].PixelSpacing
        assert "Horizontal Pixel Spacing" in text and f"{float(spacing[1]):g}" in text


def test_each_validator_fails_on_a_known_bad_file(tmp_path):
    """The validators are not blind: an SR without its Completion Flag (dciodvfy) and with a
    Procedure Reported outside CID 100 (DicomSRValidator; what CR reports used to say)."""
    volume = load_series([get_testdata_file("CT_small.dcm")])
    sr_path = next(obj.path for obj in write_task(volume, "classification", tmp_path).objects if obj.kind == "sr")
    assert dciodvfy_errors(sr_path) == []
    bad = tmp_path / "bad.dcm"
    shutil.copy(sr_path, bad)
    ds = pydicom.dcmread(bad)
    del ds.CompletionFlag
    procedure = next(it for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "121058")
    code = procedure.ConceptCodeSequence[0]
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "43468-8", "LN", "XR unspecified body region"
    ds.save_as(bad, enforce_file_format=True)
    assert any("CompletionFlag" in e for e in dciodvfy_errors(bad))
    assert any("not found in context group 100" in e for e in sr_validator_errors(bad))


def test_seg_without_frame_of_reference_fails_before_inference(tmp_path):
    """A SEG request on a CT volume (in the model's intended use) without Frame of Reference UID:
    refused by the job runner before the model runs, permanently, with a reason naming the series
    and the attribute. (A lone head CT image such as 693_UNCI is refused earlier, as not
    applicable: one image is no volume, and a head is no trunk.)"""
    files = phantoms.write_ct_series(phantoms.make_ct_phantom(7, shape=(24, 64, 64)), tmp_path / "ct")
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    job = Job(id=1, key="test/seg", analysis="ct-segmentation", params="{}", destinations="[]")
    inputs = [InputInstance(str(ds.SeriesInstanceUID), str(pydicom.dcmread(f).SOPInstanceUID), f) for f in files]
    with pytest.raises(PermanentJobError) as raised:
        run_model_job(Settings(storage={"path": str(tmp_path)}), job, inputs)
    assert "Frame of Reference UID (0020,0052)" in str(raised.value)
    assert str(ds.SeriesInstanceUID) in str(raised.value)
    assert not is_transient(raised.value)
    assert not (tmp_path / "results").exists()  # nothing was written


def test_enhanced_image_without_functional_groups_is_refused_for_derived_and_seg():
    volume = load_series([get_testdata_file("emri_small.dcm")])
    assert "Image Position (Patient) (0020,0032)" in writable_reason(volume, "segmentation")
    assert "(5200,9230)" in writable_reason(volume, "reconstruction")
    assert writable_reason(volume, "classification") is None
