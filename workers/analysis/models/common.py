"""Small helpers shared by the reference models: where weights live, checksums, the device."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path



WORKERS_PACKAGE = Path(__file__).resolve().parents[2]  # workers/
CARDS = WORKERS_PACKAGE.parent / "docs" / "models"  # model cards


def weights_dir() -> Path:
    """The package's folder of shipped weights (workers/weights)."""
    return WORKERS_PACKAGE / "weights"


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, recorded with every result so a finding names its exact model."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_trained(state_dict: dict, out: Path | None, default_name: str, summary: dict) -> Path:
    """Write weights to ``out`` (a file path; default: the shipped file) and the summary JSON beside them.

    The summary gains the weight path and its SHA-256, so a card's numbers name the exact file.
    """
    import torch

    path = Path(out) if out else weights_dir() / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path)
    summary["weights"] = str(path)
    summary["sha256"] = file_sha256(path)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return path
