"""Dynamic imaging, RNN: left-ventricular ejection fraction from an echo cine loop.

A small CNN encodes every frame; a bidirectional GRU runs over the frames, so the network sees the
whole cardiac cycle. Two heads read the GRU: one gives each frame's LV volume relative to the
loop's largest (an auxiliary target that teaches the network where end-diastole and end-systole
are), the other gives the ejection fraction from the pooled sequence. Trained on
``workers.synthetic.dynamic`` loops (``ainode train ejection-fraction``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.analysis import domain, intended
from workers.analysis.contract import Analysis, AnalysisError, Outputs, RunContext
from workers.analysis.findings import Measurement, Volume
from workers.analysis.models.common import CARDS, weights_dir
from workers.synthetic.dynamic import make_cine, write_us_multiframe

NAME = "ejection-fraction"
VERSION = "1.0.0"
WEIGHTS = "ejection_fraction.pt"
CARD = CARDS / f"{NAME}.md"
MIN_FRAMES = 8
INPUT_SIZE = 48  # frames are resampled to 48 x 48 pixels: enough for the cavity, cheap on a CPU
LVEF_CODE = ("10230-1", "LN", "Left ventricular Ejection fraction")
PERCENT = ("%", "UCUM", "%")
LEFT_VENTRICLE = ("87878005", "SCT", "Left ventricle structure")


class EchoEFNet(nn.Module):
    """Per-frame CNN encoder + bidirectional GRU over frames -> EF and per-frame relative volume."""

    def __init__(self, width: int = 8, hidden: int = 48):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.encoder = nn.Sequential(
            block(1, width),
            block(width, 2 * width),
            block(2 * width, 4 * width),
            block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.gru = nn.GRU(4 * width, hidden, batch_first=True, bidirectional=True)
        self.frame_volume = nn.Linear(2 * hidden, 1)
        self.ef_head = nn.Sequential(nn.Linear(4 * hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, cine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cine (batch, frames, H, W) normalised -> (EF fraction (batch,), relative volume (batch, frames))."""
        b, t, h, w = cine.shape
        feats = self.encoder(cine.reshape(b * t, 1, h, w)).reshape(b, t, -1)
        seq, _ = self.gru(feats)
        rel_volume = torch.sigmoid(self.frame_volume(seq).squeeze(-1))
        pooled = torch.cat([seq.mean(1), seq.amax(1)], dim=1)
        ef = torch.sigmoid(self.ef_head(pooled).squeeze(-1))
        return ef, rel_volume


def prepare_cine(frames: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """(t, rows, cols) pixels -> (1, t, size, size) float tensor scaled by the loop's 99th percentile.

    Scaling by a percentile rather than by 255 makes the model indifferent to the scanner's gain.
    """
    x = torch.as_tensor(np.asarray(frames, dtype=np.float32))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[:, None], size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")[:, 0]
    scale = torch.quantile(x.flatten()[::7], 0.99).clamp_min(1e-3)
    return (x / scale)[None]


def load(device: str = "cpu", path: Path | None = None) -> EchoEFNet:
    """The trained network on ``device`` (eval mode), from the shipped or a given weight file."""
    model = EchoEFNet()
    model.load_state_dict(torch.load(path or weights_dir() / WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def preprocess(volume: Volume, params: dict) -> torch.Tensor:
    """The loop as a (1, t, 48, 48) tensor; refuses loops too short to hold a cardiac cycle."""
    if volume.pixels.ndim != 3 or volume.pixels.shape[0] < MIN_FRAMES:
        raise AnalysisError(
            f"{NAME} needs a cine loop of at least {MIN_FRAMES} frames covering a heart beat, "
            f"got {volume.pixels.shape[0]} frame(s)"
        )
    return prepare_cine(volume.pixels)


def infer(model: EchoEFNet, cine: torch.Tensor, ctx: RunContext) -> tuple[float, np.ndarray]:
    """(EF in percent, per-frame relative LV volume)."""
    with ctx.inference():
        ef, rel = model(cine.to(ctx.device))
    return float(ef[0]) * 100.0, rel[0].float().cpu().numpy()


def postprocess(volume: Volume, inputs: torch.Tensor, raw: tuple[float, np.ndarray], params: dict) -> Outputs:
    """The EF as a coded Measurement (LOINC 10230-1, UCUM %), site: left ventricle."""
    return Outputs(
        measurements=[
            Measurement(
                name=LVEF_CODE, value=round(raw[0], 1), unit=PERCENT, finding_site=LEFT_VENTRICLE, tracking_id="lvef"
            )
        ]
    )


def predict_ef(model: EchoEFNet, frames: np.ndarray) -> tuple[float, np.ndarray]:
    """EF (percent) and per-frame relative volume for one loop of (t, rows, cols) pixels."""
    device = next(model.parameters()).device
    return infer(model, prepare_cine(frames), RunContext(device=str(device.type)))


def analyses() -> list[Analysis]:
    """The EF analysis (discovered by the registry)."""
    return [
        Analysis(
            name=NAME,
            task="ejection_fraction",
            modalities=("US", "MR"),
            dimensionality="2d+t",
            algorithm_name="ainode EchoEFNet (CNN + GRU)",
            version=VERSION,
            load=load,
            preprocess=preprocess,
            infer=infer,
            postprocess=postprocess,
            weights=weights_dir() / WEIGHTS,
            card=CARD,
            intended_use=intended.REFERENCE[NAME],
            image_check=domain.heart_cine,
            gpu_memory_bytes=256 << 20,
            description="Recurrent network over the frames of an apical long-axis cine: LV ejection fraction",
            example=example_cine,
        )
    ]


def example_cine(folder: Path) -> list[Path]:
    """One phantom ultrasound cine loop (multi-frame US) written into ``folder`` (benchmarks)."""
    return [write_us_multiframe(make_cine(np.random.default_rng(31_337)), Path(folder) / "cine.dcm")]


# --- evaluation and data (the training loop: workers/training/) --------------------------------


def _stack(loops: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    frames = torch.cat([prepare_cine(loop.frames) for loop in loops])
    ef = torch.tensor([loop.ef_percent / 100.0 for loop in loops], dtype=torch.float32)
    rel = torch.tensor(np.stack([loop.volumes_ml / loop.volumes_ml.max() for loop in loops]), dtype=torch.float32)
    return frames, ef, rel


@torch.no_grad()
def evaluate(model: EchoEFNet, loops: list) -> dict[str, float]:
    """Held-out metrics: mean absolute error in EF points, its 95th percentile and the correlation."""
    model.eval()
    pred = []
    for i in range(0, len(loops), 32):
        x, _, _ = _stack(loops[i : i + 32])
        pred.append(model(x)[0].numpy() * 100.0)
    pred = np.concatenate(pred)
    truth = np.array([loop.ef_percent for loop in loops])
    err = np.abs(pred - truth)
    return {
        "n": len(loops),
        "mae_ef_points": float(err.mean()),
        "p95_abs_error": float(np.percentile(err, 95)),
        "pearson_r": float(np.corrcoef(pred, truth)[0, 1]),
        "bias": float((pred - truth).mean()),
    }
