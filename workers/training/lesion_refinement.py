"""Training half of the 2 mm lesion refinement (``workers.analysis.models.lesion_refinement``):
``ainode train lesion-refinement`` cuts patches, exactly as at inference, around the candidates
the shipped 4 mm network finds on segmentation training series, with exact labels at the patch's
voxel centres (``phantoms.labels_at``), and trains the small U-Net on them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from workers.analysis.contract import RunContext
from workers.analysis.findings import Volume
from workers.analysis.models import segmentation
from workers.analysis.models.lesion_refinement import (
    CHANNELS,
    CLASSES,
    N_INPUTS,
    PATCH,
    WEIGHTS,
    build_network,
    candidate_centres,
    patch_affine,
    patch_inputs,
)
from workers.analysis.registry import file_sha256
from workers.synthetic import phantoms
from workers.training.common import weights_record
from workers.training.segmentation import inside_source, training_series

log = logging.getLogger(__name__)

TRAIN_NAME = "lesion-refinement"

# Training series: segmentation.training_series seeds the 4 mm network never trained on (it saw
# seeds 0-335), so its candidates and probabilities are as imperfect as on a new series.
TRAIN_SEEDS = range(10_000, 100_000)
TUNING_SEEDS = range(800_000, 800_060)  # model choices; held-out seeds (900_000+) only for the card
JITTER_MM = 6.0  # training patches are also cut off-centre, so the network does not rely on centring

_base_net = None  # the 4 mm network, loaded once per case-generating process


def training_patches(seed: int, jittered: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Refinement training examples from one segmentation training series, made as at inference.

    The 4 mm network (shipped weights) runs on the series; around each of its candidates a patch
    is cut at the candidate's centre and ``jittered`` more at random offsets (up to ``JITTER_MM``
    per axis); the target is the exact class at each patch voxel centre (0 not a lesion, 1 liver
    lesion, 2 lung nodule; 0 outside the series' field of view, where no source voxel is judged).
    Returns (inputs (N, 4, *PATCH) float16, targets (N, *PATCH) uint8).
    """
    global _base_net
    torch.set_num_threads(1)
    if _base_net is None:
        _base_net = segmentation.load("cpu")
    rng = np.random.default_rng(seed + 31_337)
    anatomy, volume = training_series(seed)
    inputs = segmentation.preprocess(volume, {})
    probs = segmentation.infer(_base_net, inputs, RunContext("cpu"))
    xs, ys = [], []
    for centre in candidate_centres(probs, inputs["affine"]):
        for offset in [np.zeros(3)] + [rng.uniform(-JITTER_MM, JITTER_MM, 3) for _ in range(jittered)]:
            affine = patch_affine(centre + offset)
            xs.append(patch_inputs(volume, probs, inputs["affine"], affine).astype(np.float16))
            ys.append(_targets(anatomy, volume, affine))
    if not xs:
        return np.zeros((0, N_INPUTS, *PATCH), np.float16), np.zeros((0, *PATCH), np.uint8)
    return np.stack(xs), np.stack(ys)


def _targets(anatomy: phantoms.Anatomy, volume: Volume, affine: np.ndarray) -> np.ndarray:
    """Exact refinement classes at a patch's voxel centres (0 outside the series)."""
    labels = phantoms.labels_at(anatomy, phantoms.Grid(PATCH, affine))
    target = np.zeros(PATCH, dtype=np.uint8)
    for index, label in enumerate(CLASSES[1:], start=1):
        target[labels == label] = index
    target[~inside_source(volume, PATCH, affine)] = 0
    return target


def make_dataset(seeds, path: Path, workers: int = 2, jittered: int = 1) -> dict:
    """Generate the training patches of ``seeds`` (process pool) into one ``.npz`` file."""
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.starmap(training_patches, [(s, jittered) for s in seeds])
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    summary = {
        "series": len(list(seeds)),
        "patches": int(len(x)),
        "seconds": round(time.monotonic() - started, 1),
        "lesion_voxel_fraction": round(float((y > 0).mean()), 4),
    }
    log.info("dataset %s: %s", path, summary)
    return summary


def train(
    out: Path | None = None,
    quick: bool = False,
    minutes: float | None = None,
    seed: int = 0,
    series: int = 480,
    jittered: int = 2,
    data: Path | None = None,
    workers: int = 2,
    max_lr: float = 2e-3,
    batch: int = 8,
) -> dict:
    """Train the 2 mm refinement network and save its weights; returns a summary.

    Patches come from ``series`` training series (``training_patches``, made by ``workers``
    processes into a temporary ``.npz``; ``data`` names an ``.npz`` from ``make_dataset`` to reuse
    instead, or where to keep the one made). The network then trains for ``minutes`` (default 25;
    ``quick``: 1 series, 15 seconds) on random batches with random axis flips, DiceCE loss without
    the background class, AdamW and a cosine learning rate that follows the clock, so the run
    anneals by the end of the budget on any machine. The shipped weights: 480 series, 25 minutes.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    started = time.monotonic()
    if quick:
        series, jittered, minutes = 1, 0, 0.25
    out = Path(out) if out else WEIGHTS
    with tempfile.TemporaryDirectory() as scratch:
        if data is not None and Path(data).exists():
            made: dict = {"from": str(data)}
        else:
            data = Path(data) if data else Path(scratch) / "patches.npz"
            made = make_dataset(TRAIN_SEEDS[:series], data, workers=workers, jittered=jittered)
        with np.load(data) as arrays:
            x_all, y_all = arrays["x"], arrays["y"]
    generate_s = time.monotonic() - started
    log.info("%d patches ready after %.0f s", len(x_all), generate_s)
    train_start = time.monotonic()
    net, steps, loss = _fit(
        x_all, y_all, 60 * (minutes if minutes is not None else 25), max_lr, batch, np.random.default_rng(seed)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out)
    summary = {
        "model": TRAIN_NAME,
        "steps": steps,
        "batch": batch,
        "patch": list(PATCH),
        "channels": list(CHANNELS),
        "series": series,
        "jittered": jittered,
        "patches": int(len(x_all)),
        "dataset": made,
        "max_lr": max_lr,
        "seed": seed,
        "final_loss": loss,
        "generate_seconds": round(generate_s, 1),
        "train_seconds": round(time.monotonic() - train_start, 1),
        "weights": weights_record(out),
        "sha256": file_sha256(out),
        "used_by": f"{segmentation.NAME} {segmentation.VERSION}",
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def _fit(x_all: np.ndarray, y_all: np.ndarray, budget_s: float, max_lr: float, batch: int, rng: np.random.Generator):
    """The training loop: (network, steps, mean loss of the last 100 steps)."""
    net = build_network()
    opt = torch.optim.AdamW(net.parameters(), lr=max_lr, weight_decay=1e-5)
    # batch=True: Dice over the whole batch, since many patches hold no lesion of one kind.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    net.train()
    losses: list[float] = []
    step, started = 0, time.monotonic()
    while True:
        fraction = min(1.0, (time.monotonic() - started) / budget_s)
        if fraction >= 1 and step >= 3:
            break
        step += 1
        for group in opt.param_groups:
            group["lr"] = max_lr * min(1.0, step / 100) * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * fraction)))
        x, y = _batch(rng, x_all, y_all, batch)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            log.info("step %d loss %.4f (%.0f s)", step, np.mean(losses[-100:]), time.monotonic() - started)
    return net, step, float(np.mean(losses[-100:]))


def _batch(rng: np.random.Generator, x_all: np.ndarray, y_all: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A random batch (float32 inputs, int64 targets with a channel axis), each example flipped
    along random axes (lesions have no handedness; the inputs say which organ hosts them)."""
    xs, ys = [], []
    for index in rng.integers(len(x_all), size=n):
        x, y = x_all[index].astype(np.float32), y_all[index]
        for axis in np.flatnonzero(rng.random(3) < 0.5):
            x, y = np.flip(x, axis + 1), np.flip(y, axis)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return np.stack(xs), np.stack(ys).astype(np.int64)[:, None]
