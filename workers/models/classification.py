"""Diagnosis / classification, 2D CNN: chest radiograph -> probability that a lung nodule is present.

A compact VGG-style CNN reads the radiograph resized to 128 x 128 and pools its last feature map
both on average and on maximum (a nodule is small: the maximum keeps a local response from being
averaged away). Trained on projection radiographs of the CT phantoms
(``workers.phantoms_projection``, ``ainode train nodule-classification``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.findings import Classification, Findings, Volume
from workers.models.common import file_sha256, inference_device, weights_dir

NAME = "nodule-classification"
VERSION = "1.0.0"
WEIGHTS = "nodule_classification.pt"
INPUT_SIZE = 128
NODULE = ("27925004", "SCT", "Nodule")
LUNG = ("39607008", "SCT", "Lung structure")
PROJECTION_MODALITIES = ("DX", "CR")


class NoduleClassifier(nn.Module):
    """Four conv stages (8-16-32-64 channels) -> average+max pooling -> one logit."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * cin, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (batch, 1, H, W) normalised -> logit (batch,)."""
        f = self.features(image)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return self.head(pooled).squeeze(1)


def prepare_radiograph(image: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """(rows, cols) pixels -> (1, 1, size, size): resized, centred on the median, scaled by the 1-99% range.

    Percentile scaling makes the model indifferent to how a DX/CR stores its values (12-bit or 16-bit).
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=(size, size), mode="area" if min(x.shape[-2:]) >= size else "bilinear")
    flat = x.flatten()
    lo, mid, hi = torch.quantile(flat, torch.tensor([0.01, 0.5, 0.99]))
    return (x - mid) / (hi - lo).clamp_min(1e-6)


def load_model(path: Path | None = None, device: str | None = None) -> tuple[NoduleClassifier, str]:
    """Load the shipped (or given) weights; returns the model in eval mode and the file's SHA-256."""
    path = Path(path) if path else weights_dir() / WEIGHTS
    model = NoduleClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.to(device or inference_device()).eval()
    return model, file_sha256(path)


@torch.inference_mode()
def predict_probabilities(model: NoduleClassifier, images: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """Probability of a nodule for each radiograph."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.cat([prepare_radiograph(im) for im in images[i:i + batch]]).to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(torch.sigmoid(model(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def analyse(volume: Volume, model: NoduleClassifier, sha256: str, threshold: float = 0.5) -> Findings:
    """Classify each radiograph frame of a DX/CR ``Volume``; one Classification per frame."""
    if volume.modality not in PROJECTION_MODALITIES:
        raise ValueError(f"nodule classification accepts {'/'.join(PROJECTION_MODALITIES)}, got {volume.modality}")
    t0 = time.perf_counter()
    probs = predict_probabilities(model, list(volume.pixels))
    findings = Findings(analysis=NAME, algorithm_name="ainode NoduleClassifier (2D CNN)", algorithm_version=VERSION,
                        model_sha256=sha256, volume=volume, kind="classification")
    for p in probs:
        findings.classifications.append(Classification(label="Lung nodule", finding=NODULE, probability=float(p),
                                                       threshold=threshold, finding_site=LUNG))
    findings.timings_s["inference"] = time.perf_counter() - t0
    return findings


# --- training ---------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative cases")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def evaluate(model: NoduleClassifier, radiographs: list) -> dict:
    """Held-out AUC, and sensitivity/specificity at 0.5, overall and for nodules >= 15 mm."""
    probs = predict_probabilities(model, [r.pixels for r in radiographs])
    labels = np.array([r.nodule for r in radiographs])
    pred = probs >= 0.5
    big = np.array([r.nodule and r.nodules[0]["diameter_mm"] >= 15 for r in radiographs])
    return {"n": len(radiographs), "positives": int(labels.sum()), "auc": roc_auc(probs, labels),
            "sensitivity": float(pred[labels].mean()), "specificity": float((~pred[~labels]).mean()),
            "sensitivity_ge_15mm": float(pred[big].mean()) if big.any() else None}


def training_radiographs(n_phantoms: int, per_phantom: int, seed: int) -> list:
    """Radiographs of ``n_phantoms`` nodule-free CT phantoms, ``per_phantom`` each (about half with a nodule)."""
    from workers.phantoms_projection import projection_source, radiographs_of

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_phantoms):
        hu, lung, spacing = projection_source(seed * 1000 + i)
        images += radiographs_of(hu, lung, spacing, per_phantom, rng)
    return images


def train(out: Path | None = None, quick: bool = False, seed: int = 0, log=print) -> dict:
    """Train the classifier on phantom radiographs; write weights + metrics JSON; return the metrics."""
    t_start = time.time()
    torch.manual_seed(seed)
    (n_tr, per_tr), (n_va, per_va), (n_te, per_te) = ((2, 32), (1, 16), (1, 32)) if quick \
        else ((30, 100), (3, 100), (6, 50))
    train_set = training_radiographs(n_tr, per_tr, seed=10 + seed)
    val_set = training_radiographs(n_va, per_va, seed=20 + seed)
    test_set = training_radiographs(n_te, per_te, seed=30 + seed)
    x = torch.cat([prepare_radiograph(r.pixels) for r in train_set])
    y = torch.tensor([float(r.nodule) for r in train_set])
    log(f"radiographs: train {len(train_set)}, validation {len(val_set)}, test {len(test_set)}")
    model = NoduleClassifier()
    epochs = 1 if quick else 10
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(x) + 31) // 32))
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i:i + 32]
            xb = x[idx]
            if torch.rand(()) < 0.5:  # left-right flip: a nodule can be in either lung
                xb = xb.flip(3)
            loss = F.binary_cross_entropy_with_logits(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        metrics = evaluate(model, val_set)
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, validation AUC {metrics['auc']:.3f}")
        if metrics["auc"] >= best:
            best = metrics["auc"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = {"model": NAME, "version": VERSION, "test": evaluate(model, test_set), "validation_auc": best,
              "train_radiographs": len(train_set), "train_phantoms": n_tr, "epochs": epochs,
              "train_seconds": round(time.time() - t_start, 1), "quick": quick, "seed": seed}
    out_dir = Path(out) if out else weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS)
    result["sha256"] = file_sha256(out_dir / WEIGHTS)
    (out_dir / WEIGHTS.replace(".pt", ".json")).write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(result["test"]))
    return result
