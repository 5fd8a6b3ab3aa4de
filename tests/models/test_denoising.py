"""Reconstruction GAN: low-dose CT simulation, the generator on a CT volume, PSNR/SSIM vs baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.analysis import imaging, registry
from workers.analysis.findings import Volume
from workers.analysis.models import denoising as dn
from workers.synthetic import phantoms

HELD_OUT_SEED = 13_579  # training uses 4000-6000 + seed


@pytest.fixture(scope="module")
def model():
    return dn.load("cpu")


def test_fbp_reconstructs_a_disk():
    """The simulator's projector and FBP are a consistent pair: a disk comes back within a few per cent."""
    n = 96
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    disk = torch.as_tensor(((x**2 + y**2) < 30**2).astype(np.float32))[None]
    recon = dn.filtered_back_project(dn.forward_project(disk, 180), n)[0].numpy()
    inner = (x**2 + y**2) < 25**2
    outer = (x**2 + y**2) > 35**2
    assert recon[inner].mean() == pytest.approx(1.0, abs=0.05)
    assert abs(recon[outer & ((x**2 + y**2) < 45**2)].mean()) < 0.05


def test_low_dose_noise_follows_photon_statistics():
    slices, px = dn.training_slices(1, seed=HELD_OUT_SEED, per_phantom=2)
    rng = np.random.default_rng(0)
    noise_hi = dn.simulate_low_dose(slices, float(px[0]), 1e5, rng) - slices
    noise_lo = dn.simulate_low_dose(slices, float(px[0]), 2.5e4, rng) - slices
    body = slices > -500
    # Four times fewer photons: twice the noise; no bias.
    assert noise_lo[body].std() / noise_hi[body].std() == pytest.approx(2.0, rel=0.15)
    assert abs(noise_lo[body].mean()) < 0.1 * noise_lo[body].std()


def test_registry_returns_a_derived_series_on_the_source_geometry(tmp_path):
    ct = phantoms.make_ct_phantom(HELD_OUT_SEED, shape=(4, 64, 64), spacing=(5.0, 5.5, 5.5))
    volume = imaging.load_series(phantoms.write_ct_series(ct, tmp_path))
    findings = registry.run_analysis("ct-denoising", volume, {"device": "cpu"})
    (derived,) = findings.derived
    assert findings.kind == "reconstruction" and len(findings.model_sha256) == 64
    assert derived.pixels.shape == volume.pixels.shape and derived.pixels.dtype == np.float32
    # HU stay HU: the denoised liver is still liver.
    liver = ct.labels == 2
    assert derived.pixels[liver].mean() == pytest.approx(volume.pixels[liver].mean(), abs=15)


def test_non_ct_is_refused():
    volume = Volume(
        pixels=np.zeros((1, 32, 32), np.float32),
        affine=np.eye(4),
        sources=[],
        study_instance_uid="1",
        series_instance_uid="2",
        frame_of_reference_uid="3",
        modality="MR",
    )
    with pytest.raises(registry.AnalysisError, match="accepts CT"):
        registry.run_analysis("ct-denoising", volume, {"device": "cpu"})


def test_ssim_and_psnr_behave():
    rng = np.random.default_rng(1)
    ref = rng.uniform(-900, 900, (2, 48, 48)).astype(np.float32)
    assert dn.ssim(ref, ref) == pytest.approx(1.0)
    assert dn.psnr(ref + 20, ref) == pytest.approx(20 * np.log10(2000 / 20), abs=1e-6)


@pytest.mark.slow
def test_held_out_beats_noisy_input_and_gaussian_filter(model):
    clean, px = dn.training_slices(3, seed=HELD_OUT_SEED)
    noisy = dn.make_pairs(clean, px, seed=HELD_OUT_SEED)
    metrics = dn.evaluate(model, clean, noisy)  # the Gaussian gets its best width on these very slices
    print(metrics)
    model = metrics["model"]
    assert model["psnr_db"] > metrics["noisy"]["psnr_db"] + 1.0, metrics
    assert model["psnr_db"] > metrics["gaussian_best_psnr"]["psnr_db"] + 0.5, metrics
    assert model["ssim"] > metrics["noisy"]["ssim"], metrics
    assert model["ssim"] > metrics["gaussian_best_ssim"]["ssim"], metrics
