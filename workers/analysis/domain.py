"""domain: what the image itself shows, checked before a reference model runs on it.

Headers lie or are empty, so each reference model also looks at the pixels and refuses input
outside what it was trained on (``Analysis.image_check``; a refusal ends the job "not
applicable"). These are coarse heuristics on the input domain, not diagnoses; each states its
measure and threshold, and docs/models/*.md give their measured rates on real and phantom images.

- ``adult_trunk_ct``: an axial cut through an adult chest or abdomen is a wide, large body
  section; a head, neck or limb is not (median over the axial slices on a 4 mm grid).
- ``chest_radiograph``: a frontal chest radiograph shows two dark lung fields either side of a
  brighter mediastinum, inside a brighter chest wall.
- ``calibrated_ct``: CT values in Hounsfield units: air around the patient near -1000 HU.
- ``heart_cine``: a cine of one heart view is mostly still tissue with one moving region; a
  stack of slices through an organ changes everywhere from image to image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from workers.analysis import imaging
from workers.analysis.findings import Volume

# Adult trunk CT: body section (HU > -500, holes filled) on axial slices, median over slices.
TRUNK_MIN_AREA_CM2 = 300.0
TRUNK_MIN_WIDTH_MM = 220.0
GRID_MM = 4.0
BODY_HU = -500.0
MIN_SECTION_CM2 = 20.0
AIR_HU, MAX_HU = (
    -800.0,
    4000.0,
)  # calibrated CT: the 0.5 % and 99.5 % values  # slices with less body than this (beyond the patient) are not counted

# Chest radiograph: lung fields darker than the mediastinum by this share of the 1-99 % range.
LUNG_CONTRAST = 0.08

# Heart cine: the share of the imaged field whose values barely change over the loop.
STILL_CHANGE = 0.10  # a pixel is still when its temporal spread is under 10 % of the image range
MIN_STILL_SHARE = 0.45
CINE_SIZE = 64


def body_sections(volume: Volume) -> tuple[float, float]:
    """(median body-section area in cm², median left-right width in mm) over the axial slices
    of the volume resampled onto an axis-aligned 4 mm grid (any acquisition plane)."""
    hu, _, _ = imaging.on_canonical_grid(volume, GRID_MM, order=1, fill=-1024.0)
    areas, widths = [], []
    for axial in hu:
        body = ndimage.binary_fill_holes(axial > BODY_HU)
        labels, n = ndimage.label(body)
        if n == 0:
            continue
        sizes = ndimage.sum(body, labels, range(1, n + 1))
        largest = labels == int(np.argmax(sizes)) + 1
        area = largest.sum() * GRID_MM * GRID_MM / 100.0
        if area < MIN_SECTION_CM2:
            continue
        columns = np.flatnonzero(largest.any(axis=0))
        areas.append(area)
        widths.append((columns[-1] - columns[0] + 1) * GRID_MM)
    if not areas:
        return 0.0, 0.0
    return float(np.median(areas)), float(np.median(widths))


def adult_trunk_ct(volume: Volume) -> str | None:
    """None for a CT of an adult chest/abdomen, else why not (a head, neck, limb or an empty field)."""
    area, width = body_sections(volume)
    if area < TRUNK_MIN_AREA_CM2 or width < TRUNK_MIN_WIDTH_MM:
        return (
            f"the image shows a body section of {area:.0f} cm², {width:.0f} mm wide (median over axial slices): "
            f"not an adult chest or abdomen (at least {TRUNK_MIN_AREA_CM2:.0f} cm² and {TRUNK_MIN_WIDTH_MM:.0f} mm)"
        )
    return None


def calibrated_ct(volume: Volume) -> str | None:
    """None when the CT's values look like Hounsfield units (air near -1000 HU, nothing far above
    bone), else why not (an uncalibrated or derived image)."""
    low, high = np.percentile(volume.pixels, (0.5, 99.5))
    if low > AIR_HU or high > MAX_HU:
        return f"values from {low:.0f} to {high:.0f}: not a CT in Hounsfield units with air around the patient"
    return None


def lung_field_contrast(image: np.ndarray) -> tuple[float, float, float]:
    """(left lung field, right lung field, chest wall) darkness relative to the mediastinum, as a
    share of the image's 1-99 % range, on the middle third of the image's height.

    Columns are split in fifths: the outer fifths hold the chest wall (or air), the second and
    fourth the lung fields, the middle one the mediastinum and spine."""
    lo, hi = np.percentile(image, (1, 99))
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    rows = scaled.shape[0]
    band = scaled[rows // 3 : 2 * rows // 3]
    fifths = np.array_split(np.median(band, axis=0), 5)
    wall = min(float(np.median(fifths[0])), float(np.median(fifths[4])))
    left, centre, right = (float(np.median(f)) for f in (fifths[1], fifths[2], fifths[3]))
    return centre - left, centre - right, wall - min(left, right)


def chest_radiograph(volume: Volume) -> str | None:
    """None for a frontal chest radiograph (two lung fields darker than the mediastinum)."""
    if volume.pixels.shape[0] != 1:
        return f"{volume.pixels.shape[0]} images: a single projection radiograph is needed"
    left, right, _wall = lung_field_contrast(volume.pixels[0])
    if min(left, right) < LUNG_CONTRAST:
        return (
            "the image shows no two lung fields darker than the mediastinum "
            f"(contrast {left:.2f} and {right:.2f}, at least {LUNG_CONTRAST:.2f} needed): not a frontal chest radiograph"
        )
    return None


def still_share(frames: np.ndarray) -> float:
    """Share of the imaged field whose temporal spread stays under ``STILL_CHANGE`` of the loop's
    1-99 % range, on frames shrunk to 64 pixels and lightly blurred (speckle changes every frame
    of an ultrasound loop even where the tissue does not move)."""
    zoom = CINE_SIZE / max(frames.shape[1:])
    small = ndimage.gaussian_filter(ndimage.zoom(frames, (1, zoom, zoom), order=1), (0, 1.5, 1.5))
    lo, hi = np.percentile(small, (1, 99))
    scaled = (small - lo) / max(hi - lo, 1e-6)
    field = scaled.mean(axis=0) > 0.05
    if not field.any():
        return 0.0
    return float((scaled.std(axis=0)[field] < STILL_CHANGE).mean())


def heart_cine(volume: Volume) -> str | None:
    """None for a cine of one heart view (mostly still, one moving region)."""
    share = still_share(volume.pixels)
    if share < MIN_STILL_SHARE:
        return (
            f"{share:.0%} of the field stays still over the frames (at least {MIN_STILL_SHARE:.0%} in a cine of one "
            "heart view): the frames look like different slices, not one view over time"
        )
    return None
