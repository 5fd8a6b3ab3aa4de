"""Diagnosis CNN: chest radiograph -> nodule probability (projection phantoms, DX writer, model, AUC)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
import torch

from tests.results.validators import dciodvfy_errors
from workers.analysis import imaging, registry
from workers.analysis.findings import Volume
from workers.analysis.models import classification as cls_model
from workers.synthetic import phantoms
from workers.synthetic.projection import (
    DX_FOR_PRESENTATION,
    Radiograph,
    add_nodule,
    attenuation_paths,
    expose,
    lung_thickness,
    projection_source,
    radiographs_of,
    write_dx,
)
from workers.training import classification as train_cls

HELD_OUT_SEED = 424_242  # training uses phantom seeds 10000-30999


@pytest.fixture(scope="module")
def model():
    return cls_model.load("cpu")


def test_analytic_nodule_equals_a_nodule_rendered_in_the_ct():
    """Adding the nodule in projection gives what projecting a CT with the nodule painted in gives."""
    rng = np.random.default_rng(7)
    anatomy = phantoms.make_anatomy(rng, liver_lesions=(0, 0), lung_nodules=(0, 0))
    lung = anatomy.organs["lung"][0]
    nodule = phantoms.Lesion("lung_nodule", lung.center, (10.0, 10.0, 10.0))
    spacing = (1.0, 1.0, 1.0)
    grid = phantoms.make_grid((60, 60, 60), spacing, "axial", center_mm=lung.center)
    without = phantoms.render(anatomy, grid, rng, noise_hu=0, supersample=False)
    with_nodule = phantoms.render(
        dataclasses.replace(anatomy, lesions=[nodule]), grid, rng, noise_hu=0, supersample=False
    )
    p0 = attenuation_paths(without.hu, spacing, 1.0)
    p1 = attenuation_paths(with_nodule.hu, spacing, 1.0)
    centre = np.unravel_index(np.argmax(p1 - p0), p0.shape)
    analytic = add_nodule(
        p0, centre[0], centre[1], 20.0, 1.0, nodule_hu=phantoms.HU["lung_nodule"], background_hu=phantoms.HU["lung"]
    )
    # Same total extra attenuation (the voxelised sphere's volume differs by a few per cent) ...
    assert (analytic - p0).sum() == pytest.approx((p1 - p0).sum(), rel=0.05)
    # ... and the same peak, at the centre: chord 20 mm of soft tissue replacing lung.
    assert (analytic - p0).max() == pytest.approx((p1 - p0).max(), rel=0.08)


def test_radiographs_have_ground_truth_and_bright_bone():
    hu, lung, spacing = projection_source(HELD_OUT_SEED)
    shots = radiographs_of(hu, lung, spacing, 12, np.random.default_rng(1))
    assert any(r.nodule for r in shots) and not all(r.nodule for r in shots)
    for r in shots:
        assert r.pixels.shape == (130, 190) and r.pixel_spacing_mm == 2.0
        assert bool(r.nodules) == r.nodule
    image = shots[0].pixels
    spine_col = image.shape[1] // 2
    assert image[60:100, spine_col - 3 : spine_col + 3].mean() > image[60:100, 40:50].mean()  # spine over soft tissue


def test_dx_is_valid_dicom(tmp_path):
    hu, lung, spacing = projection_source(HELD_OUT_SEED + 1)
    (shot,) = radiographs_of(hu, lung, spacing, 1, np.random.default_rng(2))
    path = write_dx(shot, tmp_path / "dx.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == DX_FOR_PRESENTATION and ds.Modality == "DX"
    assert dciodvfy_errors(path) == []


def test_registry_runs_it_on_stored_dx_and_separates_an_obvious_case(tmp_path):
    hu, lung, spacing = projection_source(HELD_OUT_SEED + 2)
    base = attenuation_paths(hu, spacing, 2.0)
    # A 22 mm nodule where the lung is thickest: an easy case for any working classifier.
    row, col = np.unravel_index(np.argmax(lung_thickness(lung, spacing, 2.0)), base.shape)
    rng = np.random.default_rng(11)
    with_nodule = Radiograph(
        pixels=expose(add_nodule(base, row, col, 22.0, 2.0), 3e4, rng), pixel_spacing_mm=2.0, nodule=True
    )
    without = Radiograph(pixels=expose(base, 3e4, rng), pixel_spacing_mm=2.0, nodule=False)
    p_yes = registry.run_analysis(
        "nodule-classification", imaging.load_series([write_dx(with_nodule, tmp_path / "yes.dcm")]), {"device": "cpu"}
    )
    p_no = registry.run_analysis(
        "nodule-classification", imaging.load_series([write_dx(without, tmp_path / "no.dcm")]), {"device": "cpu"}
    )
    (yes,), (no,) = p_yes.classifications, p_no.classifications
    assert yes.finding == ("27925004", "SCT", "Nodule") and p_yes.kind == "classification"
    assert len(p_yes.model_sha256) == 64
    assert yes.probability > no.probability
    assert not no.present


def test_wrong_modality_is_refused():
    volume = Volume(
        pixels=np.zeros((1, 64, 64), np.float32),
        affine=np.eye(4),
        sources=[],
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        frame_of_reference_uid="",
        modality="MR",
    )
    with pytest.raises(registry.AnalysisError, match="accepts DX, CR"):
        registry.run_analysis("nodule-classification", volume, {"device": "cpu"})


def test_roc_auc_matches_its_definition():
    assert cls_model.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert cls_model.roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


def test_platt_scaling_recovers_the_model_that_made_the_labels():
    rng = np.random.default_rng(3)
    logits = rng.normal(4.0, 3.0, 20_000)
    labels = rng.random(20_000) < 1 / (1 + np.exp(-(0.5 * logits - 2.0)))
    scale, offset = cls_model.fit_platt(logits, labels)
    assert scale == pytest.approx(0.5, abs=0.05) and offset == pytest.approx(-2.0, abs=0.15)


def test_calibration_error_of_a_perfect_and_a_confident_wrong_forecast():
    labels = np.array([0, 1] * 50)
    assert cls_model.calibration_error(np.full(100, 0.5), labels) == pytest.approx(0.0)
    assert cls_model.calibration_error(np.full(100, 0.99), labels) == pytest.approx(0.49)


@pytest.mark.slow
def test_held_out_auc_and_calibrated_probabilities(model):
    """Version 2.0.0 measures AUC 0.959 on 800 held-out radiographs (32 phantoms) and 0.929 on these
    240 of 4 other phantoms (see docs/models/nodule-classification.md); the floors sit about 0.05
    below what it measures here. A radiologist reads the probability in the SR, so it must mean what
    it says: expected calibration error 0.055 and Brier score 0.098 measured here."""
    shots = cls_model.training_radiographs(4, 60, seed=HELD_OUT_SEED)
    metrics = cls_model.evaluate(model, shots, cls_model.operating_threshold())
    print(metrics)
    assert metrics["auc"] >= 0.88, metrics
    assert metrics["specificity"] >= 0.8 and metrics["sensitivity"] >= 0.75, metrics
    assert metrics["calibration_error"] < 0.10 and metrics["brier"] < 0.14, metrics
    shipped = model.calibration
    try:
        model.calibration = (1.0, 0.0)
        raw = cls_model.evaluate(model, shots, 0.5)
    finally:
        model.calibration = shipped
    assert raw["auc"] == pytest.approx(metrics["auc"])  # calibration is monotonic


def test_training_target_is_a_disc_on_each_nodule():
    """The map's target marks each nodule where it is and as large as it is, on the 128 x 192 input grid."""
    shot = Radiograph(
        pixels=np.zeros((130, 190), np.float32),
        pixel_spacing_mm=2.0,
        nodule=True,
        nodules=[{"row": 65, "col": 47, "diameter_mm": 20.0}],
    )
    empty = Radiograph(pixels=np.zeros((130, 190), np.float32), pixel_spacing_mm=2.0, nodule=False)
    discs = train_cls.nodule_discs([shot, empty])
    assert discs.shape == (2, 128, 192) and discs[1].sum() == 0
    rows, cols = torch.nonzero(discs[0], as_tuple=True)
    assert abs(rows.float().mean() - 65 * 128 / 130) < 1 and abs(cols.float().mean() - 47.5 * 192 / 190) < 1
    radius_px = 10.0 / 2.0 * 128 / 130  # 10 mm radius at 2 mm pixels, rows scaled to the input grid
    assert discs[0].sum() == pytest.approx(np.pi * radius_px**2, rel=0.15)


def test_image_logit_ignores_the_border_and_single_pixels():
    nodule_map = torch.full((3, 128, 192), -5.0)
    nodule_map[0, 2, 100] = 9.0  # in the border ring: zero padding, never a nodule
    nodule_map[1, 60, 100] = 9.0  # one pixel alone is smoothed away to 1/9 of its excess
    nodule_map[2, 59:62, 99:102] = 9.0  # a blob
    logits = cls_model.image_logit(nodule_map)
    assert logits[0] == pytest.approx(-5.0)
    assert logits[1] == pytest.approx(-5.0 + 14.0 / 9)
    assert logits[2] == pytest.approx(9.0)


def test_periodic_validation_leaves_batchnorm_statistics_alone_and_training_resumes():
    """``train`` validates every 250 steps: in eval mode, so the validation images neither are normalised
    by their own batch statistics nor change BatchNorm's running averages (the checkpoint kept carries
    them), and the network is in training mode again afterwards."""
    torch.manual_seed(0)
    net = cls_model.NoduleClassifier()
    net.train()
    net(torch.randn(8, 2, 48, 48))  # running statistics away from their initial 0 / 1
    images = torch.randn(6, 2, 128, 192) * 3 + 1  # statistics unlike the training batch's
    labels = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    auc, logits = cls_model.validation_check(net, images, labels)
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # running_mean / running_var / num_batches_tracked
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    with torch.no_grad():
        expected = ((net(images)[0] + net(images.flip(3))[0]) / 2).double().numpy()
    assert np.allclose(logits, expected, atol=1e-5)  # the scores the deployed (eval-mode) network gives
    assert auc == pytest.approx(cls_model.roc_auc(expected, labels))
