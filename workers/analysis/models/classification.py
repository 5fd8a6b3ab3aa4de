"""Diagnosis / classification, 2D CNN: chest radiograph -> probability that a lung nodule is present.

A MONAI 2D U-Net reads the whole radiograph resized to 128 x 192 (two channels: the image, and its
local contrast, which makes small round opacities stand out from the broad anatomy) and gives a
nodule logit at every pixel; the image's logit is the maximum of that map (lightly smoothed, away
from the border: one nodule anywhere makes the image positive). The phantoms know where each nodule
is, so training supervises the map itself (a disc at each nodule) and, lightly, the image logit.
The U-Net's coarsest level sees the whole chest, so it can tell a nodule from the edge of the
diaphragm dome or the mediastinum it projects over. Trained on projection radiographs of the CT
phantoms (``workers.synthetic.projection``, ``ainode train nodule-classification``).
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from scipy.optimize import minimize
from torch import nn

from workers.analysis import domain, intended
from workers.analysis.contract import Analysis, Outputs, RunContext
from workers.analysis.findings import Classification, Volume
from workers.analysis.models.common import CARDS, weights_dir
from workers.synthetic.projection import projection_source, radiographs_of, write_dx

NAME = "nodule-classification"
VERSION = "2.0.0"  # 2.0.0: whole-image U-Net with a nodule map (1.x: crop-trained VGG-style CNN)
WEIGHTS = "nodule_classification.pt"
CARD = CARDS / f"{NAME}.md"
INPUT_SHAPE = (128, 192)  # rows, columns: the phantom radiographs' 260 x 380 mm at about 2 mm
CHANNELS = (12, 24, 48, 96, 128)
BORDER = 6  # map pixels at the image's edge (zero padding, no lung) that never decide the image
NODULE = ("27925004", "SCT", "Nodule")
LUNG = ("39607008", "SCT", "Lung structure")
PROJECTION_MODALITIES = ("DX", "CR")


class NoduleClassifier(nn.Module):
    """A MONAI 2D U-Net giving a nodule logit per pixel; the image logit is the map's maximum."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS):
        super().__init__()
        self.unet = UNet(
            spatial_dims=2,
            in_channels=2,
            out_channels=1,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
            norm="batch",
        )
        # Platt scaling (scale, offset) of the image logit, fitted on validation radiographs after
        # training (``fit_platt``): the maximum of a map is no probability by itself.
        self.calibration: tuple[float, float] = (1.0, 0.0)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (batch, 2, H, W), H and W multiples of 16 -> (image logit (batch,), nodule map (batch, H, W))."""
        nodule_map = self.unet(image)[:, 0]
        return image_logit(nodule_map), nodule_map


def image_logit(nodule_map: torch.Tensor) -> torch.Tensor:
    """The maximum of the map after a 3 x 3 mean (one noisy pixel is no nodule), ``BORDER`` excluded."""
    smooth = F.avg_pool2d(nodule_map[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    if min(smooth.shape[1:]) > 4 * BORDER:
        smooth = smooth[:, BORDER:-BORDER, BORDER:-BORDER]
    return smooth.flatten(1).amax(1)


def prepare_radiograph(image: np.ndarray, shape: tuple[int, int] = INPUT_SHAPE) -> torch.Tensor:
    """(rows, cols) pixels -> (1, 2, *shape): the image centred on its median and scaled by its
    1-99 % range, and its local contrast (image minus a 4-pixel Gaussian blur) scaled by its own spread.

    Scaling by the image's own statistics makes the model indifferent to how a DX/CR stores its
    values (12-bit or 16-bit, any gain).
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
    lo, mid, hi = torch.quantile(x.flatten(), torch.tensor([0.01, 0.5, 0.99]))
    x = (x - mid) / (hi - lo).clamp_min(1e-6)
    g = torch.exp(-((torch.arange(25, dtype=torch.float32) - 12) ** 2) / (2 * 4.0**2))
    g = g / g.sum()
    blurred = F.conv2d(F.pad(x, (12, 12, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, 12, 12), mode="replicate"), g.view(1, 1, -1, 1))
    local = x - blurred
    spread = torch.quantile(local.abs().flatten(), 0.9).clamp_min(1e-6)
    return torch.cat([x, local / spread], dim=1)


def load(device: str = "cpu", path: Path | None = None) -> NoduleClassifier:
    """The trained network on ``device`` (eval mode), from the shipped or a given weight file, with the
    calibration stored in the summary JSON beside it (none if absent)."""
    path = Path(path or weights_dir() / WEIGHTS)
    model = NoduleClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.calibration = _summary(path).get("calibration_platt", (1.0, 0.0))
    return model.to(device).eval()


def _summary(weights: Path) -> dict:
    try:
        return json.loads(weights.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def preprocess(volume: Volume, params: dict) -> torch.Tensor:
    """Each frame of the DX/CR series (usually one) as a normalised 128 x 192 image."""
    return torch.cat([prepare_radiograph(frame) for frame in volume.pixels])


def infer(model: NoduleClassifier, images: torch.Tensor, ctx: RunContext, batch: int = 64) -> np.ndarray:
    """Calibrated nodule probability per image."""
    return calibrated(model, image_logits(model, images, ctx, batch))


def calibrated(model: NoduleClassifier, logits: np.ndarray) -> np.ndarray:
    """Image logits -> probabilities through the model's Platt calibration."""
    scale, offset = model.calibration
    return 0.5 * (1 + np.tanh((scale * logits + offset) / 2))  # sigmoid without overflow


def image_logits(model: NoduleClassifier, images: torch.Tensor, ctx: RunContext, batch: int = 64) -> np.ndarray:
    """The network's raw image logit per image (before calibration): the mean of the logits of the
    image and of its left-right mirror (a nodule may lie in either lung; on the 1,200 validation-pool
    radiographs the mirror lifted the AUC from 0.940 to 0.946)."""
    out = []
    with ctx.inference():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(ctx.device)
            out.append(((model(x)[0] + model(x.flip(3))[0]) / 2).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def operating_threshold() -> float:
    """The decision threshold (calibrated probability) chosen on validation radiographs (0.5 if unknown)."""
    return float(_summary(weights_dir() / WEIGHTS).get("threshold", 0.5))


def postprocess(volume: Volume, inputs: torch.Tensor, probs: np.ndarray, params: dict) -> Outputs:
    """One Classification (finding: nodule, site: lung) per radiograph; ``params['threshold']`` overrides
    the operating point chosen on validation."""
    threshold = float(params.get("threshold", operating_threshold()))
    return Outputs(
        classifications=[
            Classification(
                label="Lung nodule", finding=NODULE, probability=float(p), threshold=threshold, finding_site=LUNG
            )
            for p in probs
        ]
    )


def predict_probabilities(model: NoduleClassifier, images: list[np.ndarray]) -> np.ndarray:
    """Probability of a nodule for each radiograph (rows, cols)."""
    device = next(model.parameters()).device
    if not images:
        return np.zeros(0)
    return infer(model, torch.cat([prepare_radiograph(im) for im in images]), RunContext(device=str(device.type)))


def analyses() -> list[Analysis]:
    """The radiograph nodule classifier (discovered by the registry)."""
    return [
        Analysis(
            name=NAME,
            task="classification",
            modalities=PROJECTION_MODALITIES,
            dimensionality="2d",
            algorithm_name="ainode NoduleClassifier (2D U-Net)",
            version=VERSION,
            load=load,
            preprocess=preprocess,
            infer=infer,
            postprocess=postprocess,
            weights=weights_dir() / WEIGHTS,
            card=CARD,
            intended_use=intended.REFERENCE[NAME],
            image_check=domain.chest_radiograph,
            gpu_memory_bytes=256 << 20,
            description="Chest radiograph (DX/CR): probability that a lung nodule is present",
            example=example_radiograph,
        )
    ]


def example_radiograph(folder: Path) -> list[Path]:
    """One phantom chest radiograph (DX, 130 x 190 pixels at 2 mm) written into ``folder`` (benchmarks)."""
    hu, lung, spacing = projection_source(424_999)
    shot = radiographs_of(hu, lung, spacing, 1, np.random.default_rng(1))[0]
    return [write_dx(shot, Path(folder) / "dx.dcm")]


# --- evaluation and data (the training loop: workers/training/) --------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative cases")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity (Youden's J)."""
    labels = np.asarray(labels, dtype=bool)
    candidates = np.unique(probs)
    j = [(probs[labels] >= t).mean() + (probs[~labels] < t).mean() for t in candidates]
    return float(candidates[int(np.argmax(j))])


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Scale and offset of ``sigmoid(scale * logit + offset)`` that maximise the likelihood of ``labels``
    (Platt scaling: a one-feature logistic regression, lightly regularised)."""
    x, y = np.asarray(logits, dtype=float), np.asarray(labels, dtype=float)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = w[0] * x + w[1]
        p = 0.5 * (1 + np.tanh(z / 2))  # sigmoid without overflow
        value = float(np.sum(np.logaddexp(0, z) - y * z) + 1e-3 * (w @ w) / 2)
        return value, np.array([np.sum((p - y) * x), np.sum(p - y)]) + 1e-3 * w

    w = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B").x
    return float(w[0]), float(w[1])


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the mean |predicted - observed| rate over equal-width probability bins,
    weighted by how many images fall in each."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(probs[which == b].mean() - labels[which == b].mean()) * (which == b).sum()
            for b in range(bins)
            if (which == b).any()
        )
        / len(probs)
    )


def evaluate(model: NoduleClassifier, radiographs: list, threshold: float = 0.5) -> dict:
    """Held-out AUC, and sensitivity/specificity at ``threshold``, overall and for nodules >= 15 mm.

    ``auc_by_overlap`` splits the nodules by how much denser their ray is than the clear lung field
    (``overlap``, line integral): clear (< 0.3), partly (0.3-0.8) or largely (>= 0.8) hidden by the
    diaphragm dome or mediastinum; each AUC is against all nodule-free images.
    """
    probs = predict_probabilities(model, [r.pixels for r in radiographs])
    labels = np.array([r.nodule for r in radiographs])
    pred = probs >= threshold
    big = np.array([r.nodule and r.nodules[0]["diameter_mm"] >= 15 for r in radiographs])
    overlap = np.array([r.nodules[0].get("overlap", np.nan) if r.nodule else np.nan for r in radiographs])
    by_overlap = {}
    for name, lo, hi in (("clear", -np.inf, 0.3), ("partly_hidden", 0.3, 0.8), ("largely_hidden", 0.8, np.inf)):
        group = labels & (overlap >= lo) & (overlap < hi)
        if group.any():
            keep = group | ~labels
            by_overlap[name] = {"n": int(group.sum()), "auc": roc_auc(probs[keep], labels[keep])}
    return {
        "n": len(radiographs),
        "positives": int(labels.sum()),
        "auc": roc_auc(probs, labels),
        "threshold": threshold,
        "sensitivity": float(pred[labels].mean()),
        "specificity": float((~pred[~labels]).mean()),
        "sensitivity_ge_15mm": float(pred[big].mean()) if big.any() else None,
        "auc_by_overlap": by_overlap,
        "brier": float(np.mean((probs - labels) ** 2)),
        "calibration_error": calibration_error(probs, labels),
    }


def validation_logits(model: NoduleClassifier, radiographs: list | torch.Tensor) -> np.ndarray:
    """Raw image logits of ``radiographs`` (or their prepared images), what ``fit_platt`` calibrates,
    with the network in eval mode (BatchNorm uses and keeps its running statistics); the network is
    left in the mode it was in."""
    device = next(model.parameters()).device
    images = (
        radiographs
        if isinstance(radiographs, torch.Tensor)
        else torch.cat([prepare_radiograph(r.pixels) for r in radiographs])
    )
    was_training = model.training
    model.eval()
    try:
        return image_logits(model, images, RunContext(device=str(device.type)))
    finally:
        model.train(was_training)


def validation_check(model: NoduleClassifier, images: torch.Tensor, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The periodic validation inside ``train``: (AUC, image logits) of the prepared validation images.

    Runs in eval mode, so the validation images are normalised by BatchNorm's running statistics and
    do not change them (in training mode they were normalised by their own batch statistics and folded
    into the running averages, and the checkpoint kept was chosen on scores the deployed network does
    not give); the network is back in training mode afterwards.
    """
    logits = validation_logits(model, images)
    model.train()
    return roc_auc(logits, labels), logits


def training_radiographs(n_phantoms: int, per_phantom: int, seed: int, workers: int = 1) -> list:
    """Radiographs of ``n_phantoms`` nodule-free CT phantoms, ``per_phantom`` each (about half with a
    nodule); phantoms are independent (own seeds), so ``workers`` processes give the same set."""
    jobs = [(seed * 1000 + i, per_phantom) for i in range(n_phantoms)]
    if workers <= 1 or n_phantoms <= 1:
        return [r for job in jobs for r in _phantom_radiographs(job)]
    with multiprocessing.get_context("spawn").Pool(min(workers, n_phantoms)) as pool:
        return [r for shots in pool.map(_phantom_radiographs, jobs) for r in shots]


def _phantom_radiographs(job: tuple[int, int]) -> list:
    phantom_seed, per_phantom = job
    hu, lung, spacing = projection_source(phantom_seed)
    return radiographs_of(hu, lung, spacing, per_phantom, np.random.default_rng(phantom_seed + 77))
