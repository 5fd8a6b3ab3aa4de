"""Dynamic imaging RNN: EF from echo cine loops (phantoms, DICOM writer, model, accuracy)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from tests.helpers import train_quick
from tests.results.validators import dciodvfy_errors
from workers.analysis import imaging, registry
from workers.analysis.findings import Volume
from workers.analysis.models import ejection_fraction as ef_model
from workers.synthetic.dynamic import (
    US_MULTIFRAME_STORAGE,
    axis_shortening_for_ef,
    contraction,
    make_cine,
    make_cine_set,
    write_us_multiframe,
)

HELD_OUT_SEED = 987_654  # never used by training (training uses 1000-3000 + seed)


@pytest.fixture(scope="module")
def model():
    return ef_model.load("cpu")


def test_phantom_ground_truth_matches_its_volume_curve():
    rng = np.random.default_rng(5)
    for _ in range(20):
        loop = make_cine(rng)
        from_curve = 100 * (1 - loop.volumes_ml.min() / loop.volumes_ml.max())
        # Frames sample the cycle, so the sampled extremes sit within a point of the true ones.
        assert abs(from_curve - loop.ef_percent) < 1.5
        assert loop.frames.dtype == np.uint8 and loop.frames.shape == (32, 64, 64)
    s_a, s_b = axis_shortening_for_ef(0.6, 0.5)
    assert (1 - s_a) ** 2 * (1 - s_b) == pytest.approx(0.4, abs=1e-6)
    phase = np.linspace(0, 1, 101)
    c = contraction(phase, 0.35)
    assert c.min() >= 0 and c.max() <= 1 and c[0] == pytest.approx(0) and c[35] == pytest.approx(1)


def test_us_multiframe_is_valid_dicom(tmp_path):
    loop = make_cine(np.random.default_rng(1))
    path = write_us_multiframe(loop, tmp_path / "cine.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == US_MULTIFRAME_STORAGE and int(ds.NumberOfFrames) == 32
    assert np.array_equal(ds.pixel_array, loop.frames)
    assert dciodvfy_errors(path) == []


def test_registry_runs_it_on_a_stored_cine_and_codes_the_measurement(tmp_path):
    loop = make_cine(np.random.default_rng(HELD_OUT_SEED))
    volume = imaging.load_series([write_us_multiframe(loop, tmp_path / "cine.dcm")])
    assert volume.pixels.shape == (32, 64, 64) and volume.frame_time_s == pytest.approx(loop.frame_time_s, rel=1e-3)
    findings = registry.run_analysis("ejection-fraction", volume, {"device": "cpu"})
    assert findings.kind == "ejection_fraction" and len(findings.model_sha256) == 64
    assert findings.algorithm_version == ef_model.VERSION
    (m,) = findings.measurements
    assert m.name == ("10230-1", "LN", "Left ventricular Ejection fraction")
    assert m.unit == ("%", "UCUM", "%")
    assert 0 <= m.value <= 100
    assert abs(m.value - loop.ef_percent) < 12  # one loop: a loose check; accuracy is tested below


def test_model_accepts_other_frame_counts_and_sizes(model):
    loop = make_cine(np.random.default_rng(3), size=96, n_frames=40)
    ef, rel = ef_model.predict_ef(model, loop.frames)
    assert rel.shape == (40,) and 0 <= ef <= 100


def test_too_few_frames_or_wrong_modality_is_refused_clearly():
    volume = Volume(
        pixels=np.zeros((3, 64, 64), np.float32),
        affine=np.eye(4),
        sources=[],
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        frame_of_reference_uid="",
        modality="US",
        kind="cine",
    )
    with pytest.raises(registry.AnalysisError, match="at least 8 frames"):
        registry.run_analysis("ejection-fraction", volume, {"device": "cpu"})
    volume.modality = "CT"
    with pytest.raises(registry.AnalysisError, match="accepts US, MR"):
        registry.run_analysis("ejection-fraction", volume, {"device": "cpu"})


@pytest.mark.slow
def test_held_out_mae_within_five_ef_points(model):
    loops = make_cine_set(120, seed=HELD_OUT_SEED)
    metrics = ef_model.evaluate(model, loops)
    print(metrics)
    assert metrics["mae_ef_points"] <= 5.0, metrics
    assert metrics["pearson_r"] >= 0.9, metrics


def test_ainode_train_quick_reproduces_a_loadable_model(tmp_path):
    """`ainode train ejection-fraction --quick` runs the real training code end to end (few steps)."""
    import json

    train_quick("ejection-fraction", tmp_path / "ef.pt")
    metrics = json.loads((tmp_path / "ef.json").read_text())
    assert metrics["quick"] and metrics["test"]["n"] == 32
    trained = ef_model.load("cpu", tmp_path / "ef.pt")
    assert 0 <= ef_model.predict_ef(trained, make_cine(np.random.default_rng(0)).frames)[0] <= 100
