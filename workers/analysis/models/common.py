"""Small helpers shared by the reference models: where weights and model cards live."""

from __future__ import annotations

from pathlib import Path

WORKERS_PACKAGE = Path(__file__).resolve().parents[2]  # workers/
CARDS = WORKERS_PACKAGE.parent / "docs" / "models"  # model cards


def weights_dir() -> Path:
    """The package's folder of shipped weights (workers/weights)."""
    return WORKERS_PACKAGE / "weights"
