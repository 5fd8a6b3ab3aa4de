"""A 2 mm second pass for liver lesions and lung nodules after the 4 mm segmentation U-Net.

The 4 mm working grid of ``segmentation.py`` is coarse for lesions of 6-15 mm. After that pass,
every lesion candidate (a connected component of liver-lesion or lung-nodule probability on the
working grid, generously thresholded) gets a 32-cubed patch of 2 mm isotropic voxels (64 mm) in
patient coordinates, centred on it and cut from the source series. A small MONAI U-Net sees the
patch's HU in two windows plus the 4 mm lesion probabilities resampled into it, and gives three
classes at 2 mm: not a lesion, liver lesion, lung nodule. At the source voxels inside a patch
(away from its 4 mm rim) its probabilities are sampled trilinearly and arg-maxed: lesion voxels
take its lesion label, the others the best non-lesion class of the 4 mm pass, so the masks still
lie exactly on the source images (``imaging.argmax_on_source``, as for the 4 mm pass).

Trained by ``workers.training.lesion_refinement`` (``ainode train lesion-refinement``) on patches
cut, exactly as at inference, around the candidates the shipped 4 mm network finds on segmentation
training series, with exact labels at the patch's voxel centres (``phantoms.labels_at``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage

from workers.analysis import imaging
from workers.analysis.findings import Volume
from workers.analysis.models.common import weights_dir
from workers.analysis.models.ct_input import intensity_channels
from workers.synthetic import phantoms

log = logging.getLogger(__name__)

WEIGHTS = weights_dir() / "lesion_refinement.pt"
SPACING_MM = 2.0
PATCH = (32, 32, 32)
MARGIN = 2  # patch voxels at each face left to the 4 mm pass: the network sees little context there
CHANNELS = (16, 32, 64)
LIVER, LUNG = phantoms.LESION_LABELS["liver_lesion"], phantoms.LESION_LABELS["lung_nodule"]
CLASSES = (0, LIVER, LUNG)  # refinement class -> segmentation label (0: not a lesion)
N_INPUTS = 4  # soft-tissue window, wide window, 4 mm liver-lesion and lung-nodule probability
THRESHOLD = 0.2  # lesion probability that makes a 4 mm voxel part of a candidate (generous)


@dataclass
class Patch:
    """One refinement patch: its 2 mm grid (axis-aligned, patient LPS) and class probabilities."""

    affine: np.ndarray  # (i, j, k, 1) -> patient mm
    probs: np.ndarray | None = None  # (3, *PATCH) float32: not lesion, liver lesion, lung nodule


def build_network(channels: tuple[int, ...] = CHANNELS):
    """The small 3D U-Net (MONAI) of the 2 mm pass: 4 inputs, 3 classes."""
    return UNet(
        spatial_dims=3,
        in_channels=N_INPUTS,
        out_channels=len(CLASSES),
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="instance",
    )


def load(device: str, weights: Path = WEIGHTS):
    """The trained refinement network on ``device`` (eval mode), or None when no weights exist."""
    if not Path(weights).exists():
        log.warning("lesion refinement weights not found at %s: 4 mm lesion labels only", weights)
        return None
    net = build_network()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.to(device).eval()


# --- candidates and patches -------------------------------------------------------------------


def candidate_centres(probs: np.ndarray, work_affine: np.ndarray, threshold: float = THRESHOLD) -> list[np.ndarray]:
    """Patch centres (patient mm) covering every lesion candidate of the 4 mm pass.

    A candidate is a 26-connected component of working-grid voxels whose liver-lesion or
    lung-nodule probability reaches ``threshold`` or whose arg-max is a lesion (so every source
    voxel the 4 mm pass would call a lesion lies in a patch). A candidate wider than a patch's
    inner part is covered by several patches.
    """
    lesion = (probs[LIVER] >= threshold) | (probs[LUNG] >= threshold) | np.isin(probs.argmax(0), (LIVER, LUNG))
    components, _ = ndimage.label(lesion, structure=np.ones((3, 3, 3)))
    spacing = float(np.linalg.norm(work_affine[:3, 0]))
    inner_mm = (PATCH[0] - 2 * MARGIN) * SPACING_MM
    centres = []
    for sl in ndimage.find_objects(components):
        if sl is None:
            continue
        # Box of the component plus one working voxel (the cells its source voxels fall in).
        lo = np.array([s.start - 1 for s in sl], dtype=float)  # (k, j, i)
        hi = np.array([s.stop for s in sl], dtype=float)
        per_axis = []
        for a in range(3):
            extent = (hi[a] - lo[a]) * spacing
            n = max(1, int(np.ceil(extent / (inner_mm - 8.0))))
            per_axis.append(np.linspace(lo[a], hi[a], 2 * n + 1)[1::2])  # centres of n equal slices
        for k in per_axis[0]:
            for j in per_axis[1]:
                for i in per_axis[2]:
                    centres.append((work_affine @ np.array([i, j, k, 1.0]))[:3])
    return centres


def patch_affine(centre_mm: np.ndarray) -> np.ndarray:
    """The 2 mm axis-aligned patch grid centred on a point (patient mm)."""
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * SPACING_MM
    affine[:3, 3] = np.asarray(centre_mm) - (np.asarray(PATCH[::-1]) - 1) / 2 * SPACING_MM
    return affine


def patch_inputs(volume: Volume, probs: np.ndarray, work_affine: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(4, *PATCH) network input: source HU (air outside the series) in the 4 mm pass's two windows
    (``ct_input.intensity_channels``),
    and its liver-lesion and lung-nodule probabilities, all sampled at the patch's voxel centres."""
    hu = imaging.resample_to_grid(volume, PATCH, affine, fill=-1024.0)
    lesion = [imaging.sample_on_grid(probs[c], work_affine, PATCH, affine, mode="nearest") for c in (LIVER, LUNG)]
    return np.concatenate([intensity_channels(hu), np.stack(lesion)]).astype(np.float32)


def refine(
    net, volume: Volume, probs: np.ndarray, work_affine: np.ndarray, device: str = "cpu", batch: int = 8
) -> list[Patch]:
    """Run the 2 mm network on a patch around every lesion candidate of the 4 mm pass."""
    patches = [Patch(patch_affine(c)) for c in candidate_centres(probs, work_affine)]
    for start in range(0, len(patches), batch):
        group = patches[start : start + batch]
        x = np.stack([patch_inputs(volume, probs, work_affine, p.affine) for p in group])
        with torch.inference_mode():
            out = torch.softmax(net(torch.from_numpy(x).to(device)).float(), dim=1).cpu().numpy()
        for p, o in zip(group, out):
            p.probs = o
    return patches


# --- labels on the source grid ----------------------------------------------------------------


def apply(
    volume: Volume, labels: np.ndarray, probs: np.ndarray, work_affine: np.ndarray, patches: list[Patch]
) -> np.ndarray:
    """Labels with the lesion decision of each patch at the source voxels inside it.

    Inside a patch's inner part (``MARGIN`` voxels from its faces) a source voxel is a lesion of
    the kind the 2 mm network's arg-max says (its probabilities sampled trilinearly at the voxel),
    and otherwise takes the 4 mm pass's best non-lesion class, so a lesion the 2 mm pass rejects
    falls back to its host organ. Outside every patch the 4 mm labels stay.
    """
    out = labels.copy()
    for patch in patches:
        box = _source_box(volume, patch.affine)
        if box is None:
            continue
        sub = _sub_volume(volume, box)
        inside = _inside_patch(sub, patch.affine)
        if not inside.any():
            continue
        lesion = imaging.argmax_on_source(sub, patch.affine, patch.probs)
        organs = _organs_on(sub, probs, work_affine)
        decided = np.where(lesion > 0, np.asarray(CLASSES, dtype=np.uint8)[lesion], organs)
        view = out[box]
        view[inside] = decided[inside]
    return out


def _source_box(volume: Volume, affine: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Source voxel index box (k, j, i slices) around a patch's inner part; None if it misses."""
    lo, hi = MARGIN - 0.5, PATCH[0] - MARGIN - 0.5
    corners = np.array([[i, j, k, 1.0] for i in (lo, hi) for j in (lo, hi) for k in (lo, hi)])
    ijk = (corners @ (np.linalg.inv(volume.affine) @ affine).T)[:, :3]
    first = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
    last = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, volume.pixels.shape[::-1])
    if np.any(last <= first):
        return None
    return tuple(slice(int(first[a]), int(last[a])) for a in (2, 1, 0))  # type: ignore[return-value]


def _sub_volume(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The part of a volume in an index box, with its own affine (only geometry is used)."""
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([box[2].start, box[1].start, box[0].start]) + volume.affine[:3, 3]
    return Volume(volume.pixels[box], affine, [], "", "", "", volume.modality)


def _inside_patch(sub: Volume, affine: np.ndarray) -> np.ndarray:
    """Source voxels whose centre lies in the patch's inner part."""
    to_patch = np.linalg.inv(affine) @ sub.affine
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in sub.pixels.shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ to_patch.T
    return np.all((ijk[..., :3] >= MARGIN - 0.5) & (ijk[..., :3] <= PATCH[0] - MARGIN - 0.5), axis=-1)


def _organs_on(sub: Volume, probs: np.ndarray, work_affine: np.ndarray) -> np.ndarray:
    """The 4 mm pass's arg-max over the non-lesion classes at a sub-volume's voxels, from the
    working-grid cells around it only (arg-maxing the whole grid per patch would cost more)."""
    shape = np.asarray(sub.pixels.shape)
    corners = np.array([[k, j, i] for k in (0, shape[0] - 1) for j in (0, shape[1] - 1) for i in (0, shape[2] - 1)])
    ijk = (np.c_[corners[:, ::-1], np.ones(8)] @ (np.linalg.inv(work_affine) @ sub.affine).T)[:, :3]
    work_shape = np.asarray(probs.shape[1:][::-1])  # (i, j, k)
    first = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, work_shape - 1)
    last = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, first + 1, work_shape)
    crop = (slice(None, LIVER), *(slice(int(first[a]), int(last[a])) for a in (2, 1, 0)))
    affine = work_affine.copy()
    affine[:3, 3] = work_affine[:3, :3] @ first.astype(float) + work_affine[:3, 3]
    return imaging.argmax_on_source(sub, affine, probs[crop])
