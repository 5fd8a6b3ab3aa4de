"""CT segmentation U-Net: runs on CPU, masks land on the ground truth in every orientation and
slice order, held-out Dice, and `ainode train segmentation --quick`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import train_quick
from workers.analysis import registry
from workers.analysis.imaging import load_series
from workers.analysis.models import lesion_refinement, segmentation
from workers.synthetic import phantoms
from workers.synthetic.phantoms import make_ct_phantom, write_ct_series

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT = range(900_000, 900_010)  # never used for training (seeds < 100_000) or tuning (800_000+)
ORGANS = ("lung", "liver", "spleen", "kidney", "spine")
GEOMETRY_DICE_FLOOR = 0.7


def _truth_on_volume(volume, phantom) -> np.ndarray:
    """The phantom's labels re-indexed onto the loaded volume through patient coordinates."""
    kji = np.round(volume.patient_to_index(phantom.grid.patient_points().reshape(-1, 3))).astype(int)
    truth = np.zeros(volume.pixels.shape, dtype=np.uint8)
    truth[kji[:, 0], kji[:, 1], kji[:, 2]] = phantom.labels.ravel()
    return truth


def test_runs_on_small_input_with_version_and_checksum(tmp_path):
    phantom = make_ct_phantom(3, shape=(10, 32, 32), spacing=(8.0, 10.0, 10.0))
    volume = load_series(write_ct_series(phantom, tmp_path))
    findings = registry.run_analysis("ct-segmentation", volume, {"device": "cpu"})
    assert findings.kind == "segmentation" and findings.segments
    assert all(s.full_mask().shape == volume.pixels.shape and s.full_mask().dtype == bool for s in findings.segments)
    # Both networks the result came from: the 4 mm U-Net and the 2 mm lesion pass, in that order.
    assert findings.model_sha256 == registry.file_sha256((segmentation.WEIGHTS, lesion_refinement.WEIGHTS))
    assert findings.model_sha256 != registry.file_sha256(segmentation.WEIGHTS)
    assert findings.algorithm_version == segmentation.VERSION
    liver = next(m for m in findings.measurements if m.segment_label == "liver")
    assert liver.unit[0] == "cm3" and isinstance(liver.value, float) and liver.value > 10
    assert set(findings.timings_s) == {"load_model", "preprocess", "inference", "postprocess"}


def test_segments_and_volumes_are_those_of_the_label_array(tmp_path):
    """postprocess's segments are exactly the labels present, and each volume is its voxel count
    times the voxel volume (the counting shortcut gives what mask.any()/mask.sum() gave)."""
    phantom = make_ct_phantom(5, shape=(24, 48, 48), spacing=(6.0, 6.0, 6.0))
    volume = load_series(write_ct_series(phantom, tmp_path))
    analysis = registry.get_analysis("ct-segmentation")
    inputs = analysis.preprocess(volume, {})
    raw = analysis.infer(registry.loaded_model(analysis, "cpu"), inputs, registry.RunContext("cpu"))
    labels = segmentation.refined_labels(volume, inputs, raw)
    out = analysis.postprocess(volume, inputs, raw, {})
    present = [name.replace("_", " ") for value, name in phantoms.LABELS.items() if (labels == value).any()]
    assert [s.label for s in out.segments] == present and len(present) >= 3
    assert all(s.mask is None and s.labels is out.segments[0].labels for s in out.segments)  # one array, no masks
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    for segment, measurement in zip(out.segments, out.measurements):
        value = next(v for v, n in phantoms.LABELS.items() if n.replace("_", " ") == segment.label)
        assert np.array_equal(segment.full_mask(), labels == value)
        # The per-slice counts postprocess hands over are those of the mask.
        assert np.array_equal(segment.slice_counts(), (labels == value).reshape(len(labels), -1).sum(axis=1))
        assert segment.slices() == [k for k in range(len(labels)) if (labels[k] == value).any()]
        assert measurement.segment_label == segment.label
        assert measurement.value == round(float((labels == value).sum()) * voxel_cm3, 2)


GEOMETRIES = [
    ("axial", False, "slice"),
    ("axial", True, "shuffled"),
    ("coronal", False, "reversed"),
    ("sagittal", True, "shuffled"),
    ("oblique", False, "shuffled"),
]


@pytest.mark.parametrize("orientation,descending,order", GEOMETRIES)
def test_predicted_mask_lands_on_ground_truth(tmp_path, orientation, descending, order):
    """The geometry test: one patient's anatomy, scanned in several orientations and stored in
    several slice orders; the predicted organs must cover the ground-truth voxels of each."""
    phantom = make_ct_phantom(
        424242, shape=(40, 56, 56), spacing=(6.0, 6.5, 6.5), orientation=orientation, descending=descending
    )
    volume = load_series(write_ct_series(phantom, tmp_path, instance_order=order, seed=1))
    truth = _truth_on_volume(volume, phantom)
    findings = registry.run_analysis("ct-segmentation", volume, {"device": "cpu"})
    masks = {s.tracking_id: s.full_mask() for s in findings.segments}
    dices = {}
    for value, organ in enumerate(ORGANS, start=1):
        assert organ in masks, f"{organ} not found in the {orientation} series"
        dices[organ] = segmentation.dice(masks[organ], truth == value)
    print(orientation, order, {k: round(v, 3) for k, v in dices.items()})
    # A mask on the wrong voxels (flipped axis, slices out of order) scores near 0; the floor is
    # set below the model's measured accuracy (docs/models/ct-segmentation.md), not at its target.
    assert min(dices.values()) >= 0.5, dices
    assert min(dices[o] for o in ("liver", "kidney")) >= GEOMETRY_DICE_FLOOR, dices
    # Most ground-truth liver and kidney voxels are covered by the predicted mask of that organ.
    for value, organ in ((2, "liver"), (4, "kidney")):
        covered = np.logical_and(masks[organ], truth == value).sum() / (truth == value).sum()
        assert covered >= 0.6, (organ, covered)  # a flipped or shifted mask covers ~0


@pytest.mark.slow
def test_held_out_dice():
    """Held-out phantoms (seeds never used in training) of random spacing and orientation."""
    metrics = segmentation.evaluate(HELD_OUT)
    print(metrics)
    # Floors ~0.05 under the measured values in docs/models/ct-segmentation.md (a regression guard);
    # every organ floor is also at or above the target of 0.90.
    floors = {"lung": 0.93, "liver": 0.92, "spleen": 0.91, "kidney": 0.91, "spine": 0.88}
    for organ, floor in floors.items():
        assert metrics["per_class"][organ] >= floor, (organ, metrics)
    # Lesions after the 2 mm refinement, pooled over the set's voxels and per phantom (measured
    # 0.881 / 0.948 pooled, 0.874 / 0.938 per phantom; the 4 mm pass alone 0.836 / 0.922 pooled).
    assert metrics["global"]["liver_lesion"] >= 0.83, metrics
    assert metrics["global"]["lung_nodule"] >= 0.90, metrics
    assert metrics["per_class"]["liver_lesion"] >= 0.82, metrics
    assert metrics["per_class"]["lung_nodule"] >= 0.89, metrics
    _refinement_keeps_organs_and_lesions(metrics)


def _refinement_keeps_organs_and_lesions(metrics: dict) -> None:
    """The 2 mm pass, against the 4 mm labels of the same run: lesion Dice per phantom not lower,
    organs unchanged (it only relabels voxels around lesion candidates), no new false specks."""
    before = metrics["before_refinement"]
    for name in ("liver_lesion", "lung_nodule"):
        assert metrics["per_class"][name] >= before["per_class"][name] - 0.01, (name, metrics)
        assert metrics["predicted_only"][name] <= before["predicted_only"][name], (name, metrics)
    for organ in ORGANS:
        assert metrics["per_class"][organ] >= before["per_class"][organ] - 0.005, (organ, metrics)


def test_train_quick_smoke(tmp_path):
    out = tmp_path / "seg.pt"
    run = train_quick("segmentation", out)
    assert '"steps"' in run.stdout
    net = segmentation.build_network()
    net.load_state_dict(torch.load(out, weights_only=True))
    unknown = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "no-such-model"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "segmentation" in unknown.stderr


@pytest.mark.slow
def test_held_out_dice_on_a_finer_grid():
    """Two held-out phantoms on 1.5-2.5 mm grids (``phantoms.clinical_ct_phantom``), where lesions
    span many voxels: organs and lesions both segmented (the card gives 40 such phantoms)."""
    metrics = segmentation.evaluate([900_001, 900_002], phantom=phantoms.clinical_ct_phantom)
    print(metrics)
    floors = {"lung": 0.93, "liver": 0.93, "spleen": 0.92, "kidney": 0.92, "spine": 0.83}  # measured - ~0.05
    for organ, floor in floors.items():
        assert metrics["per_class"][organ] >= floor, (organ, metrics)
    # After the 2 mm refinement: measured 0.956 / 0.966 pooled, 0.953 / 0.959 per phantom
    # (the 4 mm pass alone: 0.915 / 0.885 per phantom).
    assert metrics["global"]["liver_lesion"] >= 0.90, metrics
    assert metrics["global"]["lung_nodule"] >= 0.91, metrics
    assert metrics["per_class"]["liver_lesion"] >= 0.90, metrics
    assert metrics["per_class"]["lung_nodule"] >= 0.90, metrics
    _refinement_keeps_organs_and_lesions(metrics)


def test_clinical_phantom_grid_is_finer_and_covers_the_trunk():
    p = phantoms.clinical_ct_phantom(900_003)
    spacing = np.linalg.norm(p.affine[:3, :3], axis=0)  # |i|, |j|, |k|
    assert 1.5 <= spacing[0] <= 2.5 and 1.5 <= spacing[1] <= 2.5 and 2.0 <= spacing[2] <= 5.0
    assert p.hu.shape[1] * spacing[1] >= 355 and p.hu.shape[0] * spacing[2] >= 255
