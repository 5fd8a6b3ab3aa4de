"""CUDA: every built-in analysis runs on the GPU (autocast) and agrees with its CPU result.

Skipped where no CUDA device exists (CI); run on a lent GPU machine. The CPU result is the
reference: masks must overlap (Dice), probabilities and measurements must agree closely, since
float16 autocast may move values near a decision boundary but not change what the model finds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.analysis import imaging, registry
from workers.analysis.models import segmentation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

SMALL_CT = {"shape": (40, 128, 128), "spacing": (6.0, 2.8, 2.8)}


def _both(name: str, tmp_path: Path):
    analysis = registry.get_analysis(name)
    kwargs = SMALL_CT if name.startswith("ct-") else {}
    volume = imaging.load_series(analysis.example(tmp_path, **kwargs))
    cpu = registry.run_analysis(name, volume, {"device": "cpu"})
    gpu = registry.run_analysis(name, volume, {"device": "cuda"})
    return cpu, gpu


def test_device_is_cuda_when_a_gpu_has_room():
    assert registry.pick_device(registry.get_analysis("ct-segmentation"), {}) == "cuda"


def test_segmentation_on_gpu_matches_cpu(tmp_path):
    cpu, gpu = _both("ct-segmentation", tmp_path)
    cpu_masks = {s.tracking_id: s.full_mask() for s in cpu.segments}
    gpu_masks = {s.tracking_id: s.full_mask() for s in gpu.segments}
    assert set(cpu_masks) == set(gpu_masks)
    for label, mask in cpu_masks.items():
        if mask.sum() >= 50:  # a few boundary voxels may flip; tiny structures are all boundary
            assert segmentation.dice(mask, gpu_masks[label]) >= 0.97, label
    assert gpu.model_sha256 == cpu.model_sha256


def test_detection_on_gpu_matches_cpu(tmp_path):
    cpu, gpu = _both("ct-lesion-detection", tmp_path)
    assert len(cpu.detections) == len(gpu.detections)
    for a, b in zip(cpu.detections, gpu.detections):
        assert np.allclose(a.center_kji, b.center_kji, atol=1.0)
        assert abs(a.score - b.score) < 0.05


def test_classification_on_gpu_matches_cpu(tmp_path):
    cpu, gpu = _both("nodule-classification", tmp_path)
    assert abs(cpu.classifications[0].probability - gpu.classifications[0].probability) < 0.02


def test_denoising_on_gpu_matches_cpu(tmp_path):
    cpu, gpu = _both("ct-denoising", tmp_path)
    a, b = cpu.derived[0].pixels, gpu.derived[0].pixels
    assert a.shape == b.shape
    assert float(np.abs(a.astype(np.float64) - b).mean()) < 2.0  # HU


def test_ejection_fraction_on_gpu_matches_cpu(tmp_path):
    cpu, gpu = _both("ejection-fraction", tmp_path)
    assert abs(cpu.measurements[0].value - gpu.measurements[0].value) < 1.0  # EF points


def test_model_is_loaded_once_per_device(tmp_path):
    analysis = registry.get_analysis("nodule-classification")
    assert registry.loaded_model(analysis, "cuda") is registry.loaded_model(analysis, "cuda")
