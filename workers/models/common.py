"""Small helpers shared by the reference models: where weights live, checksums, the device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def weights_dir() -> Path:
    """The package's folder of shipped weights (workers/weights)."""
    return Path(__file__).resolve().parent.parent / "weights"


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, recorded with every result so a finding names its exact model."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inference_device() -> str:
    """CUDA when present, else CPU: the same code runs on both."""
    return "cuda" if torch.cuda.is_available() else "cpu"
