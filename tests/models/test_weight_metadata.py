"""The metadata shipped beside each weight file agrees with the code and with the file itself;
`ainode train` leaves the shipped weights alone unless told to replace them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from workers.analysis.models import classification, denoising, ejection_fraction, segmentation
from workers.analysis.models.common import weights_dir
from workers.analysis.registry import file_sha256

# The code's version of each model that ships weights (lesion-refinement is part of ct-segmentation).
VERSIONS = {module.NAME: module.VERSION for module in (classification, denoising, ejection_fraction, segmentation)}
WEIGHT_FILES = sorted(weights_dir().glob("*.pt"))


def test_every_weight_file_has_metadata():
    assert len(WEIGHT_FILES) >= 5
    assert sorted(p.with_suffix(".json") for p in WEIGHT_FILES) == sorted(weights_dir().glob("*.json"))


@pytest.mark.parametrize("weights", WEIGHT_FILES, ids=lambda p: p.stem)
def test_metadata_matches_the_code_and_the_file(weights: Path):
    text = weights.with_suffix(".json").read_text()
    meta = json.loads(text)
    assert meta["sha256"] == file_sha256(weights), "sha256 is not the file's"
    assert meta["weights"] == f"workers/weights/{weights.name}"
    assert not re.search(r'"/(tmp|home|root|var)/', text), "a path of the machine it was trained on"
    if meta["model"] == "lesion-refinement":
        assert meta["used_by"] == f"{segmentation.NAME} {segmentation.VERSION}"
    else:
        assert meta["version"] == VERSIONS[meta["model"]], "the code's version constant differs"


def test_train_writes_to_a_new_folder_and_leaves_the_shipped_weights(tmp_path: Path):
    shipped = weights_dir() / "ejection_fraction.pt"
    before = file_sha256(shipped), shipped.with_suffix(".json").read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "ejection-fraction", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (file_sha256(shipped), shipped.with_suffix(".json").read_text()) == before
    (written,) = (tmp_path / "trained").glob("ejection-fraction-*/ejection_fraction.pt")
    summary = json.loads(proc.stdout)
    assert Path(summary["weights"]) == written and summary["sha256"] == file_sha256(written)
    assert json.loads(written.with_suffix(".json").read_text())["sha256"] == summary["sha256"]
    assert str(written) in proc.stderr and "shipped weights are unchanged" in proc.stderr


def test_out_and_replace_shipped_exclude_each_other(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "ejection-fraction", "--out", str(tmp_path / "x.pt")]
        + ["--replace-shipped"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
