"""Key slices of a study with its results drawn on them: segmentation outlines and detection boxes.

The dashboard's study page and ``ainode demo`` show these PNGs. They are rendered server-side
from the stored source instances and the result SEG the analysis wrote (numpy + Pillow), so what
is drawn is exactly what the PACS received, on the exact source pixels the SEG references.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from scipy import ndimage
from sqlalchemy import func, select

from node.db import engine_for, session_scope
from node.index import Instance, Series, Study
from node.settings import Settings

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# Soft-tissue window: organs and lesions of the abdomen are told apart here.
WINDOW = (-160.0, 240.0)
COLOURS = [(255, 80, 80), (80, 200, 255), (255, 220, 60), (120, 255, 120), (255, 120, 255),
           (255, 160, 40), (160, 120, 255), (40, 255, 220)]
# Segments whose label names a lesion are also drawn as detections (a box with the label).
LESION_WORDS = ("lesion", "nodule", "mass", "tumo")


class NoImages(LookupError):
    """The study has no stored images to draw on."""


@dataclass
class StudyOverlay:
    """A study's image stack (by source SOP Instance UID) and the masks of its result segments."""

    pixels: np.ndarray  # (k, rows, cols) modality units
    sop_uids: list[str]
    segments: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)  # number -> (label, bool mask)

    def area_per_slice(self, lesions_only: bool = False) -> np.ndarray:
        """Voxels of (lesion) segments on each slice."""
        total = np.zeros(len(self.sop_uids), dtype=np.int64)
        for label, mask in self.segments.values():
            if lesions_only and not is_lesion(label):
                continue
            total += mask.reshape(len(self.sop_uids), -1).sum(axis=1)
        return total


def is_lesion(label: str) -> bool:
    """True when a segment label names a lesion-type finding."""
    return any(word in label.lower() for word in LESION_WORDS)


def _largest_series_files(settings: Settings, study_uid: str) -> list[Path]:
    with session_scope(engine_for(settings.database.url)) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise NoImages(f"no study {study_uid} in the index")
        series_pk = session.scalar(select(Instance.series_pk).join(Series, Instance.series_pk == Series.id)
                                   .where(Series.study_pk == study.id).group_by(Instance.series_pk)
                                   .order_by(func.count().desc()).limit(1))
        paths = session.scalars(select(Instance.path).where(Instance.series_pk == series_pk)).all()
    return [Path(settings.storage.path) / p for p in paths]


def result_files(settings: Settings, study_uid: str) -> list[Path]:
    """Result objects the study's jobs wrote (from each job's recorded outputs)."""
    try:
        from node.jobs import Job
    except ImportError:
        return []
    out: list[Path] = []
    with session_scope(engine_for(settings.database.url)) as session:
        for result in session.scalars(select(Job.result).where(Job.study_uid == study_uid, Job.state == "succeeded")
                                      .order_by(Job.id)):
            try:
                out += [Path(p) for p in json.loads(result or "{}").get("outputs", [])]
            except (ValueError, AttributeError):
                continue
    return [p for p in out if p.exists()]


def _load_stack(files: list[Path]) -> tuple[np.ndarray, list[str]]:
    slices = []
    for path in files:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        position = [float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]
        orientation = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
        normal = np.cross(orientation[:3], orientation[3:])
        values = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        slices.append((float(np.dot(normal, position)), ds.SOPInstanceUID, values))
    if not slices:
        raise NoImages("the study has no images")
    slices.sort(key=lambda s: s[0])
    return np.stack([s[2] for s in slices]), [s[1] for s in slices]


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


def study_overlay(settings: Settings, study_uid: str) -> StudyOverlay:
    """The study's largest series and every result SEG's masks on it (a few studies cached)."""
    seg_files = [p for p in result_files(settings, study_uid) if _is_seg(p)]
    key = study_uid + "|" + "|".join(sorted(str(p) for p in seg_files))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    pixels, uids = _load_stack(_largest_series_files(settings, study_uid))
    overlay = StudyOverlay(pixels, uids)
    for path in seg_files:
        for number, entry in _seg_masks(path, uids, pixels.shape).items():
            overlay.segments[len(overlay.segments) + 1] = entry
    with _cache_lock:
        _cache[key] = overlay
        while len(_cache) > 4:
            _cache.popitem(last=False)
    return overlay


def _is_seg(path: Path) -> bool:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) == SEG_SOP_CLASS
    except Exception:  # noqa: BLE001 - not DICOM: not a SEG
        return False


def key_slices(overlay: StudyOverlay, count: int = 3) -> list[int]:
    """Slices to look at first: most lesion area, then most segmented area, else the middle."""
    chosen: list[int] = []
    for lesions_only in (True, False):
        area = overlay.area_per_slice(lesions_only)
        for k in np.argsort(-area, kind="stable"):
            if area[k] == 0 or len(chosen) >= count:
                break
            if all(abs(int(k) - c) > 2 for c in chosen):
                chosen.append(int(k))
    if not chosen:
        chosen.append(len(overlay.sop_uids) // 2)
    return chosen


def detections_on(overlay: StudyOverlay, k: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Boxes (label, (x0, y0, x1, y1)) around each connected lesion region on slice k."""
    boxes = []
    for label, mask in overlay.segments.values():
        if not is_lesion(label):
            continue
        regions, _ = ndimage.label(mask[k])
        for found in ndimage.find_objects(regions):
            if found is not None:
                rows, cols = found
                boxes.append((label, (cols.start - 2, rows.start - 2, cols.stop + 1, rows.stop + 1)))
    return boxes


def render_png(overlay: StudyOverlay, k: int, scale: int | None = None) -> bytes:
    """Slice k windowed to soft tissue, segment outlines in colour, lesion boxes with labels."""
    if not 0 <= k < len(overlay.sop_uids):
        raise IndexError(f"slice {k} out of range 0..{len(overlay.sop_uids) - 1}")
    lo, hi = WINDOW
    grey = (np.clip((overlay.pixels[k] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
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
