"""Derived series from multi-frame sources: enhanced CT (a phantom written as one Enhanced CT
instance, and pydicom's vendor Enhanced CT test file) and an ultrasound cine. Validated with
dciodvfy; geometry and references checked by reading the objects back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.results.validators import dciodvfy_errors
from workers.analysis.findings import DerivedImage, Findings
from workers.analysis.imaging import load_series
from workers.analysis.registry import run_analysis
from workers.results import ResultContext, write_results
from workers.synthetic.dynamic import make_cine_set, write_us_multiframe
from workers.synthetic.enhanced import write_enhanced_ct
from workers.synthetic.phantoms import make_ct_phantom


def reconstruction(volume, pixels) -> Findings:
    return Findings(
        analysis="ct-denoise",
        algorithm_name="DenoiseNet",
        algorithm_version="1",
        model_sha256="2" * 64,
        volume=volume,
        kind="reconstruction",
        derived=[DerivedImage(pixels, "AI denoised", "denoised")],
    )


def write(findings, folder: Path) -> list[Path]:
    return write_results(findings, ResultContext(job_key="job-mf", output_dir=folder))


@pytest.fixture
def enhanced_ct(tmp_path):
    """An oblique phantom stored feet-first in frame order: frame n is not slice n of the volume."""
    phantom = make_ct_phantom(21, shape=(14, 64, 64), spacing=(5.0, 5.5, 5.5), orientation="oblique", descending=True)
    path = write_enhanced_ct(phantom, tmp_path / "ect.dcm")
    return path, load_series([path])


def test_enhanced_ct_phantom_source_is_valid_and_loads_like_the_single_frame_series(enhanced_ct):
    path, volume = enhanced_ct
    assert dciodvfy_errors(path) == []
    assert [s.frame_number for s in volume.sources] == list(range(14, 0, -1))


def test_derived_enhanced_ct_from_the_denoising_model(enhanced_ct, tmp_path):
    """The real pipeline: ct-denoising on an Enhanced CT gives one derived Enhanced CT instance,
    frame for frame, with zero dciodvfy errors, exact geometry and per-frame references."""
    path, volume = enhanced_ct
    source = pydicom.dcmread(path)
    findings = run_analysis("ct-denoising", volume, {"device": "cpu"})
    paths = write(findings, tmp_path / "out")
    assert len(paths) == 1
    assert dciodvfy_errors(paths[0]) == []
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == source.SOPClassUID and ds.NumberOfFrames == source.NumberOfFrames
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "FILTERED"]
    assert ds.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType[0] == "DERIVED"
    for n, (ours, theirs) in enumerate(
        zip(ds.PerFrameFunctionalGroupsSequence, source.PerFrameFunctionalGroupsSequence), 1
    ):
        assert (
            ours.PlanePositionSequence[0].ImagePositionPatient == theirs.PlanePositionSequence[0].ImagePositionPatient
        )
        ref = ours.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID and ref.ReferencedFrameNumber == n
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    evidence = ds.SourceImageEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (
        ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    back = load_series(paths)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    # Stored as the source stores (unsigned 16 bit, intercept -1024): values below -1024 HU clip.
    np.testing.assert_array_equal(back.pixels, np.clip(np.rint(findings.derived[0].pixels), -1024, 64511))
    assert not np.array_equal(back.pixels, volume.pixels)  # the model changed the images
    # Writing the job again gives the same object (idempotent delivery).
    again = write(findings, tmp_path / "again")
    assert pydicom.dcmread(again[0], stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID


def test_derived_from_a_vendor_enhanced_ct_adds_no_dciodvfy_error(tmp_path):
    """pydicom's eCT_Supplemental.dcm (2 frames, a perfusion map with per-frame positions): the
    derived object may only repeat the source's own error (its Rescale Type US, which dciodvfy
    does not accept in Enhanced CT: the units are the source's and stay true of the derived one)."""
    path = Path(get_testdata_file("eCT_Supplemental.dcm"))
    volume = load_series([path])
    paths = write(reconstruction(volume, volume.pixels * 0.5 + 10), tmp_path)
    assert len(paths) == 1
    source_errors = {e.split(" - ")[1] for e in dciodvfy_errors(path)}
    assert {e.split(" - ")[1] for e in dciodvfy_errors(paths[0])} <= source_errors
    back = load_series(paths)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    np.testing.assert_array_equal(back.pixels, np.rint(volume.pixels * 0.5 + 10))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert ds.ImageType[0] == "DERIVED" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"


def test_derived_ultrasound_cine(tmp_path):
    """A multi-frame source without functional groups: one derived instance, all frames, the whole
    source instance as its source image."""
    path = write_us_multiframe(make_cine_set(1, 5)[0], tmp_path / "us.dcm")
    volume = load_series([path])
    derived = np.clip(volume.pixels * 0.8 + 5, 0, 255)
    paths = write(reconstruction(volume, derived), tmp_path / "out")
    assert len(paths) == 1
    assert dciodvfy_errors(paths[0]) == []
    ds = pydicom.dcmread(paths[0])
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"] and ds.NumberOfFrames == len(volume.sources)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == volume.sources[0].sop_instance_uid
    assert "ReferencedFrameNumber" not in ds.SourceImageSequence[0]
    back = load_series(paths)
    np.testing.assert_array_equal(back.pixels, np.rint(derived))
    assert back.frame_time_s == pytest.approx(volume.frame_time_s)


def test_per_frame_rescale_is_kept_frame_by_frame(tmp_path):
    """Frames with their own Pixel Value Transformation: each derived frame is stored through its
    source frame's rescale, so the stored values stay in range and read back exactly."""
    from pydicom.dataset import Dataset

    path = write_enhanced_ct(make_ct_phantom(4, shape=(6, 32, 32), spacing=(5.0, 5.5, 5.5)), tmp_path / "e.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.int32) - 1024
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    intercepts = [-1024 - 100 * n for n in range(6)]
    for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = Dataset()
        item.RescaleIntercept, item.RescaleSlope, item.RescaleType = str(intercepts[n]), "1", "HU"
        group.PixelValueTransformationSequence = [item]
    ds.PixelData = (hu - np.array(intercepts)[:, None, None]).astype(np.uint16).tobytes()
    ds.save_as(path)
    volume = load_series([path])
    np.testing.assert_array_equal(volume.pixels, hu)
    paths = write(reconstruction(volume, volume.pixels + 5), tmp_path / "out")
    assert dciodvfy_errors(paths[0]) == []
    derived = pydicom.dcmread(paths[0])
    np.testing.assert_array_equal(derived.pixel_array.astype(np.int32), hu + 5 - np.array(intercepts)[:, None, None])
    np.testing.assert_array_equal(load_series(paths).pixels, hu + 5)
