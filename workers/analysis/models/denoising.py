"""Reconstruction, GAN: low-dose CT denoising.

Low dose is simulated the way it arises: photon (Poisson) noise on the projections. A slice's
attenuation is forward-projected (parallel beam), each ray gets noise with variance
``exp(p) / I0`` (fewer photons get through dense paths), and the noise alone is reconstructed by
filtered back-projection and added to the full-dose slice. Because FBP is linear this equals
reconstructing the noisy sinogram, and the clean slice stays the exact reference. The noise is
therefore streaky and correlated and stronger through the shoulders and spine, like real low-dose CT.

The generator is a residual CNN that predicts the noise to remove; it is trained with an L1 pixel
loss plus a least-squares adversarial loss from a PatchGAN discriminator, which keeps the texture
from turning waxy. ``ainode train ct-denoising`` reproduces it; metrics are PSNR and SSIM against
the full-dose phantom, measured beside the noisy input and the best plain Gaussian filter.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from workers.analysis import domain, intended
from workers.analysis.contract import Analysis, Outputs, RunContext
from workers.analysis.findings import DerivedImage, Volume
from workers.analysis.models.common import CARDS, weights_dir
from workers.synthetic import phantoms

NAME = "ct-denoising"
VERSION = "1.0.0"
WEIGHTS = "ct_denoising.pt"
CARD = CARDS / f"{NAME}.md"
MU_WATER_PER_MM = 0.0195  # linear attenuation of water near 70 keV
HU_SCALE = 1000.0  # network works on HU / 1000
PSNR_RANGE_HU = 2000.0  # PSNR and SSIM over the [-1000, 1000] HU range


# --- low-dose simulation ----------------------------------------------------------------------


def _angles(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * (math.pi / n)


def forward_project(image: torch.Tensor, n_angles: int) -> torch.Tensor:
    """Parallel-beam projections of (B, H, W) images -> (B, n_angles, W) line integrals (pixel units)."""
    b, h, w = image.shape
    th = _angles(n_angles)
    cos, sin = torch.cos(th), torch.sin(th)
    # Rotate the image by each angle (sampling grid), then sum along rows.
    rot = torch.stack(
        [torch.stack([cos, -sin, torch.zeros_like(th)], 1), torch.stack([sin, cos, torch.zeros_like(th)], 1)], 1
    )
    grid = F.affine_grid(rot, (n_angles, 1, h, w), align_corners=False)
    out = []
    for img in image:
        r = F.grid_sample(img.expand(n_angles, 1, h, w), grid, align_corners=False, padding_mode="zeros")
        out.append(r.sum(dim=2)[:, 0])
    return torch.stack(out)


def filtered_back_project(sino: torch.Tensor, size: int) -> torch.Tensor:
    """(B, n_angles, D) parallel-beam sinograms -> (B, size, size) images (ramp filter, linear interp)."""
    b, n, d = sino.shape
    pad = 2 ** math.ceil(math.log2(2 * d))
    freqs = torch.fft.rfftfreq(pad)
    filtered = torch.fft.irfft(torch.fft.rfft(sino, n=pad, dim=-1) * freqs.abs(), n=pad, dim=-1)[..., :d]
    th = _angles(n)
    coords = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) * (d / size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # Detector position of each pixel for each angle, in [-1, 1] for grid_sample.
    t = xx[None] * torch.cos(th)[:, None, None] + yy[None] * torch.sin(th)[:, None, None]
    gx = (t + (d - 1) / 2) / (d - 1) * 2 - 1
    grid = torch.stack([gx, torch.zeros_like(gx)], -1)  # (n, size, size, 2)
    out = []
    for q in filtered:
        v = F.grid_sample(q[:, None, None, :], grid, align_corners=True, padding_mode="zeros")
        out.append(v[:, 0].sum(0))
    return torch.stack(out) * (math.pi / n)


def simulate_low_dose(
    hu: np.ndarray, pixel_mm: float, photons: float, rng: np.random.Generator, n_angles: int = 180
) -> np.ndarray:
    """Add low-dose projection noise to full-dose slices (B, H, W) in HU; ``photons`` = I0 per ray."""
    hu_t = torch.as_tensor(np.asarray(hu, dtype=np.float32))
    mu = (MU_WATER_PER_MM * (1 + hu_t / 1000.0)).clamp_min(0) * pixel_mm  # per pixel
    with torch.no_grad():
        p = forward_project(mu, n_angles)
        sigma = torch.sqrt(torch.exp(p) / photons)
        noise = torch.as_tensor(rng.standard_normal(p.shape).astype(np.float32)) * sigma
        noise_mu = filtered_back_project(noise, hu_t.shape[-1])
    noise_hu = noise_mu / pixel_mm / MU_WATER_PER_MM * 1000.0
    return (hu_t + noise_hu).numpy()


# --- networks ---------------------------------------------------------------------------------


class DenoisingGenerator(nn.Module):
    """Residual CNN: predicts the noise in a slice (HU / 1000) and subtracts it."""

    def __init__(self, width: int = 24, depth: int = 6):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy - self.body(noisy)


# --- metrics ----------------------------------------------------------------------------------


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float = PSNR_RANGE_HU) -> float:
    """Peak signal-to-noise ratio in dB, over HU clipped to [-1000, 1000]."""
    p, r = np.clip(pred, -1000, 1000), np.clip(ref, -1000, 1000)
    mse = float(np.mean((p.astype(np.float64) - r) ** 2))
    return 10 * math.log10(data_range**2 / max(mse, 1e-12))


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = PSNR_RANGE_HU) -> float:
    """Structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5), mean over the slices."""
    p = torch.as_tensor(np.clip(pred, -1000, 1000), dtype=torch.float64).reshape(-1, 1, *pred.shape[-2:])
    r = torch.as_tensor(np.clip(ref, -1000, 1000), dtype=torch.float64).reshape(-1, 1, *ref.shape[-2:])
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mp, mr = blur(p), blur(r)
    vp, vr, cov = blur(p * p) - mp**2, blur(r * r) - mr**2, blur(p * r) - mp * mr
    s = ((2 * mp * mr + c1) * (2 * cov + c2)) / ((mp**2 + mr**2 + c1) * (vp + vr + c2))
    return float(s.mean())


def gaussian_filter_slices(hu: np.ndarray, sigma: float) -> np.ndarray:
    """The baseline: a plain 2D Gaussian filter on each slice."""
    return ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma=(0,) * (hu.ndim - 2) + (sigma, sigma))


# --- inference --------------------------------------------------------------------------------


def load(device: str = "cpu", path: Path | None = None) -> DenoisingGenerator:
    """The trained generator on ``device`` (eval mode), from the shipped or a given weight file."""
    model = DenoisingGenerator()
    model.load_state_dict(torch.load(path or weights_dir() / WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def preprocess(volume: Volume, params: dict) -> np.ndarray:
    """The slices in HU (the generator works slice by slice on any in-plane size)."""
    return np.asarray(volume.pixels, dtype=np.float32)


def infer(model: DenoisingGenerator, hu: np.ndarray, ctx: RunContext, batch: int = 8) -> np.ndarray:
    """Denoised (k, rows, cols) slices in HU."""
    out = np.empty(hu.shape, dtype=np.float32)
    with ctx.inference():
        for i in range(0, hu.shape[0], batch):
            x = torch.from_numpy(hu[i : i + batch] / HU_SCALE)[:, None].to(ctx.device)
            out[i : i + batch] = model(x)[:, 0].float().cpu().numpy() * HU_SCALE
    return out


def postprocess(volume: Volume, hu: np.ndarray, denoised: np.ndarray, params: dict) -> Outputs:
    """The denoised slices as a derived series on the source geometry."""
    return Outputs(
        derived=[
            DerivedImage(
                pixels=denoised,
                series_description="Denoised (AI, GAN)",
                derivation_description=f"Low-dose noise reduction by a CNN generator trained adversarially ({NAME} {VERSION})",
                derivation_code=("113086", "DCM", "Image Processing"),
            )
        ]
    )


def denoise_slices(model: DenoisingGenerator, hu: np.ndarray) -> np.ndarray:
    """Denoise (k, rows, cols) HU slices; returns the same shape in HU."""
    device = next(model.parameters()).device
    return infer(model, np.asarray(hu, dtype=np.float32), RunContext(device=str(device.type)))


def analyses() -> list[Analysis]:
    """The low-dose CT denoising analysis (discovered by the registry)."""
    return [
        Analysis(
            name=NAME,
            task="reconstruction",
            modalities=("CT",),
            dimensionality="2d",
            algorithm_name="ainode low-dose CT denoising GAN",
            version=VERSION,
            load=load,
            preprocess=preprocess,
            infer=infer,
            postprocess=postprocess,
            weights=weights_dir() / WEIGHTS,
            card=CARD,
            intended_use=intended.REFERENCE[NAME],
            image_check=domain.calibrated_ct,
            gpu_memory_bytes=512 << 20,
            description="Low-dose CT noise reduction (generator trained with adversarial + L1 loss): derived series",
            example=example_series,
        )
    ]


def example_series(
    folder: Path, shape: tuple[int, int, int] = (80, 256, 256), spacing: tuple[float, float, float] = (3.0, 1.4, 1.4)
) -> list[Path]:
    """A clinical-sized phantom CT series (benchmarks): 80 x 256 x 256 at 3 x 1.4 x 1.4 mm."""
    return phantoms.write_ct_series(phantoms.make_ct_phantom(321, shape=shape, spacing=spacing), folder)


# --- evaluation and data (the training loop: workers/training/) --------------------------------


def make_pairs(
    clean_hu: np.ndarray, pixel_mm: np.ndarray, seed: int, photons_range: tuple[float, float] = (2e4, 1e5)
) -> np.ndarray:
    """Noisy versions of clean slices (N, H, W), each at a random dose (I0 per ray, log-uniform)."""
    rng = np.random.default_rng(seed)
    noisy = np.empty_like(clean_hu, dtype=np.float32)
    for i in range(len(clean_hu)):
        photons = math.exp(rng.uniform(math.log(photons_range[0]), math.log(photons_range[1])))
        noisy[i] = simulate_low_dose(clean_hu[i : i + 1], float(pixel_mm[i]), photons, rng)[0]
    return noisy


GAUSSIAN_SIGMAS_PX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def evaluate(model: DenoisingGenerator | None, clean: np.ndarray, noisy: np.ndarray) -> dict:
    """PSNR/SSIM of the noisy input, the Gaussian filter and (if given) the model, on the same slices.

    The Gaussian baseline is given every width in ``GAUSSIAN_SIGMAS_PX`` and reported at the one
    best for PSNR and the one best for SSIM, chosen on these very slices: an oracle baseline, so
    beating it means something.
    """
    result = {"n_slices": int(len(clean)), "noisy": {"psnr_db": psnr(noisy, clean), "ssim": ssim(noisy, clean)}}
    scores = []
    for sigma in GAUSSIAN_SIGMAS_PX:
        smooth = gaussian_filter_slices(noisy, sigma)
        scores.append({"sigma_px": sigma, "psnr_db": psnr(smooth, clean), "ssim": ssim(smooth, clean)})
    result["gaussian_best_psnr"] = max(scores, key=lambda r: r["psnr_db"])
    result["gaussian_best_ssim"] = max(scores, key=lambda r: r["ssim"])
    if model is not None:
        model.eval()
        den = denoise_slices(model, noisy)
        result["model"] = {"psnr_db": psnr(den, clean), "ssim": ssim(den, clean)}
    return result


def training_slices(n_phantoms: int, seed: int, per_phantom: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Axial full-dose 128 x 128 slices (N, H, W) in HU and their pixel size (mm) from the CT phantoms.

    Each phantom (``workers.synthetic.phantoms``, with its liver lesions and lung nodules) gives slices spread
    from the lung bases to the kidneys; field of view and therefore pixel size vary.
    """
    rng = np.random.default_rng(seed)
    slices, pixel = [], []
    for _ in range(n_phantoms):
        anatomy = phantoms.make_anatomy(rng)
        px = float(rng.uniform(2.6, 3.2))
        grid = phantoms.make_grid(
            (per_phantom, 128, 128),
            (200.0 / per_phantom, px, px),
            "axial",
            center_mm=(0.0, 0.0, float(rng.uniform(-20, 20))),
        )
        ct = phantoms.render(anatomy, grid, rng, noise_hu=6.0)  # full dose still has a little noise
        slices.append(ct.hu)
        pixel += [px] * per_phantom
    return np.concatenate(slices), np.asarray(pixel)
