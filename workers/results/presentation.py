"""Fallbacks for PACS that cannot show SEG or SR: GSPS outlines and burned-in secondary captures."""

from __future__ import annotations

from collections import defaultdict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from workers.analysis.findings import Findings
from workers.results.context import SERIES_NUMBERS, ResultContext, UIDFactory
from workers.results.kos import slices_with_findings
from workers.results.seg import tracking_uid
from workers.results.sources import SourceImages, add_laterality, contributing_equipment, finish_common

# One colour per segment (RGB), repeated when there are more segments.
PALETTE = [(255, 64, 64), (64, 255, 64), (64, 160, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)]


def mask_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D mask as (N, 2) arrays of (column, row) pixel-corner coordinates.

    Each boundary edge between a set and an unset pixel is taken clockwise around the set pixel;
    chaining the edges gives exact closed polygons (outer borders and holes) without any library.
    """
    m = np.pad(mask.astype(bool), 1)
    core = m[1:-1, 1:-1]
    rows, cols = np.nonzero(core)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # (neighbour offset, start corner, end corner) for top, right, bottom, left edges.
    sides = (((-1, 0), (0, 0), (1, 0)), ((0, 1), (1, 0), (1, 1)), ((1, 0), (1, 1), (0, 1)), ((0, -1), (0, 1), (0, 0)))
    for (dr, dc), (sx, sy), (ex, ey) in sides:
        open_side = ~m[1 + rows + dr, 1 + cols + dc]
        for r, c in zip(rows[open_side], cols[open_side]):
            edges[(c + sx, r + sy)].append((c + ex, r + ey))
    outlines = []
    while edges:
        start = next(iter(edges))
        points = [start]
        point = start
        while True:
            ends = edges[point]
            nxt = ends.pop()
            if not ends:
                del edges[point]
            if nxt == start:
                break
            points.append(nxt)
            point = nxt
            if point not in edges:  # cannot happen for a closed boundary; guard against a loop
                break
        points.append(start)
        outlines.append(_drop_collinear(np.array(points, dtype=float)))
    return outlines


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Keep only the corners of an axis-aligned polyline (fewer graphic points, same shape)."""
    if len(points) < 4:
        return points
    keep = [0]
    for n in range(1, len(points) - 1):
        d1 = points[n] - points[n - 1]
        d2 = points[n + 1] - points[n]
        if d1[0] * d2[1] - d1[1] * d2[0] != 0:
            keep.append(n)
    keep.append(len(points) - 1)
    return points[keep]


def _graphic_objects(findings: Findings, k: int) -> list[hd.pr.GraphicObject]:
    objects = []
    for segment in findings.segments:
        for outline in mask_outlines(segment.slice_mask(k)):
            objects.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=outline,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=(segment.tracking_id or segment.label)[:64],
                    tracking_uid=tracking_uid(findings, segment.tracking_id or segment.label),
                )
            )
    for det in findings.detections:
        if int(round(det.center_kji[0])) == k:
            (_, j0, i0), (_, j1, i1) = det.box_kji
            box = np.array([[i0, j0], [i1 + 1, j0], [i1 + 1, j1 + 1], [i0, j1 + 1], [i0, j0]], dtype=float)
            objects.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=box,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
            )
    return objects


def write_gsps(findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory) -> Dataset | None:
    """One GSPS outlining every finding on the images that carry one; None when nothing was found."""
    ks = [k for k in slices_with_findings(findings) if _graphic_objects(findings, k)]
    if not ks or sources.multiframe:
        # Multi-frame sources would need per-frame annotations; SEG covers them instead.
        return None
    if any(int(sources.header_of_slice(k).get("SamplesPerPixel", 1) or 1) != 1 for k in ks):
        return None  # a grayscale presentation state cannot reference colour images
    layer = hd.pr.GraphicLayer(layer_name="AI_FINDINGS", order=1, description=findings.analysis[:64])
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[sources.header_of_slice(k)],
            graphic_layer=layer,
            graphic_objects=_graphic_objects(findings, k),
        )
        for k in ks
    ]
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[sources.header_of_slice(k) for k in ks],
        series_instance_uid=uids.uid("gsps", "series"),
        series_number=SERIES_NUMBERS["gsps"],
        sop_instance_uid=uids.uid("gsps", "sop"),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=findings.algorithm_name[:64],
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial_number,
        content_label="AI_OUTLINES",
        content_description=f"{findings.analysis} outlines"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        institution_name=ctx.institution_name,
        contributing_equipment=contributing_equipment(findings, ctx),
    )
    add_laterality(gsps, sources.first)
    return finish_common(gsps, sources.first, findings, ctx, f"AI {findings.analysis} outlines")


def _windowed(ds: Dataset) -> np.ndarray:
    """The image as 8-bit grey through its first window (or its full range); a colour image by
    its luminance over its full range."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        rgb = ds.pixel_array.astype(np.float32)
        pixels = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        low, high = float(pixels.min()), float(pixels.max())
        return (np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)
    pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = float(pixels.min()), float(pixels.max()) or 1.0
    return (np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask that touch an unset 4-neighbour."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def overlay_image(findings: Findings, source: Dataset, k: int) -> np.ndarray:
    """RGB rendering of slice k with each segment's border and each detection box burned in."""
    grey = _windowed(source)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for n, segment in enumerate(findings.segments):
        rgb[_boundary(segment.slice_mask(k))] = PALETTE[n % len(PALETTE)]
    for det in findings.detections:
        if int(round(det.center_kji[0])) == k:
            (_, j0, i0), (_, j1, i1) = [tuple(int(round(v)) for v in c) for c in det.box_kji]
            rgb[j0 : j1 + 1, [i0, i1]] = (255, 255, 0)
            rgb[[j0, j1], i0 : i1 + 1] = (255, 255, 0)
    return rgb


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from Image Orientation (Patient), e.g. L, P."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][0 if vector[axis] > 0 else 1]

    return letter(iop[:3]), letter(iop[3:])


def write_secondary_captures(
    findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory
) -> list[Dataset]:
    """One burned-in overlay secondary capture per image with findings."""
    out = []
    if sources.multiframe:
        return out
    for number, k in enumerate(slices_with_findings(findings), 1):
        source = sources.full_dataset(k)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=overlay_image(findings, source, k),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=uids.uid("sc", "series"),
            series_number=SERIES_NUMBERS["sc"],
            sop_instance_uid=uids.uid("sc", "sop", source.SOPInstanceUID),
            instance_number=number,
            manufacturer=ctx.manufacturer,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            patient_orientation=patient_orientation(source),
            contributing_equipment=contributing_equipment(findings, ctx),
        )
        # The findings are drawn into the pixels: viewers must know the image carries annotations.
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = f"AI overlay ({findings.analysis}); not for primary diagnosis"[:10240]
        add_laterality(sc, source)
        out.append(finish_common(sc, source, findings, ctx, f"AI {findings.analysis} overlay"))
    return out
