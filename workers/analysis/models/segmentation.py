"""CT organ and lesion segmentation: a small MONAI 3D U-Net trained on the project's phantoms.

Pipeline: the series is resampled onto an axis-aligned 4 mm grid (``imaging.canonical_grid``),
intensities go to two windows (soft tissue and wide), MONAI sliding-window inference gives class
probabilities, which are sampled back at every source voxel (trilinear) and arg-maxed, so the
label mask lies exactly on the source images whatever their orientation or slice order. A second
pass at 2 mm (``lesion_refinement.py``) then decides the lesion voxels around every lesion candidate.

Classes: ``phantoms.LABELS`` (lung, liver, spleen, kidney, spine, liver lesion, lung nodule).
Reference model for demonstration and pipeline verification, not for diagnosis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from workers.analysis import domain, imaging, intended
from workers.analysis.codes import codes_for
from workers.analysis.contract import Analysis, Outputs, RunContext
from workers.analysis.findings import Measurement, Segment, SourceFrame, Volume
from workers.analysis.models import lesion_refinement
from workers.analysis.models.common import CARDS, weights_dir
from workers.analysis.models.ct_input import WINDOWS, intensity_channels
from workers.synthetic import phantoms

log = logging.getLogger(__name__)

NAME = "ct-segmentation"
VERSION = "2.1.0"
WEIGHTS = weights_dir() / "ct_segmentation.pt"
CARD = CARDS / "ct-segmentation.md"
SPACING_MM = 4.0
N_CLASSES = 1 + len(phantoms.LABELS)
CHANNELS = (16, 32, 64, 128)
ROI = (64, 64, 64)


def build_network(channels: tuple[int, ...] = CHANNELS):
    """The 3D U-Net (MONAI): 2 input windows, one output channel per class."""
    return UNet(
        spatial_dims=3,
        in_channels=len(WINDOWS),
        out_channels=N_CLASSES,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="instance",
    )


def load(device: str):
    """The trained network on ``device`` (eval mode)."""
    net = build_network()
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.to(device).eval()


@dataclass
class Models:
    """The 4 mm network and the 2 mm lesion refinement network (None: 4 mm lesion labels only)."""

    net: object
    refiner: object | None


def load_with_refinement(device: str) -> Models:
    """Both networks of the analysis on ``device`` (eval mode)."""
    return Models(load(device), lesion_refinement.load(device))


def preprocess(volume: Volume, params: dict) -> dict:
    """Resample to the 4 mm axis-aligned working grid and window the intensities (the volume is
    kept for the 2 mm lesion pass, which cuts its patches from the source)."""
    # The same grid the intended-use check sampled (domain.adult_trunk_ct): computed once.
    hu, _, affine = imaging.on_canonical_grid(volume, SPACING_MM, order=1, fill=-1024.0)
    return {"image": intensity_channels(hu), "affine": affine, "volume": volume}


def infer(model, inputs: dict, ctx: RunContext) -> np.ndarray:
    """Class probabilities (C, k, j, i) on the working grid, by MONAI sliding-window inference
    (``model``: the 4 mm network, or the analysis's ``Models``, whose 4 mm network runs)."""
    model = model.net if isinstance(model, Models) else model
    x = torch.from_numpy(inputs["image"][None]).to(ctx.device)
    with ctx.inference():
        logits = sliding_window_inference(
            x,
            ROI,
            sw_batch_size=int(ctx.params.get("sw_batch_size", 2)),
            predictor=model,
            overlap=0.25,
            mode="gaussian",
        )
        probs = torch.softmax(logits.float(), dim=1)[0]
    return probs.cpu().numpy()


def infer_with_refinement(models: Models, inputs: dict, ctx: RunContext) -> dict:
    """The 4 mm class probabilities and the 2 mm lesion patches around their lesion candidates."""
    probs = infer(models.net, inputs, ctx)
    if models.refiner is None or not ctx.params.get("refine_lesions", True):
        return {"probs": probs, "patches": []}
    patches = lesion_refinement.refine(models.refiner, inputs["volume"], probs, inputs["affine"], ctx.device)
    return {"probs": probs, "patches": patches}


def labels_on_source(volume: Volume, inputs: dict, probs: np.ndarray) -> np.ndarray:
    """Arg-max label at every source voxel from working-grid probabilities (trilinear).

    ``imaging.argmax_on_source`` gives the labels of ``resample_back(...).argmax(0)`` voxel for
    voxel without sampling 8 class volumes at full resolution (it interpolates only in working
    cells whose corners disagree): about 1 s instead of 20 s for a 300 x 256 x 256 CT on 2 cores.
    """
    return imaging.argmax_on_source(volume, inputs["affine"], probs).astype(np.uint8)


def refined_labels(volume: Volume, inputs: dict, raw: dict | np.ndarray) -> np.ndarray:
    """Labels on the source grid: the 4 mm arg-max, with the 2 mm pass's lesion decision inside
    its patches (``raw`` from ``infer_with_refinement``; a plain probability array: 4 mm only)."""
    if isinstance(raw, np.ndarray):
        return labels_on_source(volume, inputs, raw)
    labels = labels_on_source(volume, inputs, raw["probs"])
    return lesion_refinement.apply(volume, labels, raw["probs"], inputs["affine"], raw["patches"])


def postprocess(volume: Volume, inputs: dict, raw: dict | np.ndarray, params: dict) -> Outputs:
    """One segment per class found, plus each structure's volume in cm3."""
    labels = refined_labels(volume, inputs, raw)
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    # Voxels of every label in every slice, counted once (one small bincount per slice): the
    # volumes, which structures are present and on which slices (SR, KOS) all come from it,
    # instead of several full passes over each class's mask.
    counts = imaging.label_counts_per_slice(labels, max(phantoms.LABELS) + 1)
    out = Outputs()
    for value, name in phantoms.LABELS.items():
        voxels = int(counts[:, value].sum())
        if not voxels:
            continue
        category, ptype = codes_for(name)
        out.segments.append(
            Segment(
                label=name.replace("_", " "),
                mask=None,  # cut from the label array only where a writer needs it (8 x 79 MB at 512²)
                property_type=ptype,
                property_category=category,
                tracking_id=name,
                labels=labels,
                label_value=value,
                voxels_per_slice=counts[:, value].copy(),
            )
        )
        out.measurements.append(
            Measurement(
                name=("118565006", "SCT", "Volume"),
                value=round(voxels * voxel_cm3, 2),
                unit=("cm3", "UCUM", "cubic centimeter"),
                segment_label=name.replace("_", " "),
                finding_site=ptype,
                tracking_id=name,
            )
        )
    return out


def example_series(
    folder: Path, shape: tuple[int, int, int] = (80, 256, 256), spacing: tuple[float, float, float] = (3.0, 1.4, 1.4)
) -> list[Path]:
    """A clinical-sized phantom CT series (for benchmarks): 80 x 256 x 256 at 3 x 1.4 x 1.4 mm."""
    return phantoms.write_ct_series(phantoms.make_ct_phantom(123, shape=shape, spacing=spacing), folder)


def analyses() -> list[Analysis]:
    """The CT segmentation analysis (discovered by the registry)."""
    return [
        Analysis(
            name=NAME,
            task="segmentation",
            modalities=("CT",),
            dimensionality="3d",
            algorithm_name="ainode CT organ and lesion U-Net",
            version=VERSION,
            load=load_with_refinement,
            preprocess=preprocess,
            infer=infer_with_refinement,
            postprocess=postprocess,
            weights=WEIGHTS,
            extra_weights=(lesion_refinement.WEIGHTS,),
            card=CARD,
            intended_use=intended.REFERENCE[NAME],
            image_check=domain.adult_trunk_ct,
            gpu_memory_bytes=1 << 30,
            description="3D U-Net: lung, liver, spleen, kidney, spine, liver lesions, lung nodules on CT",
            example=example_series,
        )
    ]


# --- evaluation (training: workers/training/segmentation.py) --------------------------------

HELD_OUT_SEEDS = range(900_000, 900_100)  # training seeds are 0-99_999, tuning seeds 800_000+


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def evaluate(seeds, device: str = "cpu", phantom=None, refine: bool = True, refiner=None) -> dict:
    """Dice per class on held-out phantoms of random spacing/orientation, on the source grid.

    ``phantom`` makes the phantom of a seed: ``phantoms.random_ct_phantom`` (default: coarse
    4.5-6.5 mm grids of at most 64 voxels, quick enough for CI) or ``phantoms.clinical_ct_phantom``
    (1.5-2.5 mm). ``per_class`` is the mean of per-phantom Dice (phantoms where the class is
    absent in both truth and prediction are skipped); ``global`` pools every voxel of the set;
    ``predicted_only`` counts phantoms with a lesion class predicted but not in the truth. With
    ``refine`` (the default) these are the labels after the 2 mm lesion pass (``refiner``, a
    network, else the shipped weights), and ``before_refinement`` scores the 4 mm labels alone in
    the same run; ``refine_seconds`` is the time the 2 mm pass added (patches and labels).
    """
    model = load(device)
    if not refine:
        refiner = None
    elif refiner is None:
        refiner = lesion_refinement.load(device)
    make = phantom or phantoms.random_ct_phantom
    scores = {"refined": _Scores(), "before": _Scores()}
    refine_s = 0.0
    for s in seeds:
        p = make(s)
        vol = Volume(p.hu, p.affine, [SourceFrame("", "", Path("."))] * p.hu.shape[0], "", "", "", "CT")
        inputs = preprocess(vol, {})
        probs = infer(model, inputs, RunContext(device))
        pred = labels_on_source(vol, inputs, probs)
        scores["before"].add(p.labels, pred)
        if refiner is not None:
            t = time.perf_counter()
            patches = lesion_refinement.refine(refiner, vol, probs, inputs["affine"], device)
            pred = lesion_refinement.apply(vol, pred, probs, inputs["affine"], patches)
            refine_s += time.perf_counter() - t
        scores["refined"].add(p.labels, pred)
    out = {**scores["refined"].summary(), "phantoms": len(list(seeds))}
    if refiner is not None:
        out["before_refinement"] = scores["before"].summary()
        out["refine_seconds"] = round(refine_s, 1)
    return out


class _Scores:
    """Per-phantom and pooled Dice of each class over a set of phantoms."""

    def __init__(self) -> None:
        self.per: dict[str, list[float]] = {n: [] for n in phantoms.LABELS.values()}
        self.pooled = {n: [0, 0] for n in phantoms.LABELS.values()}  # intersection, sum
        self.specks = {n: 0 for n in phantoms.LABELS.values()}  # phantoms with the class predicted only

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """Score one phantom's predicted labels against its true labels."""
        for value, name in phantoms.LABELS.items():
            t, q = truth == value, pred == value
            if t.any() or q.any():
                self.per[name].append(dice(t, q))
            self.specks[name] += int(q.any() and not t.any())
            self.pooled[name][0] += int(np.logical_and(t, q).sum())
            self.pooled[name][1] += int(t.sum() + q.sum())

    def summary(self) -> dict:
        """Mean per-phantom Dice, pooled Dice and the number of phantoms where the class is predicted
        but absent from the truth (false specks, Dice 0), by class name."""
        return {
            "per_class": {n: round(float(np.mean(v)), 4) if v else None for n, v in self.per.items()},
            "global": {n: round(2 * i / s, 4) if s else None for n, (i, s) in self.pooled.items()},
            "predicted_only": {n: self.specks[n] for n in phantoms.LESION_LABELS},
        }
