"""Key slices of a study with its results drawn on them: segmentation outlines and detection boxes.

The dashboard's study page and ``ainode demo`` show these PNGs. They are rendered server-side
from the stored source instances and the result objects the analysis wrote (numpy + Pillow): SEG
masks, and the image regions (boxes, points) of detections in TID 1500 SRs. What is drawn is
exactly what the PACS received, on the exact source pixels the results reference.

Which slices are key (``key_slices``), as a radiologist reads a study: the largest lesion (by
volume) at its widest cross-section first, then the next largest lesions likewise; a tie goes to the slice with
the most findings on it. Without lesions, the slices with the most segmented area; else the middle.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from scipy import ndimage
from sqlalchemy import func, select

from node.core.db import database_session
from node.core.settings import Settings
from node.index import NODE_OUTPUT, Instance, Series, Study
from node.jobs.table import Job

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP_CLASS_PREFIX, KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.88.59"
# Soft-tissue window: organs and lesions of the abdomen are told apart here. The CT default when
# an image names no window of its own.
WINDOW = (-160.0, 240.0)
# Without a window of its own, an image that is not CT shows its values between these percentiles.
PERCENTILES = (0.5, 99.5)
COLOURS = [
    (255, 80, 80),
    (80, 200, 255),
    (255, 220, 60),
    (120, 255, 120),
    (255, 120, 255),
    (255, 160, 40),
    (160, 120, 255),
    (40, 255, 220),
]
# Segments whose label names a lesion are also drawn as detections (a box with the label).
LESION_WORDS = ("lesion", "nodule", "mass", "tumo")


class NoImages(LookupError):
    """The study has no stored images to draw on."""


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the source slice


@dataclass
class Mark:
    """One finding on one slice: a lesion's cross-section (SEG) or a detection's region (SR)."""

    k: int
    label: str
    box: Box
    area: float  # in-plane size in pixels: the lesion's cross-section, or the disc inside the box
    volume_mm3: float = 0.0  # the whole finding: the lesion's volume, or the ball inside the box


@dataclass
class StudyOverlay:
    """A study's image stack (by source SOP Instance UID), its result segments' masks and the
    detections of its result SRs."""

    pixels: np.ndarray  # (k, rows, cols) modality units
    sop_uids: list[str]
    segments: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)  # number -> (label, bool mask)
    detections: list[Mark] = field(default_factory=list)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm: slice step, row, column
    windows: list[tuple[float, float]] = field(default_factory=list)  # per slice (low, high), modality units
    inverted: list[bool] = field(default_factory=list)  # per slice: MONOCHROME1 (white is low)

    @cached_property
    def lesions(self) -> list[list[Mark]]:
        """Each lesion of the lesion-type segments (a 3D connected region): its cross-section per slice."""
        voxel_mm3 = float(np.prod(self.spacing))
        found = []
        for label, mask in self.segments.values():
            if not is_lesion(label):
                continue
            regions, n = ndimage.label(mask)
            for number, where in enumerate(ndimage.find_objects(regions), start=1):
                if where is None:
                    continue
                marks = []
                inside = regions[where] == number
                volume = float(inside.sum()) * voxel_mm3
                for dk, plane in enumerate(inside):
                    area = int(plane.sum())
                    if area:
                        rows, cols = np.nonzero(plane)
                        j0, i0 = where[1].start + int(rows.min()), where[2].start + int(cols.min())
                        j1, i1 = where[1].start + int(rows.max()) + 1, where[2].start + int(cols.max()) + 1
                        marks.append(Mark(where[0].start + dk, label, (i0 - 2, j0 - 2, i1 + 1, j1 + 1), area, volume))
                found.append(marks)
        return found

    def marks_on(self, k: int) -> list[Mark]:
        """The findings on slice k: lesion cross-sections and detections."""
        return [m for lesion in self.lesions for m in lesion if m.k == k] + [d for d in self.detections if d.k == k]

    def area_per_slice(self) -> np.ndarray:
        """Segmented voxels (every segment) on each slice."""
        total = np.zeros(len(self.sop_uids), dtype=np.int64)
        for _, mask in self.segments.values():
            total += mask.reshape(len(self.sop_uids), -1).sum(axis=1)
        return total


def is_lesion(label: str) -> bool:
    """True when a segment label names a lesion-type finding."""
    return any(word in label.lower() for word in LESION_WORDS)


def _largest_series_files(settings: Settings, study_uid: str) -> list[Path]:
    with database_session(settings.database.url) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise NoImages(f"no study {study_uid} in the index")
        series_pk = session.scalar(
            select(Instance.series_pk)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study.id, Series.state != NODE_OUTPUT)
            .group_by(Instance.series_pk)
            .order_by(func.count().desc())
            .limit(1)
        )
        paths = session.scalars(select(Instance.path).where(Instance.series_pk == series_pk)).all()
    return [Path(settings.storage.path) / p for p in paths]


def result_files(settings: Settings, study_uid: str) -> list[Path]:
    """Result objects the study's jobs wrote (from each job's recorded outputs)."""
    out: list[Path] = []
    with database_session(settings.database.url) as session:
        for result in session.scalars(
            select(Job.result).where(Job.study_uid == study_uid, Job.state == "succeeded").order_by(Job.id)
        ):
            try:
                out += [Path(p) for p in json.loads(result or "{}").get("outputs", [])]
            except (ValueError, AttributeError):
                continue
    return [p for p in out if p.exists()]


def display_window(ds: pydicom.Dataset, values: np.ndarray) -> tuple[float, float]:
    """(low, high) in modality units to show an image with: its own VOI window (the first Window
    Center/Width, else the range of its VOI LUT), else the CT soft-tissue window for CT, else the
    0.5th to 99.5th percentile of its values (a radiograph has no fixed scale)."""
    try:
        centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if centre is not None and width is not None:
            centre = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
            width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            if width > 1:
                return centre - width / 2, centre + width / 2
        if "VOILUTSequence" in ds and "LUTDescriptor" in ds.VOILUTSequence[0]:
            entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
            return float(first), float(first + (entries or 65536) - 1)
    except (TypeError, ValueError, IndexError, AttributeError):
        pass  # a malformed window: the defaults below
    if str(ds.get("Modality", "")) == "CT":
        return WINDOW
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _load_stack(
    files: list[Path],
) -> tuple[np.ndarray, list[str], tuple[float, float, float], list[tuple[float, float]], list[bool]]:
    """Pixels (k, rows, cols) sorted along the slice normal, their SOP Instance UIDs, spacing in
    mm, and each slice's display window and polarity."""
    slices, pixel_mm = [], (1.0, 1.0)
    for path in files:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        position = [float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]
        orientation = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
        normal = np.cross(orientation[:3], orientation[3:])
        values = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0)
        )
        inverted = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
        slices.append(
            (float(np.dot(normal, position)), ds.SOPInstanceUID, values, display_window(ds, values), inverted)
        )
        pixel_mm = tuple(float(v) for v in ds.get("PixelSpacing", pixel_mm))
    if not slices:
        raise NoImages("the study has no images")
    slices.sort(key=lambda s: s[0])
    step = float(np.median(np.diff([s[0] for s in slices]))) if len(slices) > 1 else 1.0
    return (
        np.stack([s[2] for s in slices]),
        [s[1] for s in slices],
        (abs(step) or 1.0, *pixel_mm),
        [s[3] for s in slices],
        [s[4] for s in slices],
    )


def _seg_masks(path: Path, sop_uids: list[str], shape: tuple[int, int, int]) -> dict[int, tuple[str, np.ndarray]]:
    ds = pydicom.dcmread(path)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    index = {uid: k for k, uid in enumerate(sop_uids)}
    masks: dict[int, tuple[str, np.ndarray]] = {}
    labelmap = str(ds.get("SegmentationType", "BINARY")) == "LABELMAP"
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        try:
            source_uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        except (AttributeError, IndexError):
            continue
        k = index.get(source_uid)
        if k is None or frames[f].shape != shape[1:]:
            continue
        if labelmap:
            for number, label in labels.items():
                masks.setdefault(number, (label, np.zeros(shape, bool)))[1][k] |= frames[f] == number
            continue
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks.setdefault(number, (labels.get(number, str(number)), np.zeros(shape, bool)))[1][k] |= frames[f] > 0
    return masks


_cache: "OrderedDict[str, StudyOverlay]" = OrderedDict()
_cache_lock = threading.Lock()


def _sr_marks(path: Path, index: dict[str, int], spacing: tuple[float, float, float]) -> list[Mark]:
    """The image regions (TID 1410 SCOORD box or point) of an SR's measurement groups on the slices."""
    marks: list[Mark] = []

    def walk(items: list) -> None:
        label = next(
            (
                str(i.ConceptCodeSequence[0].CodeMeaning)
                for i in items
                if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"
            ),
            None,
        )
        label = label or next(
            (
                str(i.TextValue)
                for i in items
                if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
            ),
            "finding",
        )
        for item in items:
            if item.ValueType == "CONTAINER":
                walk(list(item.get("ContentSequence", [])))
            elif item.ValueType == "SCOORD":
                refs = [
                    r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for r in item.get("ContentSequence", [])
                    if r.ValueType == "IMAGE"
                ]
                k = index.get(refs[0]) if refs else None
                if k is None:
                    continue
                xy = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
                (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
                area = np.pi / 4 * (x1 - x0) * (y1 - y0) if item.GraphicType != "POINT" else 0.0
                diameter_mm = ((x1 - x0) * spacing[2] + (y1 - y0) * spacing[1]) / 2
                pad = 2 if area else 4  # a point gets a small box around it
                box = (int(np.floor(x0)) - pad, int(np.floor(y0)) - pad, int(np.ceil(x1)) + pad, int(np.ceil(y1)) + pad)
                marks.append(Mark(k, label.lower(), box, float(area), float(np.pi / 6 * diameter_mm**3)))

    walk(list(pydicom.dcmread(path).get("ContentSequence", [])))
    return marks


def overlay_from_files(images: list[Path], results: list[Path]) -> StudyOverlay:
    """The overlay of result objects (SEG masks, SR detections; others ignored) on a series' images."""
    pixels, uids, spacing, windows, inverted = _load_stack(images)
    overlay = StudyOverlay(pixels, uids, spacing=spacing, windows=windows, inverted=inverted)
    index = {uid: k for k, uid in enumerate(uids)}
    for path in results:
        sop_class = _sop_class(path)
        if sop_class == SEG_SOP_CLASS:
            for entry in _seg_masks(path, uids, pixels.shape).values():
                overlay.segments[len(overlay.segments) + 1] = entry
        elif sop_class.startswith(SR_SOP_CLASS_PREFIX) and sop_class != KOS_SOP_CLASS:
            overlay.detections += _sr_marks(path, index, spacing)
    return overlay


def study_overlay(settings: Settings, study_uid: str) -> StudyOverlay:
    """The study's largest series with its results drawn from its jobs' outputs (a few studies cached)."""
    results = sorted(result_files(settings, study_uid))
    key = study_uid + "|" + "|".join(str(p) for p in results)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    overlay = overlay_from_files(_largest_series_files(settings, study_uid), results)
    with _cache_lock:
        _cache[key] = overlay
        while len(_cache) > 4:
            _cache.popitem(last=False)
    return overlay


def _sop_class(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
    except Exception:  # noqa: BLE001 - not DICOM: nothing to draw
        return ""


def key_slices(overlay: StudyOverlay, count: int = 3) -> list[int]:
    """Slices to look at first: each lesion at its widest cross-section, the largest (by volume)
    first, a tie going to the slice with more findings; then the most segmented area; else the
    middle slice. Volume, not a single cross-section, decides which lesion is largest: a flat
    speck at the edge of the scan must not outrank a real lesion."""
    findings = np.zeros(len(overlay.sop_uids), dtype=np.int64)
    for k in {m.k for lesion in overlay.lesions for m in lesion} | {d.k for d in overlay.detections}:
        findings[k] = len(overlay.marks_on(k))
    widest = [max(lesion, key=lambda m: (m.area, findings[m.k], -m.k)) for lesion in overlay.lesions if lesion]
    widest += overlay.detections
    ranked = [m.k for m in sorted(widest, key=lambda m: (-m.volume_mm3, -m.area, -findings[m.k], m.k))]
    area = overlay.area_per_slice()
    ranked += [int(k) for k in np.argsort(-area, kind="stable") if area[k] > 0]
    chosen: list[int] = []
    for k in ranked:
        if len(chosen) >= count:
            break
        if all(abs(k - c) > 2 for c in chosen):
            chosen.append(k)
    return chosen or [len(overlay.sop_uids) // 2]


def detections_on(overlay: StudyOverlay, k: int) -> list[tuple[str, Box]]:
    """Boxes (label, (x0, y0, x1, y1)) around each lesion cross-section and detection on slice k."""
    return [(m.label, m.box) for m in overlay.marks_on(k)]


def render_png(overlay: StudyOverlay, k: int, scale: int | None = None) -> bytes:
    """Slice k in its own window (``display_window``; the CT soft-tissue window when none is
    known), segment outlines in colour, lesion boxes with labels."""
    if not 0 <= k < len(overlay.sop_uids):
        raise IndexError(f"slice {k} out of range 0..{len(overlay.sop_uids) - 1}")
    lo, hi = overlay.windows[k] if k < len(overlay.windows) else WINDOW
    grey = (np.clip((overlay.pixels[k] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    if k < len(overlay.inverted) and overlay.inverted[k]:
        grey = 255 - grey
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for n, (label, mask) in enumerate(overlay.segments.values()):
        edge = mask[k] & ~ndimage.binary_erosion(mask[k])
        rgb[edge] = COLOURS[n % len(COLOURS)]
    scale = scale or max(1, 512 // max(grey.shape))
    image = Image.fromarray(rgb).resize((grey.shape[1] * scale, grey.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for label, (x0, y0, x1, y1) in detections_on(overlay, k):
        box = (x0 * scale, y0 * scale, x1 * scale, y1 * scale)
        draw.rectangle(box, outline=(255, 255, 0), width=2)
        draw.text((box[0], max(0, box[1] - 12)), label, fill=(255, 255, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
