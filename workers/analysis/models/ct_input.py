"""CT network input shared by the 4 mm segmentation pass and the 2 mm lesion refinement pass:
HU in two intensity windows (kept here so that neither model module imports the other's internals)."""

from __future__ import annotations

import numpy as np

WINDOWS = ((-160.0, 240.0), (-1024.0, 600.0))  # soft tissue, wide (lung/bone), HU


def intensity_channels(hu: np.ndarray) -> np.ndarray:
    """(2, ...) float32: HU scaled to 0..1 in a soft-tissue window and a wide (lung/bone) window."""
    return np.stack([np.clip((hu - lo) / (hi - lo), 0, 1) for lo, hi in WINDOWS]).astype(np.float32)
