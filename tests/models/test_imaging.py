"""DICOM to volume: geometry, ordering, rescale, photometric, multi-frame, compression, refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as UID

from workers.analysis.imaging import (
    SeriesError,
    canonical_grid,
    load_groups,
    load_series,
    on_canonical_grid,
    resample_back,
    resample_to_grid,
)
from workers.analysis.registry import get_analysis
from workers.synthetic.phantoms import make_ct_phantom, write_ct_series

DATA_STORE = Path(__import__("data_store").__file__).parent / "data"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _stored_hu(hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """HU as the writer quantises them (stored = round((HU - intercept) / slope))."""
    return np.clip(np.round((hu - intercept) / slope), 0, 65535) * slope + intercept


def _sample_phantom_positions(volume, phantom) -> np.ndarray:
    """The loaded volume's values at the phantom's voxel centres (asserting they fall on voxels)."""
    kji = volume.patient_to_index(phantom.grid.patient_points().reshape(-1, 3))
    assert np.abs(kji - np.round(kji)).max() < 1e-3, "phantom voxels do not land on volume voxels"
    idx = np.round(kji).astype(int)
    return volume.pixels[idx[:, 0], idx[:, 1], idx[:, 2]].reshape(phantom.hu.shape)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("order", ["slice", "reversed", "shuffled"])
@pytest.mark.parametrize("descending", [False, True])
def test_geometry_every_orientation_and_order(tmp_path, orientation, order, descending):
    phantom = make_ct_phantom(
        7, shape=(12, 24, 24), spacing=(6.0, 7.0, 7.0), orientation=orientation, descending=descending
    )
    paths = write_ct_series(phantom, tmp_path, instance_order=order, seed=3)
    volume = load_series(paths)
    assert volume.pixels.shape == phantom.hu.shape
    assert np.allclose(np.sort(volume.spacing), np.sort(phantom.grid.spacing), atol=1e-4)
    values = _sample_phantom_positions(volume, phantom)
    np.testing.assert_array_equal(values, _stored_hu(phantom.hu))
    # Slices are in geometric order: consecutive sources are one step apart along the normal.
    positions = np.array([pydicom.dcmread(s.path).ImagePositionPatient for s in volume.sources], dtype=float)
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    np.testing.assert_allclose(steps, volume.spacing[0], rtol=1e-4)
    # The affine maps voxel (k, 0, 0) onto each source's Image Position (Patient).
    mapped = volume.index_to_patient(
        np.c_[np.arange(len(positions)), np.zeros(len(positions)), np.zeros(len(positions))]
    )
    np.testing.assert_allclose(mapped, positions, atol=1e-3)


def test_rescale_slope_intercept(tmp_path):
    phantom = make_ct_phantom(1, shape=(4, 16, 16))
    volume = load_series(write_ct_series(phantom, tmp_path, rescale=(0.5, -2048.0)))
    np.testing.assert_array_equal(_sample_phantom_positions(volume, phantom), _stored_hu(phantom.hu, 0.5, -2048.0))


@pytest.mark.parametrize("syntax", [UID.RLELossless, UID.JPEG2000Lossless, UID.JPEGLSLossless])
def test_compressed_series_decode_exactly(tmp_path, syntax):
    phantom = make_ct_phantom(2, shape=(4, 32, 32))  # OpenJPEG needs at least 32 pixels for its levels
    plain = load_series(write_ct_series(phantom, tmp_path / "plain"))
    packed = load_series(write_ct_series(phantom, tmp_path / "packed", transfer_syntax=syntax))
    assert pydicom.dcmread(packed.sources[0].path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(plain.pixels, packed.pixels)


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="DCMTK dcmcjpeg not installed")
def test_jpeg_lossless_from_dcmtk(tmp_path):
    phantom = make_ct_phantom(2, shape=(3, 24, 24))
    paths = write_ct_series(phantom, tmp_path / "plain")
    out = []
    for p in paths:
        target = tmp_path / f"jpeg_{p.name}"
        subprocess.run(["dcmcjpeg", "+e1", str(p), str(target)], check=True, capture_output=True)
        out.append(target)
    assert pydicom.dcmread(out[0]).file_meta.TransferSyntaxUID == UID.JPEGLosslessSV1
    np.testing.assert_array_equal(load_series(paths).pixels, load_series(out).pixels)


def test_test_files_in_every_transfer_syntax_agree():
    names = [
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_big_endian.dcm",
    ]
    volumes = [load_series([DATA_STORE / n]) for n in names]
    assert volumes[0].pixels.shape == (10, 64, 64)
    for v in volumes[1:]:
        np.testing.assert_array_equal(v.pixels, volumes[0].pixels)
    assert [s.frame_number for s in volumes[0].sources] == list(range(1, 11))


def test_enhanced_ct_uses_per_frame_geometry_and_rescale():
    path = DATA_STORE / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    assert volume.pixels.shape[0] == int(ds.NumberOfFrames)
    positions = [
        np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    for k, source in enumerate(volume.sources):
        np.testing.assert_allclose(volume.index_to_patient([k, 0, 0])[0], positions[source.frame_number - 1], atol=1e-3)
    assert volume.pixels.min() == -1024  # rescale intercept applied


def test_ultrasound_cine_keeps_frame_order_and_time():
    volume = load_series([DATA_STORE / "color3d_jpeg_baseline.dcm"])
    assert volume.pixels.shape == (120, 480, 640)
    assert volume.frame_time_s == pytest.approx(1 / 30, rel=1e-3)
    assert [s.frame_number for s in volume.sources] == list(range(1, 121))


def test_monochrome1_is_inverted_for_projection_images():
    path = DATA_STORE / "RG3_UNCR.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    volume = load_series([path])
    top = 2 ** int(ds.BitsStored) - 1
    np.testing.assert_allclose(volume.pixels[0], top - ds.pixel_array.astype(np.float32))


def test_missing_optional_attributes(tmp_path):
    phantom = make_ct_phantom(3, shape=(5, 16, 16))
    paths = write_ct_series(phantom, tmp_path, rescale=(1.0, 0.0))
    for p in paths:
        ds = pydicom.dcmread(p)
        for keyword in ("SliceThickness", "RescaleSlope", "RescaleIntercept", "InstanceNumber", "WindowCenter"):
            delattr(ds, keyword)
        ds.save_as(p)
    volume = load_series(paths)
    np.testing.assert_array_equal(_sample_phantom_positions(volume, phantom), _stored_hu(phantom.hu, 1.0, 0.0))


def test_uneven_spacing_is_not_a_volume_and_says_why(tmp_path):
    paths = write_ct_series(make_ct_phantom(4, shape=(8, 16, 16)), tmp_path)
    paths[3].unlink()
    volume = load_series([p for p in paths if p.exists()])
    assert volume.kind == "images" and "uneven slice spacing" in volume.note
    assert "uneven slice spacing" in get_analysis("ct-segmentation").accepts(volume)


def test_duplicates_mixed_series_and_localizers(tmp_path):
    paths = write_ct_series(make_ct_phantom(4, shape=(4, 16, 16)), tmp_path / "a")
    dup = tmp_path / "dup.dcm"
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = UID.generate_uid()
    ds.save_as(dup)
    # A repeated position with nothing to tell the two images apart: 2D images, not a volume.
    volume = load_series([*paths, dup])
    assert volume.kind == "images" and "share a position" in volume.note
    other = write_ct_series(make_ct_phantom(4, shape=(4, 16, 16)), tmp_path / "b")
    with pytest.raises(SeriesError, match="2 different series"):
        load_series([*paths, *other])
    tilted = write_ct_series(
        make_ct_phantom(4, shape=(4, 16, 16), orientation="coronal"),
        tmp_path / "c",
        series_uid=str(pydicom.dcmread(paths[0]).SeriesInstanceUID),
    )
    # A localizer in the series is a group of its own; the axial stack stays a volume.
    with pytest.raises(SeriesError, match="2 groups of images: Image Orientation"):
        load_series([*paths, tilted[0]])
    stack, localizer = load_groups([*paths, tilted[0]])
    assert (stack.kind, stack.pixels.shape[0], localizer.kind, localizer.pixels.shape[0]) == ("volume", 4, "images", 1)
    assert stack.label != localizer.label and "Image Orientation (Patient)" in localizer.label
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(SeriesError, match="not a readable DICOM file"):
        load_series([bad])


def test_canonical_grid_round_trip_keeps_labels(tmp_path):
    """Resampling to the axis-aligned working grid and back puts labels on the same voxels."""
    phantom = make_ct_phantom(5, shape=(20, 40, 40), spacing=(4.0, 4.0, 4.0), orientation="sagittal", descending=True)
    volume = load_series(write_ct_series(phantom, tmp_path))
    truth = np.stack([phantom.labels == 2]).astype(np.float32)  # liver, on the phantom grid = volume grid
    truth_vol = np.zeros_like(volume.pixels)
    kji = np.round(volume.patient_to_index(phantom.grid.patient_points().reshape(-1, 3))).astype(int)
    truth_vol[kji[:, 0], kji[:, 1], kji[:, 2]] = truth.ravel()
    volume.pixels = truth_vol
    shape, affine = canonical_grid(volume, 2.0)
    work = resample_to_grid(volume, shape, affine, order=1, fill=0.0)
    back = resample_back(volume, affine, work, order=1) > 0.5
    agreement = (back == (truth_vol > 0.5)).mean()
    assert agreement > 0.995


def test_canonical_grid_sampled_once_per_volume(tmp_path):
    """The intended-use check and the model's preprocessing share one sampling of the 4 mm grid."""
    phantom = make_ct_phantom(6, shape=(20, 40, 40), spacing=(4.0, 3.0, 3.0))
    volume = load_series(write_ct_series(phantom, tmp_path))
    values, shape, affine = on_canonical_grid(volume, 4.0, fill=-1024.0)
    want_shape, want_affine = canonical_grid(volume, 4.0)
    assert shape == want_shape and np.array_equal(affine, want_affine)
    assert np.array_equal(values, resample_to_grid(volume, want_shape, want_affine, order=1, fill=-1024.0))
    assert on_canonical_grid(volume, 4.0, fill=-1024.0)[0] is values
    assert not values.flags.writeable  # shared: nobody may change it under the other
    assert on_canonical_grid(volume, 2.0, fill=-1024.0)[0].shape != values.shape
    volume.pixels = volume.pixels + 100.0  # other pixels: sampled again
    assert np.allclose(
        on_canonical_grid(volume, 4.0, fill=-1024.0)[0][values > -1024.0], values[values > -1024.0] + 100.0
    )
