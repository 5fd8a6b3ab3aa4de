"""CT organ and lesion segmentation: a small MONAI 3D U-Net trained on the project's phantoms.

Pipeline: the series is resampled onto an axis-aligned 4 mm grid (``imaging.canonical_grid``),
intensities go to two windows (soft tissue and wide), MONAI sliding-window inference gives class
probabilities, which are sampled back at every source voxel (trilinear) and arg-maxed, so the
label mask lies exactly on the source images whatever their orientation or slice order.

Classes: ``phantoms.LABELS`` (lung, liver, spleen, kidney, spine, liver lesion, lung nodule).
Reference model for demonstration and pipeline verification, not for diagnosis.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from workers import imaging, phantoms
from workers.findings import Measurement, Segment, Volume
from workers.registry import Analysis, Outputs, RunContext, codes_for

log = logging.getLogger(__name__)

NAME = "ct-segmentation"
VERSION = "1.0.0"
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "ct_segmentation.pt"
CARD = Path(__file__).resolve().parents[2] / "docs" / "models" / "ct-segmentation.md"
SPACING_MM = 4.0
N_CLASSES = 1 + len(phantoms.LABELS)
CHANNELS = (8, 16, 32, 64)
ROI = (64, 64, 64)
TRAIN_PATCH = (48, 48, 48)
TRAIN_SHAPE = (60, 84, 84)  # phantoms rendered directly on the working grid for training
WINDOWS = ((-160.0, 240.0), (-1024.0, 600.0))


def build_network():
    """The 3D U-Net (MONAI): 2 input windows, one output channel per class."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=len(WINDOWS), out_channels=N_CLASSES, channels=CHANNELS,
                strides=(2, 2, 2), num_res_units=1, norm="instance")


def intensity_channels(hu: np.ndarray) -> np.ndarray:
    """(2, ...) float32: HU scaled to 0..1 in a soft-tissue window and a wide (lung/bone) window."""
    return np.stack([np.clip((hu - lo) / (hi - lo), 0, 1) for lo, hi in WINDOWS]).astype(np.float32)


def load(device: str):
    """The trained network on ``device`` (eval mode)."""
    import torch

    net = build_network()
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.to(device).eval()


def preprocess(volume: Volume, params: dict) -> dict:
    """Resample to the 4 mm axis-aligned working grid and window the intensities."""
    shape, affine = imaging.canonical_grid(volume, SPACING_MM)
    hu = imaging.resample_to_grid(volume, shape, affine, order=1, fill=-1024.0)
    return {"image": intensity_channels(hu), "affine": affine}


def infer(model, inputs: dict, ctx: RunContext) -> np.ndarray:
    """Class probabilities (C, k, j, i) on the working grid, by MONAI sliding-window inference."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(inputs["image"][None]).to(ctx.device)
    with ctx.inference():
        logits = sliding_window_inference(x, ROI, sw_batch_size=int(ctx.params.get("sw_batch_size", 2)),
                                          predictor=model, overlap=0.25, mode="gaussian")
        probs = torch.softmax(logits.float(), dim=1)[0]
    return probs.cpu().numpy()


def labels_on_source(volume: Volume, inputs: dict, probs: np.ndarray) -> np.ndarray:
    """Arg-max label at every source voxel from working-grid probabilities."""
    back = imaging.resample_back(volume, inputs["affine"], probs, order=1)
    return back.argmax(axis=0).astype(np.uint8)


def postprocess(volume: Volume, inputs: dict, probs: np.ndarray, params: dict) -> Outputs:
    """One segment per class found, plus each structure's volume in cm3."""
    labels = labels_on_source(volume, inputs, probs)
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    out = Outputs()
    for value, name in phantoms.LABELS.items():
        mask = labels == value
        if not mask.any():
            continue
        category, ptype = codes_for(name)
        out.segments.append(Segment(label=name.replace("_", " "), mask=mask, property_type=ptype,
                                    property_category=category, tracking_id=name))
        out.measurements.append(Measurement(name=("118565006", "SCT", "Volume"), value=round(float(mask.sum()) * voxel_cm3, 2),
                                            unit=("cm3", "UCUM", "cubic centimeter"),
                                            segment_label=name.replace("_", " "), finding_site=ptype, tracking_id=name))
    return out


def example_series(folder: Path, shape: tuple[int, int, int] = (80, 256, 256),
                   spacing: tuple[float, float, float] = (3.0, 1.4, 1.4)) -> list[Path]:
    """A clinical-sized phantom CT series (for benchmarks): 80 x 256 x 256 at 3 x 1.4 x 1.4 mm."""
    return phantoms.write_ct_series(phantoms.make_ct_phantom(123, shape=shape, spacing=spacing), folder)


def analyses() -> list[Analysis]:
    """The CT segmentation analysis (discovered by the registry)."""
    return [Analysis(
        name=NAME, task="segmentation", modalities=("CT",), dimensionality="3d",
        algorithm_name="ainode CT organ and lesion U-Net", version=VERSION,
        load=load, preprocess=preprocess, infer=infer, postprocess=postprocess,
        weights=WEIGHTS, card=CARD, gpu_memory_bytes=1 << 30,
        description="3D U-Net: lung, liver, spleen, kidney, spine, liver lesions, lung nodules on CT",
        example=example_series,
    )]


# --- training and evaluation ------------------------------------------------------------------

TRAIN_SEEDS = range(0, 10_000)
HELD_OUT_SEEDS = range(900_000, 900_100)


def training_phantom(seed: int, shape: tuple[int, int, int] = TRAIN_SHAPE) -> phantoms.CTPhantom:
    """A training phantom rendered on the working grid (axial, 4 mm), rich in lesions."""
    return phantoms.make_ct_phantom(seed, shape=shape, spacing=(SPACING_MM,) * 3, orientation="axial",
                                    noise_hu=float(np.random.default_rng(seed).uniform(8, 25)),
                                    liver_lesions=(1, 4), lung_nodules=(1, 4))


def _random_patch(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray):
    """A training patch; half of them centred on a lesion voxel so small lesions are learned."""
    shape = np.asarray(labels.shape)
    size = np.asarray(TRAIN_PATCH)
    lesion_voxels = np.argwhere(labels >= 6)
    if len(lesion_voxels) and rng.random() < 0.5:
        centre = lesion_voxels[rng.integers(len(lesion_voxels))]
    else:
        centre = rng.integers(size // 2, shape - size // 2 + 1)
    start = np.clip(centre - size // 2 + rng.integers(-8, 9, 3), 0, shape - size)
    sl = tuple(slice(s, s + n) for s, n in zip(start, size))
    return image[(slice(None), *sl)], labels[sl]


def train(out: Path | None = None, quick: bool = False, minutes: float | None = None, seed: int = 0,
          resume_from: Path | None = None, max_lr: float = 3e-3, first_phantom: int = 0) -> dict:
    """Train the U-Net on generated phantoms and save the weights; returns a training summary.

    ``resume_from`` continues from earlier weights (the shipped weights were trained in two runs:
    40 minutes from scratch, then a continuation on new phantoms at a lower learning rate).
    """
    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(seed)
    n_phantoms, max_steps = (2, 20) if quick else (24, 20_000)
    shape = (TRAIN_PATCH[0] + 4, TRAIN_PATCH[1] + 8, TRAIN_PATCH[2] + 8) if quick else TRAIN_SHAPE
    # The schedule follows the clock, not a step count: on a shared CPU the step rate varies,
    # and the learning rate must still anneal by the end of the time budget.
    budget_s = 60 * (minutes if minutes is not None else (1 if quick else 40))
    started = time.monotonic()
    pool = []
    for s in range(n_phantoms):
        p = training_phantom(TRAIN_SEEDS[first_phantom + s], shape)
        pool.append((intensity_channels(p.hu), p.labels.astype(np.int64)))
    log.info("generated %d phantoms in %.0f s", n_phantoms, time.monotonic() - started)
    net = build_network()
    if resume_from:
        net.load_state_dict(torch.load(resume_from, map_location="cpu", weights_only=True))
    opt = torch.optim.AdamW(net.parameters(), lr=max_lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    net.train()
    losses = []
    step = 0
    train_start = time.monotonic()
    train_budget = max(1.0, budget_s - (train_start - started))
    for step in range(1, max_steps + 1):
        fraction = min(1.0, (time.monotonic() - train_start) / train_budget)
        if fraction >= 1 and step > 3:  # a few steps even when phantom generation ate the budget
            break
        warm = min(1.0, step / 50)
        for group in opt.param_groups:
            group["lr"] = max_lr * warm * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * fraction)))
        batch = [_random_patch(rng, *pool[rng.integers(len(pool))]) for _ in range(2)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch])[:, None])
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log.info("step %d loss %.4f (%.0f s)", step, np.mean(losses[-50:]), time.monotonic() - started)
    out = Path(out) if out else WEIGHTS
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out)
    summary = {"model": NAME, "version": VERSION, "steps": step, "phantoms": n_phantoms,
               "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.monotonic() - started, 1),
               "weights": str(out)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def evaluate(seeds, device: str = "cpu") -> dict:
    """Dice per class on held-out phantoms of random spacing/orientation, on the source grid.

    ``per_class`` is the mean of per-phantom Dice (phantoms where the class is absent in both
    truth and prediction are skipped); ``global`` pools every voxel of the set (lesions).
    """
    from workers.findings import SourceFrame

    model = load(device)
    per: dict[str, list[float]] = {n: [] for n in phantoms.LABELS.values()}
    pooled = {n: [0, 0] for n in phantoms.LABELS.values()}  # intersection, sum
    for s in seeds:
        p = phantoms.random_ct_phantom(s)
        vol = Volume(p.hu, p.affine, [SourceFrame("", "", Path("."))] * p.hu.shape[0], "", "", "", "CT")
        inputs = preprocess(vol, {})
        pred = labels_on_source(vol, inputs, infer(model, inputs, RunContext(device)))
        for value, name in phantoms.LABELS.items():
            t, q = p.labels == value, pred == value
            if t.any() or q.any():
                per[name].append(dice(t, q))
            pooled[name][0] += int(np.logical_and(t, q).sum())
            pooled[name][1] += int(t.sum() + q.sum())
    return {"per_class": {n: round(float(np.mean(v)), 4) if v else None for n, v in per.items()},
            "global": {n: round(2 * i / s, 4) if s else None for n, (i, s) in pooled.items()},
            "phantoms": len(list(seeds))}
