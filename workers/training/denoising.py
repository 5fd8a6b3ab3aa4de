"""Training half of the denoising GAN (``workers.analysis.models.denoising``): ``ainode train
ct-denoising`` trains the generator (L1 + adversarial) against a PatchGAN discriminator on
phantom slices with simulated low-dose noise."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.analysis.models.denoising import (
    HU_SCALE,
    NAME,
    VERSION,
    WEIGHTS,
    DenoisingGenerator,
    denoise_slices,
    evaluate,
    make_pairs,
    psnr,
    training_slices,
)
from workers.training.common import save_trained

TRAIN_NAME = NAME


class PatchDiscriminator(nn.Module):
    """PatchGAN: a real/fake score per overlapping patch of the image."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def _random_patches(clean: np.ndarray, noisy: np.ndarray, n: int, size: int, gen: torch.Generator):
    idx = torch.randint(0, len(clean), (n,), generator=gen)
    ys = torch.randint(0, clean.shape[1] - size + 1, (n,), generator=gen)
    xs = torch.randint(0, clean.shape[2] - size + 1, (n,), generator=gen)
    c = np.stack([clean[i, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs)])
    z = np.stack([noisy[i, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs)])
    return torch.as_tensor(c / HU_SCALE)[:, None].float(), torch.as_tensor(z / HU_SCALE)[:, None].float()


def train_gan(
    clean: np.ndarray,
    noisy: np.ndarray,
    steps: int,
    validation: tuple[np.ndarray, np.ndarray],
    seed: int = 0,
    adv_weight: float = 2e-3,
    patch: int = 40,
    log=print,
) -> DenoisingGenerator:
    """Train the generator (L1 + adversarial) and discriminator (least squares) on random patches.

    Every tenth of the run the generator is scored on the validation slices; the best is kept.
    """
    torch.manual_seed(seed)
    gen_rng = torch.Generator().manual_seed(seed)
    g, d = DenoisingGenerator(), PatchDiscriminator()
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, steps)
    warmup = steps // 5  # pixel loss only at first, so the discriminator meets sensible images
    best, best_state = -float("inf"), None
    for step in range(steps):
        c, z = _random_patches(clean, noisy, 8, patch, gen_rng)
        fake = g(z)
        if step >= warmup:
            opt_d.zero_grad()
            real_score, fake_score = d(c), d(fake.detach())
            loss_d = 0.5 * (
                F.mse_loss(real_score, torch.ones_like(real_score))
                + F.mse_loss(fake_score, torch.zeros_like(fake_score))
            )
            loss_d.backward()
            opt_d.step()
        opt_g.zero_grad()
        loss_pix = F.l1_loss(fake, c)
        loss = loss_pix
        if step >= warmup:
            score = d(fake)
            loss = loss + adv_weight * F.mse_loss(score, torch.ones_like(score))
        loss.backward()
        opt_g.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0:
            score = psnr(denoise_slices(g.eval(), validation[1]), validation[0])
            g.train()
            log(f"step {step + 1}/{steps}: L1 {loss_pix.item() * HU_SCALE:.1f} HU, validation PSNR {score:.2f} dB")
            if score > best:
                best, best_state = score, {k: v.detach().clone() for k, v in g.state_dict().items()}
    g.load_state_dict(best_state)
    return g.eval()


def train(out: Path | None = None, quick: bool = False, seed: int = 0, log=print) -> dict:
    """Train the denoising GAN on phantom slices; write weights + metrics JSON; return the metrics."""
    t_start = time.time()
    n_train, n_val, n_test = (2, 1, 1) if quick else (30, 3, 6)
    clean_tr, px_tr = training_slices(n_train, seed=4000 + seed)
    clean_va, px_va = training_slices(n_val, seed=5000 + seed)
    clean_te, px_te = training_slices(n_test, seed=6000 + seed)
    noisy_tr = make_pairs(clean_tr, px_tr, seed=1)
    noisy_va = make_pairs(clean_va, px_va, seed=2)
    noisy_te = make_pairs(clean_te, px_te, seed=3)
    log(f"slices: train {len(clean_tr)}, validation {len(clean_va)}, test {len(clean_te)}")
    model = train_gan(
        clean_tr, noisy_tr, steps=40 if quick else 1200, validation=(clean_va, noisy_va), seed=seed, log=log
    )
    result = {
        "model": NAME,
        "version": VERSION,
        "test": evaluate(model, clean_te, noisy_te),
        "train_slices": int(len(clean_tr)),
        "train_seconds": round(time.time() - t_start, 1),
        "quick": quick,
        "seed": seed,
    }
    save_trained(model.state_dict(), out, WEIGHTS, result)
    log(json.dumps(result["test"]))
    return result
