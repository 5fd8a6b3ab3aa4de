"""intended: the reference models' declared intended use, and that of configured models.

Kept free of torch and the models, so the node's composition root (``node.service``) can hand
the router these declarations without loading the analysis registry (1.7 s, 270 MiB). Each
reference model's ``Analysis`` carries the same object (``intended_use=REFERENCE[NAME]``).
"""

from __future__ import annotations

from typing import Any

from node.core.intended_use import IntendedUse

TRUNK_CT = dict(
    modalities=("CT",),
    body_regions=("chest", "abdomen", "pelvis"),
    dimensionality="3d",
    min_slices=8,
    min_coverage_mm=40.0,
    pixel_spacing_mm=(0.2, 11.0),
    slice_spacing_mm=(0.2, 12.0),
)

REFERENCE: dict[str, IntendedUse] = {
    "ct-segmentation": IntendedUse(summary="Adult chest and abdomen CT, a 3D volume of at least 8 slices over 40 mm", **TRUNK_CT),
    "ct-lesion-detection": IntendedUse(summary="Adult chest and abdomen CT, a 3D volume of at least 8 slices over 40 mm", **TRUNK_CT),
    "nodule-classification": IntendedUse(
        summary="Frontal chest radiograph (DX/CR), one projection image",
        modalities=("DX", "CR"),
        body_regions=("chest",),
        dimensionality="2d",
    ),
    "ct-denoising": IntendedUse(
        summary="Low-dose CT in Hounsfield units, slice by slice (any body region: the noise, not the anatomy, is learnt)",
        modalities=("CT",),
        dimensionality="2d",
        pixel_spacing_mm=(0.2, 11.0),
    ),
    "ejection-fraction": IntendedUse(
        summary="Cine of one view of the left ventricle (US or MR), at least 8 frames with a frame time",
        modalities=("US", "MR"),
        body_regions=("heart", "chest"),
        dimensionality="2d+t",
        min_frames=8,
    ),
}  # fmt: skip


def configured_use(cfg: Any) -> IntendedUse:
    """A configured (bring-your-own) analysis' intended use: its own declaration, else its modalities."""
    return cfg.intended_use or IntendedUse(modalities=tuple(m.upper() for m in cfg.modalities))


def declared_uses(settings: Any) -> dict[str, IntendedUse]:
    """Every analysis' intended use by name: the reference models', then the configured ones
    (which win, as in the registry)."""
    found = dict(REFERENCE)
    for cfg in getattr(settings, "analyses", None) or []:
        if cfg.format != "builtin":
            found[cfg.name] = configured_use(cfg)
        elif cfg.intended_use is not None:
            found[cfg.name] = cfg.intended_use
    return found
