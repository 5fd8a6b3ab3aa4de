"""The fast way back from the working grid to the source voxels gives the exact path's labels.

``imaging.argmax_on_source`` (a cell lookup where the 8 corners agree, float64 trilinear
interpolation only where they do not, in slabs) replaces ``resample_back(...).argmax(0)`` (scipy
``map_coordinates`` of every class probability at every source voxel) in the segmentation model.
The labels must be the same voxel for voxel, for axis-aligned and for oblique sources.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.analysis import external, imaging, registry
from workers.analysis.findings import SourceFrame, Volume
from workers.analysis.models import segmentation
from workers.synthetic.phantoms import make_ct_phantom


def _volume(pixels: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(pixels, affine, [SourceFrame("", "", Path("."))] * pixels.shape[0], "", "", "", "CT")


def _exact(volume: Volume, work_affine: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return imaging.resample_back(volume, work_affine, probs, order=1).argmax(axis=0)


def _axis_aligned_affine(rng: np.random.Generator) -> np.ndarray:
    """Source axes along the patient axes in a random order and direction, random steps and origin."""
    affine = np.eye(4)
    perm = rng.permutation(3)
    for s in range(3):
        affine[perm[s], s] = rng.choice([-1, 1]) * rng.uniform(0.7, 5.0)
    affine[:3, 3] = rng.uniform(-30, 30, 3)
    return affine


@pytest.mark.parametrize("seed", range(6))
def test_separable_path_equals_scipy_on_random_axis_aligned_grids(seed):
    """Random probabilities, source grids that reach past the working grid (edge clamping)."""
    rng = np.random.default_rng(seed)
    probs = rng.random((5, 9, 11, 13)).astype(np.float32)
    probs /= probs.sum(axis=0)
    work = np.eye(4)
    work[:3, :3] *= 4.0
    work[:3, 3] = rng.uniform(-40, -10, 3)
    volume = _volume(
        np.zeros((int(rng.integers(5, 30)), int(rng.integers(5, 40)), int(rng.integers(5, 40))), np.float32),
        _axis_aligned_affine(rng),
    )
    chunk = int(rng.integers(50, 5000))
    fast = imaging.argmax_on_source(volume, work, probs, chunk_voxels=chunk, threads=1)
    np.testing.assert_array_equal(fast, _exact(volume, work, probs))
    # Slabs shared by threads: the same labels.
    threaded = imaging.argmax_on_source(volume, work, probs, chunk_voxels=chunk, threads=3)
    np.testing.assert_array_equal(threaded, fast)


def _oblique_case(seed: int, channels: int, normalise: bool = True) -> tuple[Volume, np.ndarray, np.ndarray]:
    """An oblique phantom series, a 4 mm working grid over it and random class maps on that grid."""
    rng = np.random.default_rng(seed)
    probs = rng.random((channels, 10, 12, 12)).astype(np.float32)
    if normalise:
        probs /= probs.sum(axis=0)
    work = np.eye(4)
    work[:3, :3] *= 4.0
    work[:3, 3] = -20.0
    phantom = make_ct_phantom(5, shape=(18, 20, 22), spacing=(3.0, 2.2, 2.2), orientation="oblique", noise_hu=0)
    return _volume(phantom.hu, phantom.affine), work, probs


def test_oblique_path_matches_scipy_on_random_probabilities():
    volume, work, probs = _oblique_case(11, 4)
    fast = imaging.argmax_on_source(volume, work, probs, chunk_voxels=3000, threads=3)
    np.testing.assert_array_equal(fast, _exact(volume, work, probs))


@pytest.mark.parametrize("work_shape", [(1, 6, 7), (2, 1, 5), (3, 4, 2)])
def test_thin_working_grids(work_shape):
    """Working axes of one or two voxels (a single-slice series on the working grid)."""
    rng = np.random.default_rng(3)
    probs = rng.random((3, *work_shape)).astype(np.float32)
    work = np.eye(4)
    work[:3, :3] *= 4.0
    volume = _volume(np.zeros((4, 9, 10), np.float32), _axis_aligned_affine(rng))
    np.testing.assert_array_equal(imaging.argmax_on_source(volume, work, probs), _exact(volume, work, probs))


@pytest.mark.parametrize("orientation,descending", [("axial", False), ("coronal", True), ("oblique", False)])
def test_model_labels_fast_path_equal_exact_path(orientation, descending):
    """The trained model on a phantom: the labels of the fast path are those of the exact path."""
    phantom = make_ct_phantom(
        77, shape=(36, 80, 80), spacing=(3.0, 2.0, 2.0), orientation=orientation, descending=descending
    )
    volume = _volume(phantom.hu, phantom.affine)
    model = registry.loaded_model(registry.get_analysis(segmentation.NAME), "cpu")
    inputs = segmentation.preprocess(volume, {})
    probs = segmentation.infer(model, inputs, registry.RunContext("cpu"))
    exact = _exact(volume, inputs["affine"], probs)
    fast = segmentation.labels_on_source(volume, inputs, probs)
    assert fast.shape == exact.shape and fast.dtype == np.uint8
    assert len(np.unique(exact)) >= 4  # organs were found: the comparison covers boundaries
    np.testing.assert_array_equal(fast, exact)


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_configured_models_labels_equal_exact_path(output):
    """A hospital's own segmentation model (``generic``) resampled to its spacing: the fast labels
    are those of sampling every class map back and applying the arg-max or the threshold."""
    volume, work, probs = _oblique_case(21, 3, normalise=output == "softmax")
    fast = external.source_labels(volume, work, probs, output, threshold=0.6)
    back = imaging.resample_back(volume, work, probs, order=1)
    exact = (
        back.argmax(axis=0) if output == "softmax" else np.where(back.max(axis=0) >= 0.6, back.argmax(axis=0) + 1, 0)
    )
    assert len(np.unique(exact)) == (4 if output == "sigmoid" else 3)  # every label occurs
    np.testing.assert_array_equal(fast, exact)
