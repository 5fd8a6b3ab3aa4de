"""The 2 mm lesion refinement pass: its patches cover every lesion the 4 mm pass finds, its labels
lie on the source grid, it runs on the CPU inside the ct-segmentation analysis, and
`ainode train lesion-refinement --quick` trains it. Its effect on held-out Dice (lesions up, organs
and false specks not worse) is checked with the segmentation's held-out tests in test_segmentation.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import train_quick
from workers.analysis import registry
from workers.analysis.contract import RunContext
from workers.analysis.findings import SourceFrame, Volume
from workers.analysis.imaging import load_series
from workers.analysis.models import lesion_refinement, segmentation
from workers.synthetic import phantoms


def _case(seed: int, make=phantoms.random_ct_phantom):
    """A phantom, its volume, the 4 mm pass's inputs, probabilities and source labels."""
    p = make(seed)
    volume = Volume(p.hu, p.affine, [SourceFrame("", "", Path("."))] * p.hu.shape[0], "", "", "", "CT")
    inputs = segmentation.preprocess(volume, {})
    probs = segmentation.infer(segmentation.load("cpu"), inputs, RunContext("cpu"))
    return p, volume, inputs, probs, segmentation.labels_on_source(volume, inputs, probs)


def _patches_saying(volume, probs, affine, kind: int) -> list[lesion_refinement.Patch]:
    """Patches at every candidate whose 'network' says ``kind`` (0: not a lesion) everywhere."""
    patches = [
        lesion_refinement.Patch(lesion_refinement.patch_affine(c))
        for c in lesion_refinement.candidate_centres(probs, affine)
    ]
    for p in patches:
        p.probs = np.zeros((3, *lesion_refinement.PATCH), np.float32)
        p.probs[kind] = 1.0
    return patches


def _lesion_rich(seed: int, orientation: str) -> phantoms.CTPhantom:
    return phantoms.make_ct_phantom(seed, orientation=orientation, liver_lesions=(2, 3), lung_nodules=(2, 3))


@pytest.mark.parametrize("seed,orientation", [(12_345, "axial"), (23_456, "oblique")])
def test_patches_cover_every_lesion_voxel_of_the_4mm_pass(seed, orientation):
    """A 2 mm pass that rejects every candidate leaves no lesion voxel: every source voxel the
    4 mm pass calls a lesion lies inside a patch. Elsewhere the labels do not change, and inside
    the patches former lesion voxels fall back to a non-lesion class of the 4 mm pass."""
    p, volume, inputs, probs, labels = _case(seed, lambda s: _lesion_rich(s, orientation))
    assert np.isin(labels, (6, 7)).any(), "the test phantom should have lesions"
    rejected = lesion_refinement.apply(
        volume, labels, probs, inputs["affine"], _patches_saying(volume, probs, inputs["affine"], 0)
    )
    assert not np.isin(rejected, (6, 7)).any()
    changed = rejected != labels
    assert np.isin(labels[changed], (6, 7)).all()  # only lesion voxels change ...
    assert np.isin(rejected[changed], (0, 1, 2, 3, 4, 5)).all()  # ... to a non-lesion class


def test_labels_come_from_the_patch_probabilities_on_the_source_grid():
    """A patch saying 'liver lesion' everywhere labels the source voxels inside its inner part
    (and only those) as liver lesion, whatever the source orientation."""
    p = phantoms.make_ct_phantom(7, shape=(30, 48, 48), spacing=(6.0, 6.5, 6.5), orientation="oblique")
    volume = Volume(p.hu, p.affine, [SourceFrame("", "", Path("."))] * 30, "", "", "", "CT")
    inputs = segmentation.preprocess(volume, {})
    probs = np.zeros((segmentation.N_CLASSES, *inputs["image"].shape[1:]), np.float32)
    probs[2] = 1.0  # "liver" everywhere
    centre = p.grid.patient_points()[15, 24, 24]
    patch = lesion_refinement.Patch(lesion_refinement.patch_affine(centre))
    patch.probs = np.zeros((3, *lesion_refinement.PATCH), np.float32)
    patch.probs[1] = 1.0
    labels = np.full(volume.pixels.shape, 2, np.uint8)
    out = lesion_refinement.apply(volume, labels, probs, inputs["affine"], [patch])
    inner_mm = (lesion_refinement.PATCH[0] - 2 * lesion_refinement.MARGIN) * lesion_refinement.SPACING_MM
    offset = np.abs(p.grid.patient_points() - centre).max(axis=-1)
    assert (out[offset < inner_mm / 2 - 0.1] == 6).all()
    assert (out[offset > inner_mm / 2 + 0.1] == 2).all()


def test_refinement_runs_on_cpu_inside_the_analysis(tmp_path):
    """The ct-segmentation analysis runs the 2 mm pass on the CPU on a small series with lesions;
    its lesion masks lie on the source grid."""
    phantom = phantoms.make_ct_phantom(
        12_345, shape=(36, 56, 56), spacing=(6.0, 6.5, 6.5), liver_lesions=(2, 2), lung_nodules=(2, 2)
    )
    volume = load_series(phantoms.write_ct_series(phantom, tmp_path))
    analysis = registry.get_analysis("ct-segmentation")
    models = registry.loaded_model(analysis, "cpu")
    assert models.refiner is not None, "the refinement weights ship with the model"
    inputs = analysis.preprocess(volume, {})
    raw = analysis.infer(models, inputs, RunContext("cpu"))
    assert raw["patches"] and all(p.probs.shape == (3, *lesion_refinement.PATCH) for p in raw["patches"])
    findings = registry.run_analysis("ct-segmentation", volume, {"device": "cpu"})
    lesions = [s for s in findings.segments if s.tracking_id in ("liver_lesion", "lung_nodule")]
    assert lesions and all(s.full_mask().shape == volume.pixels.shape for s in lesions)


def test_train_quick_smoke(tmp_path):
    out = tmp_path / "refine.pt"
    run = train_quick("lesion-refinement", out)
    assert '"steps"' in run.stdout
    net = lesion_refinement.build_network()
    net.load_state_dict(torch.load(out, weights_only=True))
