"""CT lesion detection: liver lesions and lung nodules as centres, boxes and scores.

The detector is the lesion-probability output of the segmentation U-Net (``segmentation.py``,
same weights): the learned probability of "liver lesion" plus "lung nodule" on the 4 mm working
grid is split into connected candidates; each candidate's score is its peak probability, its centre
the probability-weighted centroid, its box the candidate's extent, all mapped to source voxel
indices through the exact affines. Candidates below ``min_diameter_mm`` (default 4 mm) or
``min_score`` (default 0.5) are dropped.

Reference model for demonstration and pipeline verification, not for diagnosis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from workers.analysis import domain, intended
from workers.analysis.codes import codes_for
from workers.analysis.contract import Analysis, Outputs, RunContext
from workers.analysis.findings import Detection, SourceFrame, Volume
from workers.analysis.models import segmentation
from workers.analysis.models.common import CARDS
from workers.synthetic import phantoms

NAME = "ct-lesion-detection"
VERSION = "2.0.0"
CARD = CARDS / "ct-lesion-detection.md"
LIVER, LUNG = 6, 7
SITES = {LIVER: ("10200004", "SCT", "Liver"), LUNG: ("39607008", "SCT", "Lung")}


def candidates(
    probs: np.ndarray, affine: np.ndarray, min_score: float = 0.5, min_diameter_mm: float = 4.0
) -> list[dict]:
    """Lesion candidates on the working grid: centre/box in patient mm, score, kind, diameter."""
    lesion = probs[LIVER] + probs[LUNG]
    components, n = ndimage.label(lesion >= 0.5, structure=np.ones((3, 3, 3)))
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    found = []
    for index, sl in enumerate(ndimage.find_objects(components), start=1):
        if sl is None:
            continue
        mask = components[sl] == index
        weights = lesion[sl] * mask
        score = float(weights.max())
        diameter = float(2 * (mask.sum() * voxel_mm3 * 3 / (4 * np.pi)) ** (1 / 3))
        if score < min_score or diameter < min_diameter_mm:
            continue
        local = np.argwhere(mask)
        offset = np.array([s.start for s in sl])
        centre_kji = (local * weights[mask][:, None]).sum(axis=0) / weights[mask].sum() + offset
        lo, hi = local.min(axis=0) + offset - 0.5, local.max(axis=0) + offset + 0.5
        kind = LIVER if (probs[LIVER][sl] * mask).sum() >= (probs[LUNG][sl] * mask).sum() else LUNG
        found.append(
            {
                "centre_mm": _to_patient(affine, centre_kji[None])[0],
                "corners_mm": _to_patient(affine, _corners(lo, hi)),
                "score": score,
                "kind": kind,
                "diameter_mm": diameter,
            }
        )
    return sorted(found, key=lambda c: -c["score"])


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])


def _to_patient(affine: np.ndarray, kji: np.ndarray) -> np.ndarray:
    ijk1 = np.c_[kji[:, 2], kji[:, 1], kji[:, 0], np.ones(len(kji))]
    return (ijk1 @ affine.T)[:, :3]


def postprocess(volume: Volume, inputs: dict, probs: np.ndarray, params: dict) -> Outputs:
    """Detections in source voxel indices (centre, box) with score, kind and diameter."""
    out = Outputs()
    found = candidates(
        probs, inputs["affine"], float(params.get("min_score", 0.5)), float(params.get("min_diameter_mm", 4.0))
    )
    for n, c in enumerate(found, start=1):
        name = phantoms.LABELS[c["kind"]]
        _, finding_type = codes_for(name)
        box = volume.patient_to_index(c["corners_mm"])
        out.detections.append(
            Detection(
                label=name.replace("_", " "),
                finding_type=finding_type,
                center_kji=tuple(float(v) for v in volume.patient_to_index(c["centre_mm"])[0]),
                box_kji=(tuple(float(v) for v in box.min(axis=0)), tuple(float(v) for v in box.max(axis=0))),
                score=round(c["score"], 4),
                diameter_mm=round(c["diameter_mm"], 1),
                finding_site=SITES[c["kind"]],
                tracking_id=f"lesion-{n}",
            )
        )
    return out


def analyses() -> list[Analysis]:
    """The CT lesion detection analysis (discovered by the registry)."""
    return [
        Analysis(
            name=NAME,
            task="detection",
            modalities=("CT",),
            dimensionality="3d",
            algorithm_name="ainode CT lesion detector (U-Net lesion probability)",
            version=VERSION,
            load=segmentation.load,
            preprocess=segmentation.preprocess,
            infer=segmentation.infer,
            postprocess=postprocess,
            weights=segmentation.WEIGHTS,
            card=CARD,
            intended_use=intended.REFERENCE[NAME],
            image_check=domain.adult_trunk_ct,
            gpu_memory_bytes=1 << 30,
            description="liver lesions and lung nodules on CT: centres, boxes, scores",
            example=segmentation.example_series,
        )
    ]


def evaluate(seeds, device: str = "cpu", min_diameter_mm: float = 10.0) -> dict:
    """Sensitivity for lesions >= ``min_diameter_mm`` and false positives per study on held-out
    phantoms of random geometry. A detection hits a lesion when its centre lies within
    max(radius, 5 mm) of the lesion centre; detections that hit no lesion (of any size) are FPs."""
    model = segmentation.load(device)
    hits = total = fps = studies = 0
    misses = []
    for s in seeds:
        p = phantoms.random_ct_phantom(s)
        vol = Volume(p.hu, p.affine, [SourceFrame("", "", Path("."))] * p.hu.shape[0], "", "", "", "CT")
        inputs = segmentation.preprocess(vol, {})
        outs = postprocess(vol, inputs, segmentation.infer(model, inputs, RunContext(device)), {})
        centres = [vol.index_to_patient(d.center_kji)[0] for d in outs.detections]
        lesions = p.visible_lesions()
        matched = set()
        for lesion in lesions:
            tol = max(lesion.diameter_mm / 2, 5.0)
            near = [i for i, c in enumerate(centres) if np.linalg.norm(c - lesion.center_mm) <= tol]
            matched.update(near)
            if lesion.diameter_mm >= min_diameter_mm:
                total += 1
                if near:
                    hits += 1
                else:
                    misses.append(round(lesion.diameter_mm, 1))
        fps += len(centres) - len(matched)
        studies += 1
    return {
        "sensitivity": round(hits / total, 4) if total else None,
        "lesions": total,
        "fp_per_study": round(fps / studies, 3),
        "studies": studies,
        "missed_diameters_mm": misses,
    }
