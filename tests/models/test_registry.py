"""Model registry: built-in discovery, external TorchScript / ONNX / MONAI-bundle models by
configuration, checksums and versions in findings, per-process model cache, clear refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.core.settings import AnalysisSettings, Settings
from workers.analysis import registry
from workers.analysis.imaging import load_series
from workers.synthetic.phantoms import make_ct_phantom, write_ct_series

ROOT = Path(__file__).resolve().parents[2]
WINDOW = (-1024.0, 976.0)  # 0..1 over 2000 HU


class ThresholdNet(torch.nn.Module):
    """A two-class "segmenter" whose answer is known: foreground where HU > 0 (window midpoint
    is -24 HU; the bias shifts the decision to 0 HU). Lets the test predict the exact mask."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 100.0
            self.conv.bias[1] = -100.0 * (0.0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0])

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def external_models(tmp_path_factory):
    """The same network as TorchScript, ONNX and a MONAI bundle."""
    folder = tmp_path_factory.mktemp("models")
    net = ThresholdNet().eval()
    example = torch.zeros(1, 1, 16, 16, 16)
    torch.jit.trace(net, example).save(str(folder / "threshold.ts"))
    torch.onnx.export(
        net,
        (example,),
        str(folder / "threshold.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "b", 2: "d", 3: "h", 4: "w"}},
        dynamo=False,
    )
    bundle = folder / "threshold_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    # The bundle describes its network in its config; we save a MONAI BasicUNet-free conv net.
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "2.3.1", "name": "threshold"}))
    (bundle / "configs" / "inference.json").write_text(
        json.dumps(
            {"network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}}
        )
    )
    torch.save({"weight": net.conv.weight.detach(), "bias": net.conv.bias.detach()}, bundle / "models" / "model.pt")
    return folder


def _settings(folder: Path) -> Settings:
    params = {"window": list(WINDOW), "roi_size": [32, 32, 32], "version": "1.4"}
    return Settings(
        analyses=[
            AnalysisSettings(
                name="thr-ts", format="torchscript", path=folder / "threshold.ts", labels=["dense"], params=params
            ),
            AnalysisSettings(
                name="thr-onnx", format="onnx", path=folder / "threshold.onnx", labels=["dense"], params=params
            ),
            AnalysisSettings(
                name="thr-bundle",
                format="monai_bundle",
                path=folder / "threshold_bundle",
                labels=["dense"],
                params={k: v for k, v in params.items() if k != "version"},
            ),
        ]
    )


@pytest.mark.parametrize("name", ["thr-ts", "thr-onnx", "thr-bundle"])
def test_external_model_mask_lands_on_expected_voxels(tmp_path, external_models, name):
    phantom = make_ct_phantom(11, shape=(10, 40, 40), spacing=(6.0, 8.0, 8.0), orientation="coronal", descending=True)
    volume = load_series(write_ct_series(phantom, tmp_path, instance_order="shuffled"))
    findings = registry.run_analysis(name, volume, {}, settings=_settings(external_models))
    assert findings.kind == "segmentation"
    (segment,) = findings.segments
    expected = volume.pixels > 0.0
    # Exactly the dense voxels, up to float rounding at the decision boundary.
    assert (segment.mask != expected).mean() < 0.002
    assert segment.mask.sum() > 1000
    weights = {
        "thr-ts": external_models / "threshold.ts",
        "thr-onnx": external_models / "threshold.onnx",
        "thr-bundle": external_models / "threshold_bundle" / "models" / "model.pt",
    }[name]
    assert findings.model_sha256 == registry.file_sha256(weights)
    assert findings.algorithm_version == ("2.3.1" if name == "thr-bundle" else "1.4")
    assert set(findings.timings_s) == {"load_model", "preprocess", "inference", "postprocess"}


def test_model_is_loaded_once_per_process(external_models):
    settings = _settings(external_models)
    analysis = registry.get_analysis("thr-ts", settings)
    first = registry.loaded_model(analysis, "cpu")
    assert registry.loaded_model(registry.get_analysis("thr-ts", settings), "cpu") is first


def test_refusals_are_clear(tmp_path, external_models):
    phantom = make_ct_phantom(1, shape=(4, 16, 16))
    volume = load_series(write_ct_series(phantom, tmp_path))
    with pytest.raises(registry.AnalysisError, match="unknown analysis 'nope'"):
        registry.run_analysis("nope", volume)
    volume.modality = "MR"
    with pytest.raises(registry.AnalysisError, match="accepts CT images, not MR"):
        registry.run_analysis("thr-ts", volume, settings=_settings(external_models))
    missing = Settings(analyses=[AnalysisSettings(name="gone", format="onnx", path=tmp_path / "none.onnx")])
    volume.modality = "CT"
    with pytest.raises(registry.AnalysisError, match="weights not found"):
        registry.run_analysis("gone", volume, settings=missing)


def test_builtin_models_are_discovered():
    found = registry.builtin_analyses()
    assert {"ct-segmentation", "ct-lesion-detection"} <= set(found)
    for analysis in found.values():
        assert analysis.version and analysis.modalities


def test_ainode_models_lists_versions_and_checksums(tmp_path, external_models):
    config = tmp_path / "ainode.yaml"
    config.write_text(
        f"analyses:\n  - name: thr-onnx\n    format: onnx\n    path: {external_models / 'threshold.onnx'}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "models", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "ct-segmentation" in run.stdout and "thr-onnx" in run.stdout
    assert registry.file_sha256(external_models / "threshold.onnx")[:12] in run.stdout
    assert run.returncode == 0, run.stdout + run.stderr


def test_checksum_covers_every_weight_file_and_a_missing_one_is_named(tmp_path):
    """A model made of two networks records one sha256 over both files; changing either changes it,
    and a missing second file stops the analysis with its path instead of running half a model."""
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"first network")
    second.write_bytes(b"second network")
    analysis = dataclasses.replace(registry.get_analysis("ct-segmentation"), weights=first, extra_weights=(second,))
    before = registry.analysis_sha256(analysis)
    assert before == hashlib.sha256(b"first network" + b"second network").hexdigest()
    second.write_bytes(b"second network, retrained")
    os.utime(second, (1, 1))  # a new mtime, as a copied-in file would have
    assert registry.analysis_sha256(analysis) not in ("", before)
    second.unlink()
    assert not registry.weights_present(analysis) and registry.analysis_sha256(analysis) == ""
    with pytest.raises(registry.AnalysisError, match="b.pt"):
        registry.loaded_model(analysis, "cpu")
