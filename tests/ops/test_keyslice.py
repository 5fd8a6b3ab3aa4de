"""Key slices (dashboard study page and `ainode demo`): the largest lesion at its widest first.

Real result objects: the result writers write SEG, SR and KOS for known findings over a synthetic
CT series, and ``node.keyslice`` reads them back as the dashboard and the demo do.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.admin.keyslice import (
    WINDOW,
    Mark,
    StudyOverlay,
    detections_on,
    display_window,
    key_slices,
    overlay_from_files,
    render_png,
)
from tests.results.synthetic import LIVER, NODULE, volume_of, write_ct_series
from workers.analysis.findings import Detection, Findings, Segment
from workers.results import ResultContext, write_results

SHAPE = (24, 64, 64)
LESION = ("52988006", "SCT", "Lesion")


def ball(shape, centre, radius_px: float, radius_k: float) -> np.ndarray:
    k, j, i = np.indices(shape)
    return ((k - centre[0]) / radius_k) ** 2 + ((j - centre[1]) / radius_px) ** 2 + (
        (i - centre[2]) / radius_px
    ) ** 2 <= 1


def results_of(tmp_path: Path, findings_for) -> tuple[list[Path], list[Path]]:
    paths, hu, ids = write_ct_series(tmp_path / "ct", shape=SHAPE)
    volume = volume_of(paths, hu, ids)
    return paths, write_results(findings_for(volume), ResultContext(job_key="keyslice", output_dir=tmp_path / "out"))


def yellow_pixels(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return (rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 80)


def test_the_key_slice_shows_the_largest_lesion_at_its_widest_not_the_most_lesion_pixels(tmp_path: Path):
    # One large lesion centred on slice 15; three small ones on slice 7 with more lesion pixels in all.
    big = ball(SHAPE, (15, 44, 44), 6.5, 2.5)
    small = ball(SHAPE, (7, 14, 14), 4.5, 1.2) | ball(SHAPE, (7, 14, 46), 4.5, 1.2) | ball(SHAPE, (7, 46, 14), 4.5, 1.2)
    lesions = big | small
    liver = ball(SHAPE, (12, 32, 32), 28, 11) & ~lesions

    def findings(volume):
        return Findings(
            analysis="ct-organs",
            algorithm_name="Net",
            algorithm_version="1",
            model_sha256="0" * 64,
            volume=volume,
            kind="segmentation",
            segments=[
                Segment("liver", liver, LIVER, tracking_id="liver"),
                Segment("liver lesion", lesions, LESION, tracking_id="liver-lesion"),
            ],
        )

    images, results = results_of(tmp_path, findings)
    overlay = overlay_from_files(images, results)
    assert len(overlay.segments) == 2 and len(overlay.lesions) == 4
    per_slice = lesions.reshape(SHAPE[0], -1).sum(axis=1)
    assert int(np.argmax(per_slice)) == 7  # "most lesion pixels" would pick the three small ones...
    assert key_slices(overlay, 1) == [15]  # ...a radiologist wants the largest lesion, at its widest
    assert key_slices(overlay, 3)[:2] == [15, 7]
    assert len(detections_on(overlay, 7)) == 3 and len(detections_on(overlay, 15)) == 1
    # The picture boxes the lesion where it is (x, y = column, row; 512 px for 64 px: scale 8).
    box = yellow_pixels(render_png(overlay, 15))
    rows, cols = np.nonzero(box)
    assert box.sum() > 100 and 36 * 8 <= rows.mean() <= 52 * 8 and 36 * 8 <= cols.mean() <= 52 * 8


def test_detections_from_the_sr_are_drawn_and_the_largest_one_is_the_key_slice(tmp_path: Path):
    def findings(volume):
        def det(k, j0, i0, size, tracking_id):
            return Detection(
                "nodule",
                NODULE,
                (k, j0 + size / 2, i0 + size / 2),
                ((k, j0, i0), (k, j0 + size, i0 + size)),
                score=0.9,
                diameter_mm=size * 0.8,
                tracking_id=tracking_id,
            )

        return Findings(
            analysis="ct-nodules",
            algorithm_name="BoxNet",
            algorithm_version="1",
            model_sha256="1" * 64,
            volume=volume,
            kind="detection",
            detections=[
                det(4, 10, 10, 8, "small"),
                det(12, 30, 20, 20, "large"),
                Detection(
                    "nodule",
                    NODULE,
                    (20, 50.0, 50.0),
                    ((20, 50.0, 50.0), (20, 50.0, 50.0)),
                    score=0.6,
                    tracking_id="point",
                ),
            ],
        )

    images, results = results_of(tmp_path, findings)
    overlay = overlay_from_files(images, results)
    assert not overlay.segments and sorted(d.k for d in overlay.detections) == [4, 12, 20]
    assert key_slices(overlay, 3) == [12, 4, 20]
    ((label, (x0, y0, x1, y1)),) = detections_on(overlay, 12)
    assert label == "nodule" and x0 <= 20 < 40 <= x1 and y0 <= 30 < 50 <= y1
    assert yellow_pixels(render_png(overlay, 12)).sum() > 100
    assert not yellow_pixels(render_png(overlay, 0)).any()


def test_a_tie_goes_to_the_slice_with_more_findings_and_no_findings_means_the_middle():
    pixels = np.zeros((20, 32, 32), np.float32)
    overlay = StudyOverlay(pixels, [str(k) for k in range(20)])
    overlay.detections = [
        Mark(5, "nodule", (0, 0, 9, 9), 50.0),
        Mark(14, "nodule", (0, 0, 9, 9), 50.0),
        Mark(14, "nodule", (20, 20, 24, 24), 10.0),
    ]
    assert key_slices(overlay, 1) == [14]
    assert key_slices(StudyOverlay(pixels, [str(k) for k in range(20)])) == [10]
    # Organs only: the slice with the most segmented area.
    organ = np.zeros(pixels.shape, bool)
    organ[3:8, 5:20, 5:20] = True
    organ[6, 2:30, 2:30] = True
    overlay = StudyOverlay(pixels, [str(k) for k in range(20)], {1: ("liver", organ)})
    assert key_slices(overlay, 1) == [6]


def test_a_flat_speck_with_a_wider_cross_section_does_not_outrank_a_larger_lesion():
    """What the demo's phantom showed: false-positive specks on the first slice, one of them wider
    on that slice than the real liver lesion is on any; the lesion (by volume) is the key slice."""
    shape = (30, 64, 64)
    speck = np.zeros(shape, bool)
    speck[0, 5:10, 5:11] = True  # 30 pixels, all on slice 0
    lesion = ball(shape, (18, 40, 40), 3.0, 3.5)  # ~ 28 pixels at its widest, ~ 120 voxels
    overlay = StudyOverlay(
        np.zeros(shape, np.float32),
        [str(k) for k in range(shape[0])],
        {1: ("liver lesion", lesion), 2: ("lung nodule", speck)},
        spacing=(2.5, 0.8, 0.8),
    )
    widest = {
        m.label: m
        for lesion_marks in overlay.lesions
        for m in lesion_marks
        if m.area == max(x.area for x in lesion_marks)
    }
    assert widest["lung nodule"].area > widest["liver lesion"].area
    assert widest["liver lesion"].volume_mm3 > widest["lung nodule"].volume_mm3
    assert key_slices(overlay, 2) == [18, 0]


def test_a_real_radiograph_is_shown_in_its_own_window_not_the_ct_window():
    # RG1: a real chest CR (MONOCHROME1, Window 15000/30000, values to 2^15): the CT soft-tissue
    # window turned every pixel white.
    path = Path(get_testdata_file("RG1_UNCR.dcm"))
    overlay = overlay_from_files([path], [])
    grey = np.asarray(Image.open(io.BytesIO(render_png(overlay, 0, scale=1))).convert("L"))
    assert (grey == 255).mean() < 0.05, "the radiograph is saturated"
    assert grey.std() > 20, "the radiograph shows no contrast"
    # MONOCHROME1: the lungs (high values, little attenuation) are darker than the spine.
    rows, cols = grey.shape
    lung = grey[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    spine = grey[rows // 3 : rows // 2, cols // 2 - 10 : cols // 2 + 10].mean()
    assert lung < spine


def test_without_a_window_of_its_own_an_image_gets_its_modality_default():
    ct = Dataset()
    ct.Modality = "CT"
    assert display_window(ct, np.array([0.0, 3000.0])) == WINDOW
    other = Dataset()
    other.Modality = "DX"
    values = np.linspace(0, 4000, 1001)
    lo, hi = display_window(other, values)
    assert 0 < lo < 100 and 3900 < hi < 4000
