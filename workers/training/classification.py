"""Training half of the nodule classifier (``workers.analysis.models.classification``):
``ainode train nodule-classification`` trains the U-Net's nodule map on phantom radiographs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workers.analysis.models.classification import (
    INPUT_SHAPE,
    NAME,
    VERSION,
    WEIGHTS,
    NoduleClassifier,
    calibrated,
    evaluate,
    fit_platt,
    prepare_radiograph,
    training_radiographs,
    validation_check,
    validation_logits,
    youden_threshold,
)
from workers.training.common import save_trained

TRAIN_NAME = NAME


def nodule_discs(radiographs: list, shape: tuple[int, int] = INPUT_SHAPE) -> torch.Tensor:
    """The training target: (n, rows, cols) uint8, 1 inside each nodule's outline on the input grid
    (at least 1.5 pixels of radius, so the smallest nodules are still a few pixels)."""
    out = torch.zeros(len(radiographs), *shape, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    for i, r in enumerate(radiographs):
        rows, cols = r.pixels.shape
        for n in r.nodules:
            centre_r = (n["row"] + 0.5) * shape[0] / rows - 0.5
            centre_c = (n["col"] + 0.5) * shape[1] / cols - 0.5
            radius = max(n["diameter_mm"] / 2 / r.pixel_spacing_mm * shape[0] / rows, 1.5)
            out[i][(yy - centre_r) ** 2 + (xx - centre_c) ** 2 <= radius**2] = 1
    return out


def balanced_batch(labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` training images, half with a nodule and half without."""
    pos, neg = torch.nonzero(labels).flatten(), torch.nonzero(~labels).flatten()
    half = n // 2
    return torch.cat(
        [pos[torch.randint(len(pos), (half,), generator=gen)], neg[torch.randint(len(neg), (n - half,), generator=gen)]]
    )


def map_loss(
    model: NoduleClassifier,
    images: torch.Tensor,
    discs: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: float = 50.0,
    image_weight: float = 0.2,
) -> torch.Tensor:
    """BCE of the nodule map against the discs (nodule pixels weighted ``pos_weight``: they are a few
    in ten thousand) plus ``image_weight`` x BCE of the image logit against the image label."""
    logit, nodule_map = model(images)
    dense = F.binary_cross_entropy_with_logits(
        nodule_map, discs.float(), pos_weight=torch.tensor(pos_weight, device=images.device)
    )
    return dense + image_weight * F.binary_cross_entropy_with_logits(logit, labels.float())


def train(
    out: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    log=print,
    device: str | None = None,
    workers: int | None = None,
    steps: int | None = None,
) -> dict:
    """Train the classifier on phantom radiographs; write weights + metrics JSON; return the metrics.

    Whole radiographs, half with a nodule, left-right flipped at random, ``map_loss``; AdamW with a
    one-cycle learning rate (peak 1e-3). On the CPU: 400 training phantoms x 16 radiographs (anatomy
    varies more than dose and nodule place, and a network overfits few anatomies), 5,000 steps of 16
    images. On a CUDA device (picked automatically when there is one) 800 phantoms and steps of 64.
    The weights kept are those of the best validation AUC, measured in eval mode (``validation_check``)
    every 250 steps on 16 other phantoms x 25 radiographs.
    """
    t_start = time.time()
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    workers = workers or (os.cpu_count() or 1)
    if quick:
        sizes, default_steps, every, batch = ((2, 32), (1, 16), (1, 32)), 20, 10, 8
    elif gpu:
        sizes, default_steps, every, batch = ((800, 16), (16, 25), (32, 25)), 5000, 250, 64
    else:
        sizes, default_steps, every, batch = ((400, 16), (16, 25), (4, 50)), 5000, 250, 16
    (n_tr, per_tr), (n_va, per_va), (n_te, per_te) = sizes
    steps = steps or default_steps
    train_set = training_radiographs(n_tr, per_tr, seed=10 + seed, workers=workers)
    val_set = training_radiographs(n_va, per_va, seed=20 + seed, workers=workers)
    test_set = training_radiographs(n_te, per_te, seed=30 + seed, workers=workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: more threads only contend on a busy machine
    x = torch.cat([prepare_radiograph(r.pixels) for r in train_set])
    val_x = torch.cat([prepare_radiograph(r.pixels) for r in val_set])
    discs = nodule_discs(train_set)
    labels = torch.tensor([r.nodule for r in train_set])
    val_labels = np.array([r.nodule for r in val_set])
    if gpu:
        torch.set_num_threads(threads)
    log(
        f"radiographs: train {len(train_set)}, validation {len(val_set)}, test {len(test_set)} "
        f"({time.time() - t_start:.0f} s); training on {device}"
    )
    model = NoduleClassifier().to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    best, best_state = -1.0, None
    for step in range(steps):
        model.train()
        idx = balanced_batch(labels, batch, gen)
        flip = (torch.rand(len(idx), generator=gen) < 0.5)[:, None, None]  # a nodule can be in either lung
        xb = torch.where(flip[:, None], x[idx].flip(3), x[idx]).to(device)
        db = torch.where(flip, discs[idx].flip(2), discs[idx]).to(device)
        loss = map_loss(model, xb, db, labels[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            auc, _ = validation_check(model, val_x, val_labels)
            log(f"step {step + 1}/{steps}: loss {loss.item():.3f}, validation AUC {auc:.3f}")
            if auc >= best:
                best = auc
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    val_logits = validation_logits(model, val_x)
    model.calibration = fit_platt(val_logits, val_labels)
    threshold = youden_threshold(calibrated(model, val_logits), val_labels)
    torch.set_num_threads(threads)
    result = {
        "model": NAME,
        "version": VERSION,
        "test": evaluate(model, test_set, threshold),
        "validation_auc": best,
        "threshold": threshold,
        "calibration_platt": list(model.calibration),
        "device": device,
        "train_radiographs": len(train_set),
        "train_phantoms": n_tr,
        "steps": steps,
        "batch": batch,
        "train_seconds": round(time.time() - t_start, 1),
        "quick": quick,
        "seed": seed,
    }
    save_trained({k: v.cpu() for k, v in model.state_dict().items()}, out, WEIGHTS, result)
    log(json.dumps(result["test"]))
    return result
