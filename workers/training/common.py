"""Helpers shared by the trainers: saving trained weights with their summary."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workers.analysis.models.common import weights_dir
from workers.analysis.registry import file_sha256


def save_trained(state_dict: dict, out: Path | None, default_name: str, summary: dict) -> Path:
    """Write weights to ``out`` (a file path; default: the shipped file) and the summary JSON beside them.

    The summary gains the weight path and its SHA-256, so a card's numbers name the exact file.
    """
    path = Path(out) if out else weights_dir() / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path)
    summary["weights"] = weights_record(path)
    summary["sha256"] = file_sha256(path)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return path


def weights_record(path: Path) -> str:
    """How metadata names a weight file: relative to the repository when shipped, else in full."""
    repository = weights_dir().parent.parent
    path = Path(path).resolve()
    return str(path.relative_to(repository)) if path.is_relative_to(repository) else str(path)
