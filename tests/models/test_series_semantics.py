"""What a series is (a 3D volume, a cine, 2D images) and how its images are grouped, on real files
(pydicom's and pydicom-data's test images) and series made from them by changing the attributes
that tell images apart (position, echo, phase, trigger time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from workers.analysis.imaging import SeriesError, load_groups, load_series
from workers.analysis.registry import get_analysis

CT_SMALL = get_testdata_file("CT_small.dcm")  # a real axial CT image
MR_SMALL = get_testdata_file("MR_small.dcm")  # a real MR image (oblique-free axial)
EMRI = get_testdata_file("emri_small.dcm")  # a real enhanced MR: 10 frames of a 3D acquisition, no frame geometry
US_CINE = get_testdata_file("examples_ybr_color.dcm")  # a real ultrasound cine: 30 frames, Frame Time 33.3 ms
US_STILL = get_testdata_file("US1_UNCI.dcm")  # a real ultrasound still (no position)


def _series(src: str, folder: Path, changes: list[dict]) -> list[Path]:
    """Copies of one real image as a new series: each copy a new SOP Instance UID plus ``changes[i]``
    (``shift``: mm along the image's normal; other keys: DICOM keywords)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for i, change in enumerate(changes):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = len(changes) - i  # numbers run against any order the test means
        change = dict(change)
        shift = change.pop("shift", 0.0)
        if shift:
            cosines = np.asarray(ds.ImageOrientationPatient, dtype=float)
            normal = np.cross(cosines[:3], cosines[3:])
            ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(ds.ImagePositionPatient, float) + shift * normal]
        for keyword, value in change.items():
            setattr(ds, keyword, value)
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_two_copies_of_a_real_ct_image_at_one_position_are_neither_volume_nor_cine(tmp_path):
    volume = load_series(_series(CT_SMALL, tmp_path, [{}, {}]))
    assert volume.kind == "images" and volume.frame_time_s is None
    assert "share one position" in volume.note
    reason = get_analysis("ct-segmentation").accepts(volume)
    assert reason is not None and "3D volume" in reason and "share one position" in reason
    assert get_analysis("ejection-fraction").accepts(volume) is not None


def test_spatial_mr_stack_is_a_volume_not_a_cine(tmp_path):
    # Real MR pixels at 6 distinct positions 2 mm apart along the normal, written out of order.
    paths = _series(MR_SMALL, tmp_path, [{"shift": 2.0 * k} for k in (3, 0, 5, 1, 4, 2)])
    volume = load_series(paths)
    assert volume.kind == "volume" and volume.frame_time_s is None
    assert volume.spacing[0] == pytest.approx(2.0, abs=1e-3)
    z = [float(pydicom.dcmread(s.path).ImagePositionPatient[2]) for s in volume.sources]
    assert z == sorted(z) or z == sorted(z, reverse=True)
    reason = get_analysis("ejection-fraction").accepts(volume)
    assert reason is not None and "cine" in reason and "3D volume of 6 slices" in reason


def test_real_enhanced_mr_without_frame_geometry_or_time_is_not_a_cine():
    # emri_small: 10 frames of a 3D brain acquisition; once taken for a 2D+t cine (and an LVEF).
    volume = load_series([EMRI])
    assert volume.kind == "images" and volume.frame_time_s is None and volume.pixels.shape[0] == 10
    assert "cine" in get_analysis("ejection-fraction").accepts(volume)


def test_real_ultrasound_cine_and_a_temporal_mr_series_are_cines(tmp_path):
    cine = load_series([US_CINE])
    assert cine.kind == "cine" and cine.pixels.shape[0] == 30
    assert cine.frame_time_s == pytest.approx(1 / 30, rel=1e-3)
    # One MR plane over time: same position, Trigger Time 0, 40, ... ms, stored out of order.
    triggers = [120, 0, 200, 40, 160, 80]
    paths = _series(MR_SMALL, tmp_path, [{"TriggerTime": t} for t in triggers])
    volume = load_series(paths)
    assert volume.kind == "cine" and volume.frame_time_s == pytest.approx(0.040)
    assert [float(pydicom.dcmread(s.path).TriggerTime) for s in volume.sources] == sorted(triggers)


def test_multi_echo_mr_series_is_grouped_by_echo(tmp_path):
    changes = [
        {"shift": 3.0 * k, "EchoNumbers": echo, "EchoTime": te}
        for k in range(4)
        for echo, te in (("1", "12"), ("2", "80"))
    ]
    paths = _series(MR_SMALL, tmp_path, changes)
    groups = load_groups(paths)
    assert [(g.kind, g.pixels.shape[0], g.label) for g in groups] == [
        ("volume", 4, "echo 1 (TE 12)"),
        ("volume", 4, "echo 2 (TE 80)"),
    ]
    for group in groups:
        echoes = {str(pydicom.dcmread(s.path).EchoNumbers) for s in group.sources}
        assert len(echoes) == 1 and group.spacing[0] == pytest.approx(3.0, abs=1e-3)
    with pytest.raises(SeriesError, match="2 groups of images: echo 1"):
        load_series(paths)


def test_multi_phase_series_is_grouped_by_phase(tmp_path):
    changes = [{"shift": 5.0 * k, "TemporalPositionIdentifier": phase} for phase in (1, 2, 3) for k in range(3)]
    groups = load_groups(_series(CT_SMALL, tmp_path, changes))
    assert [(g.kind, g.pixels.shape[0], g.label) for g in groups] == [
        ("volume", 3, "phase 1"),
        ("volume", 3, "phase 2"),
        ("volume", 3, "phase 3"),
    ]


def test_a_radiograph_series_of_several_views_is_one_group_per_image(tmp_path):
    # Three real CR images (no Image Position: projections) in one series, as a PA and lateral
    # or repeated exposures arrive; once one 3-image group that the chest classifier refused.
    paths = _series(get_testdata_file("RG1_UNCI.dcm"), tmp_path, [{}, {}, {}])
    groups = load_groups(paths)
    assert [(g.kind, g.pixels.shape[0]) for g in groups] == [("images", 1)] * 3
    assert {g.sources[0].sop_instance_uid for g in groups} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
    }
    assert all(get_analysis("nodule-classification").accepts(g) is None for g in groups)
    # Images without position that differ in time stay one loop.
    loop = load_groups(_series(US_STILL, tmp_path / "loop", [{"TriggerTime": 40.0 * k} for k in range(8)]))
    assert [(g.kind, g.pixels.shape[0]) for g in loop] == [("cine", 8)]
