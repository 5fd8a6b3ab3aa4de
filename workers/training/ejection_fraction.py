"""Training half of the ejection-fraction network (``workers.analysis.models.ejection_fraction``):
``ainode train ejection-fraction`` trains EchoEFNet on fresh phantom cine loops."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.analysis.models.ejection_fraction import NAME, VERSION, WEIGHTS, EchoEFNet, _stack, evaluate
from workers.synthetic.dynamic import make_cine_set
from workers.training.common import save_trained

TRAIN_NAME = NAME


def train(out: Path | None = None, quick: bool = False, seed: int = 0, log=print) -> dict:
    """Train on fresh phantom loops; write weights and a metrics JSON beside them; return the metrics."""
    torch.manual_seed(seed)
    n_train, n_val, n_test = (96, 16, 32) if quick else (1500, 200, 300)
    epochs = 2 if quick else 16
    t_start = time.time()
    train_x, train_ef, train_rel = _stack(make_cine_set(n_train, seed=1000 + seed))
    val = make_cine_set(n_val, seed=2000 + seed)
    test = make_cine_set(n_test, seed=3000 + seed)
    model = EchoEFNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((n_train + 15) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    best, best_state = float("inf"), None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train)
        for i in range(0, n_train, 16):
            idx = order[i : i + 16]
            x = train_x[idx]
            # Time reversal and horizontal flips keep the EF: cheap augmentation.
            if torch.rand(()) < 0.5:
                x, rel = x.flip(1), train_rel[idx].flip(1)
            else:
                rel = train_rel[idx]
            if torch.rand(()) < 0.5:
                x = x.flip(3)
            ef, rel_pred = model(x)
            loss = F.smooth_l1_loss(ef, train_ef[idx], beta=0.02) + 0.5 * F.mse_loss(rel_pred, rel)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        metrics = evaluate(model, val)
        log(f"epoch {epoch + 1}/{epochs}: val MAE {metrics['mae_ef_points']:.2f} EF points")
        if metrics["mae_ef_points"] < best:
            best = metrics["mae_ef_points"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = {
        "model": NAME,
        "version": VERSION,
        "test": evaluate(model, test),
        "validation_mae": best,
        "train_loops": n_train,
        "epochs": epochs,
        "train_seconds": round(time.time() - t_start, 1),
        "quick": quick,
        "seed": seed,
    }
    save_trained(model.state_dict(), out, WEIGHTS, result)
    log(json.dumps(result["test"]))
    return result
