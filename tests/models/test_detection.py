"""CT lesion detection: centres and boxes land on the lesions; held-out sensitivity and FPs."""

from __future__ import annotations

import numpy as np
import pytest

from workers.analysis import registry
from workers.analysis.imaging import load_series
from workers.analysis.models import detection
from workers.synthetic.phantoms import make_ct_phantom, write_ct_series

HELD_OUT = range(900_000, 900_010)  # never used for training (seeds < 100_000) or tuning (800_000+)


@pytest.mark.parametrize("orientation,order", [("axial", "shuffled"), ("sagittal", "reversed")])
def test_large_liver_lesion_is_found_where_it_is(tmp_path, orientation, order):
    phantom = make_ct_phantom(
        31337,
        shape=(40, 56, 56),
        spacing=(6.0, 6.5, 6.5),
        orientation=orientation,
        liver_lesions=(1, 1),
        lung_nodules=(0, 0),
        lesion_diameter_mm=(24.0, 28.0),
    )
    volume = load_series(write_ct_series(phantom, tmp_path, instance_order=order))
    findings = registry.run_analysis("ct-lesion-detection", volume, {"device": "cpu"})
    assert findings.kind == "detection"
    (lesion,) = phantom.anatomy.lesions
    centres = [volume.index_to_patient(d.center_kji)[0] for d in findings.detections]
    distances = [np.linalg.norm(c - lesion.center_mm) for c in centres]
    assert distances and min(distances) < lesion.diameter_mm / 2, (distances, lesion)
    best = findings.detections[int(np.argmin(distances))]
    assert best.label == "liver lesion" and 0.5 <= best.score <= 1.0
    lo, hi = np.asarray(best.box_kji[0]), np.asarray(best.box_kji[1])
    assert np.all(lo <= best.center_kji) and np.all(np.asarray(best.center_kji) <= hi)
    assert best.diameter_mm == pytest.approx(lesion.diameter_mm, rel=0.35)
    assert findings.model_sha256 and findings.algorithm_version == detection.VERSION


@pytest.mark.slow
def test_held_out_sensitivity_and_false_positives():
    """Lesions >= 10 mm on held-out phantoms of random geometry.

    Target: sensitivity >= 0.9 at <= 1 FP/study. Measured on 100 held-out phantoms (model card):
    0.902 at 0.91 FP/study. On these first 10: 0.952 at 1.8 (ten studies are too few for the FP
    rate), so the floors guard against regression.
    """
    metrics = detection.evaluate(HELD_OUT)
    print(metrics)
    assert metrics["lesions"] >= 10
    assert metrics["sensitivity"] >= 0.85, metrics
    assert metrics["fp_per_study"] <= 3.0, metrics
