"""imaging: stored DICOM instances to ``Volume`` objects with exact geometry (and back to grids).

``load_groups(paths)`` reads one series, single-frame slices or multi-frame instances (enhanced
CT/MR, ultrasound cine), decodes any transfer syntax pydicom can (pylibjpeg / GDCM plugins for
JPEG, JPEG-LS, JPEG 2000, RLE), applies the modality LUT (rescale slope/intercept, per frame),
and splits the series into groups by what distinguishes its images: image size and Image
Orientation (Patient) always; where positions repeat, echo (Echo Numbers / Echo Time), diffusion
b-value, temporal phase (Temporal Position, Trigger Time) and Acquisition Number, in that order.
Each group becomes one ``Volume`` of a kind:

- ``volume``: distinct positions along the slice normal, one orientation, evenly spaced (within
  ``SPACING_TOLERANCE``); ordered by position, never by Instance Number;
- ``cine``: one multi-frame instance with a Frame Time (Vector), or images at one position that
  differ in time (Temporal Position Identifier / Index, Trigger Time); ordered in time;
- ``images``: anything else (2D images, a stack at repeated positions, uneven spacing), with a
  ``note`` saying why it is not a volume, so a 3D analysis refuses it with that reason.

``load_series(paths)`` is the same for a series that forms one group. Slices are never
resampled: the one-slice-per-source-image mapping is what result objects rely on.

``resample_to_spacing`` / ``resample_back`` move arrays between the source grid and a model's
working grid, keeping the affine exact so masks land back on the source voxels.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from scipy import ndimage

from node.core import volumes
from workers.analysis.findings import SourceFrame, Volume, VolumeKind

# Positions within this fraction of the median slice step count as evenly spaced.
SPACING_TOLERANCE = 0.05
ORIENTATION_TOLERANCE = 1e-3
# Two images closer than this along the slice normal (mm) are at the same position.
POSITION_TOLERANCE = 1e-3


class SeriesError(ValueError):
    """The instances cannot be read as images; the message says why, for the job record."""


@dataclass
class _Frame:
    """One 2D image (a slice or one frame) with its geometry and where it came from."""

    stored: np.ndarray  # (rows, cols) stored values as decoded (grey); modality units: values()
    dataset: Dataset  # the instance (its header): rescale and MONOCHROME1 inversion
    transform: Dataset | None  # the functional group holding the frame's rescale, if any
    position: np.ndarray | None  # Image Position (Patient), mm
    orientation: np.ndarray | None  # 6 direction cosines (row, column)
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    source: SourceFrame
    order_key: tuple  # fallback order when there is no geometry
    thickness: float | None = None
    # What tells images at one position apart (None: not in the header).
    echo: str | None = None  # Echo Numbers, else Echo Time (ms)
    b_value: float | None = None  # Diffusion b-value
    temporal_position: int | None = None  # Temporal Position Identifier / Index
    trigger_ms: float | None = None  # Trigger Time / Nominal Cardiac Trigger Delay Time
    acquisition: str | None = None  # Acquisition Number
    frame_time_s: float | None = None  # of the multi-frame instance this frame belongs to

    @property
    def located(self) -> bool:
        return self.position is not None and self.orientation is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    def values_into(self, out: np.ndarray) -> None:
        """Write the frame in modality units into ``out`` (float32, the volume's slice): the
        arithmetic of ``_monochrome1(_rescale(stored as float32))`` done in place, so assembling
        a 300-slice CT makes no per-slice temporaries (same float32 rounding, voxel for voxel)."""
        out[...] = self.stored
        slope, intercept = _rescale_terms(self.dataset, self.transform)
        out *= slope
        out += intercept
        inverted = _monochrome1_sum(self.dataset)
        if inverted is not None:  # computed in float64 and rounded once, as _monochrome1 does
            np.subtract(inverted, out, out=out, casting="same_kind")


# --- reading ----------------------------------------------------------------------------------


def load_groups(paths: Iterable[str | Path], allow_mixed_series: bool = False) -> list[Volume]:
    """Read the instances of one series and return one ``Volume`` per group of images that belong
    together (see the module's docstring), largest first.

    Raises ``SeriesError`` for unreadable files and (unless allowed) instances of several series.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesError("no instances given")
    stored, pixels_from = _streamed(paths)
    datasets = []
    for n, path in enumerate(paths):
        ds = _read(path, header_only=stored[n] is not None)
        if stored[n] is not None and not _streamable(ds):  # the streamer refuses these: never trust a slot
            stored[n], ds = None, _read(path)
            pixels_from = _pixels_from(stored, "a header says colour")
        datasets.append(ds)
    series = {ds.get("SeriesInstanceUID", "") for ds in datasets}
    if len(series) > 1 and not allow_mixed_series:
        raise SeriesError(f"the instances belong to {len(series)} different series")
    frames: list[_Frame] = []
    for n, (path, ds) in enumerate(zip(paths, datasets)):
        frames.extend(_frames_of(ds, path, stored[n]))
    groups = _partition(frames)
    if len(groups) == 1:
        groups = [(groups[0][0], [])]  # one group: nothing to tell it from
    groups.sort(key=lambda g: (-len(g[0]), ", ".join(g[1])))
    first = datasets[0]
    # Header-only reads (streamed pixels) are what the result writers read: hand them over.
    headers = {
        str(ds.SOPInstanceUID): ds for n, ds in enumerate(datasets) if stored[n] is not None and "SOPInstanceUID" in ds
    }
    return [_volume(members, ", ".join(label), first, pixels_from, headers) for members, label in groups]


def _streamed(paths: list[Path]) -> tuple[list[np.ndarray | None], str]:
    """Each instance's stored values from the series' streamed volume (decoded once at ingest),
    None for those read from their files (not streamed yet, changed, corrupted: the files are the
    truth, and an instance decodes the same from either); and where the pixels came from, for the
    job record: "streamed", "files: <why>" or "streamed N/M; files: <why>"."""
    values, why = volumes.streamed_values(paths)
    return values, _pixels_from(values, why)


def _pixels_from(values: list[np.ndarray | None], why: str) -> str:
    streamed = sum(v is not None for v in values)
    if streamed == len(values):
        return "streamed"
    if streamed == 0:
        return f"files: {why}"
    return f"streamed {streamed}/{len(values)}; files: {why}"


def _streamable(ds: Dataset) -> bool:
    """Grey images only: colour conversion stays with the file loader (as in the streamer)."""
    return (
        int(ds.get("SamplesPerPixel", 1) or 1) == 1 and str(ds.get("PhotometricInterpretation", "")) != "PALETTE COLOR"
    )


def load_series(paths: Iterable[str | Path], allow_mixed_series: bool = False) -> Volume:
    """Read the instances of one series that form one group (a volume, a cine or 2D images).

    Raises ``SeriesError`` for unreadable files, mixed series, and a series whose images form
    several groups (e.g. two echoes or a localizer mixed in; ``load_groups`` returns them apart).
    """
    groups = load_groups(paths, allow_mixed_series)
    if len(groups) > 1:
        named = "; ".join(f"{g.label} ({g.pixels.shape[0]} images)" for g in groups)
        raise SeriesError(f"the series holds {len(groups)} groups of images: {named}")
    return groups[0]


def _volume(
    frames: list[_Frame], label: str, first: Dataset, pixels_from: str = "files", headers: dict | None = None
) -> Volume:
    kind, frames, affine, frame_time, note = _assemble(frames)
    read = headers or {}
    # Each frame goes straight into its place: no list of per-slice copies, no second stack.
    pixels = np.empty((len(frames), *frames[0].shape), dtype=np.float32)

    def fill(k: int) -> None:
        frames[k].values_into(pixels[k])

    # numpy releases the GIL in the conversion: the worker's CPU threads share the slices.
    threads = min(cpu_threads(), len(frames) // 16)
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="assemble") as pool:
            list(pool.map(fill, range(len(frames))))
    else:
        for k in range(len(frames)):
            fill(k)
    return Volume(
        pixels=pixels,
        affine=affine,
        sources=[f.source for f in frames],
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.get("Modality", "OT")),
        frame_time_s=frame_time,
        kind=kind,
        label=label,
        note=note,
        pixels_from=pixels_from,
        headers={uid: read[uid] for uid in dict.fromkeys(f.source.sop_instance_uid for f in frames) if uid in read},
    )


def _read(path: Path, header_only: bool = False) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    except Exception as err:  # pydicom raises many types for broken files
        raise SeriesError(f"{path.name}: not a readable DICOM file ({err.__class__.__name__}: {err})") from None
    if header_only:  # the pixels come from the streamed volume, which only holds instances with some
        return ds
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SeriesError(f"{_instance(ds, path)}: has no Pixel Data (7FE0,0010)")
    return ds


def _instance(ds: Dataset, path: Path) -> str:
    """How an error names an instance: its SOP Instance UID (the stored file name is a hash)."""
    uid = ds.get("SOPInstanceUID")
    return f"SOP Instance UID {uid}" if uid else path.name


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """All frames of an instance as (frames, rows, cols) float32 stored values (grey)."""
    try:
        arr = ds.pixel_array
    except Exception as err:
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise SeriesError(
            f"{_instance(ds, path)}: cannot decode Pixel Data (7FE0,0010) (transfer syntax {ts}): {err}"
        ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        arr = _to_grey(apply_color_lut(arr, ds), ds)
    elif samples > 1:
        arr = _to_grey(arr, ds)
    if frames == 1 or arr.ndim == 2:
        arr = arr.reshape((1, *arr.shape[-2:]))
    return arr.astype(np.float32)


def _to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour (e.g. ultrasound) to luminance; pydicom already converted YBR to RGB."""
    rgb = arr.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _rescale_terms(ds: Dataset, per_frame: Dataset | None) -> tuple[float, float]:
    """(slope, intercept) of the instance or, when it has its own, the frame."""
    slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
    if per_frame is not None and "PixelValueTransformationSequence" in per_frame:
        item = per_frame.PixelValueTransformationSequence[0]
        slope, intercept = item.get("RescaleSlope", slope), item.get("RescaleIntercept", intercept)
    slope = float(slope if slope not in (None, "") else 1)
    intercept = float(intercept if intercept not in (None, "") else 0)
    return slope, intercept


def _rescale(values: np.ndarray, ds: Dataset, per_frame: Dataset | None) -> np.ndarray:
    """Stored values to modality units (HU for CT) with the instance's or frame's slope/intercept."""
    slope, intercept = _rescale_terms(ds, per_frame)
    return values * slope + intercept


def _monochrome1(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """MONOCHROME1 (white is low): invert so that higher values are brighter for every model.

    CT values keep their meaning (HU), so CT is left alone; for projection and other images the
    inversion uses the range of the stored bits after rescale.
    """
    inverted = _monochrome1_sum(ds)
    if inverted is None:
        return values
    return (inverted - values).astype(np.float32)


def _monochrome1_sum(ds: Dataset) -> np.float64 | None:
    """For an image to invert (MONOCHROME1, not CT): the sum of the lowest and highest stored
    value after rescale (inverted = sum - value); else None."""
    if str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME1" or ds.get("Modality") == "CT":
        return None
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    lo_r, hi_r = _rescale(np.array([lo, hi], dtype=np.float64), ds, None)
    return lo_r + hi_r


def _frames_of(ds: Dataset, path: Path, stored: np.ndarray | None = None) -> list[_Frame]:
    """The 2D frames of one instance with their geometry (shared and per-frame groups);
    ``stored``: its decoded stored values when they come from the streamed volume."""
    pixels = _decode(ds, path) if stored is None else stored
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    multi = int(ds.get("NumberOfFrames", 1) or 1) > 1 or per_frame_seq is not None
    frame_time = _frame_time_s(ds) if pixels.shape[0] > 1 else None
    acquisition = ds.get("AcquisitionNumber")
    out = []
    for n in range(pixels.shape[0]):
        per_frame = per_frame_seq[n] if per_frame_seq is not None and n < len(per_frame_seq) else None
        groups = [g for g in (per_frame, shared) if g is not None]
        position = _attr_from(groups, ds, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _attr_from(groups, ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = (pixel_spacing(ds, groups) or (None, (1.0, 1.0)))[1]  # uncalibrated: one "mm" per pixel
        thickness = _attr_from(groups, ds, "PixelMeasuresSequence", "SliceThickness")
        transform = next((g for g in groups if "PixelValueTransformationSequence" in g), None)
        temporal = _temporal_index(per_frame)
        echo = _attr_from(groups, ds, "MREchoSequence", "EffectiveEchoTime")
        if echo is None:
            echo = _echo(ds)
        b_value = _attr_from(groups, ds, "MRDiffusionSequence", "DiffusionBValue")
        temporal_position = _attr_from(groups, ds, "FrameContentSequence", "TemporalPositionIndex")
        if temporal_position is None:
            temporal_position = ds.get("TemporalPositionIdentifier")
        trigger = _attr_from(groups, ds, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
        if trigger is None:
            trigger = ds.get("TriggerTime")
        out.append(
            _Frame(
                stored=pixels[n],
                dataset=ds,
                transform=transform,
                position=None if position is None else np.asarray([float(v) for v in position]),
                orientation=None if orientation is None else np.asarray([float(v) for v in orientation]),
                spacing=(float(spacing[0]), float(spacing[1])),
                source=SourceFrame(str(ds.SOPClassUID), str(ds.SOPInstanceUID), path, n + 1 if multi else None),
                order_key=(temporal, int(ds.get("InstanceNumber", 0) or 0), n),
                thickness=float(thickness) if thickness not in (None, "") else None,
                echo=_text(echo),
                b_value=_number(b_value),
                temporal_position=None if _number(temporal_position) is None else int(_number(temporal_position)),
                trigger_ms=_number(trigger),
                acquisition=_text(acquisition),
                frame_time_s=frame_time,
            )
        )
    return out


def _echo(ds: Dataset) -> str | None:
    """Echo Numbers and Echo Time together: vendors differ in which of them tells echoes apart."""
    numbers, time = _text(ds.get("EchoNumbers")), _text(ds.get("EchoTime"))
    if numbers and time:
        return f"{numbers} (TE {time})"
    return numbers or (f"TE {time}" if time else None)


def _text(value) -> str | None:
    """A header value as a grouping key ('1\\2' for several values); None when absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value) or None
    return str(value).strip() or None


def _number(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _attr_from(groups: list[Dataset], ds: Dataset, sequence: str, keyword: str):
    """An attribute from a functional group macro (per-frame first, then shared), else top level."""
    for group in groups:
        if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
            value = group[sequence][0][keyword].value
            if value not in (None, ""):
                return value
    value = ds.get(keyword)
    return value if value not in (None, "") else None


def pixel_spacing(ds: Dataset, groups: list[Dataset] | None = None) -> tuple[str, tuple[float, float]] | None:
    """(where it came from, (row, column) spacing in mm) of an image, else None (uncalibrated).

    In order: Pixel Measures of the functional groups (``groups``: a frame's per-frame group, then
    the shared one; by default frame 1's and the shared of an enhanced image), Pixel Spacing,
    Imager Pixel Spacing (projection images: at the detector), the ultrasound region
    calibration. Zero, negative or malformed values (a CR with Pixel Spacing 0\\0) are skipped.
    """
    if groups is None:
        groups = functional_groups(ds, 0)
    for keyword, value in (
        ("PixelMeasuresSequence", _attr_from(groups, Dataset(), "PixelMeasuresSequence", "PixelSpacing")),
        ("PixelSpacing", ds.get("PixelSpacing")),
        ("ImagerPixelSpacing", ds.get("ImagerPixelSpacing")),
        ("SequenceOfUltrasoundRegions", _us_spacing(ds)),
    ):
        if _valid_spacing(value):
            return keyword, (float(value[0]), float(value[1]))
    return None


def functional_groups(ds: Dataset, n: int) -> list[Dataset]:
    """The functional groups that apply to frame ``n`` (0-based): per-frame first, then shared."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    per_frame = per_frame_seq[n] if per_frame_seq is not None and n < len(per_frame_seq) else None
    return [g for g in (per_frame, shared) if g is not None]


def frame_attribute(groups: list[Dataset], ds: Dataset, sequence: str, keyword: str):
    """``keyword`` of a functional group macro ``sequence`` (``groups``: per-frame, then shared),
    else of the top level of ``ds``; None when absent or empty."""
    return _attr_from(groups, ds, sequence, keyword)


def _valid_spacing(spacing) -> bool:
    try:
        return spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
    except (TypeError, ValueError):
        return False


def _us_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Pixel size of an ultrasound region (cm in the header) in mm, when calibrated in cm."""
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None
    region = regions[0]
    if region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
        return float(region.PhysicalDeltaY) * 10, float(region.PhysicalDeltaX) * 10
    return None


def _temporal_index(per_frame: Dataset | None) -> int:
    if per_frame is not None and "FrameContentSequence" in per_frame:
        item = per_frame.FrameContentSequence[0]
        for keyword in ("TemporalPositionIndex", "InStackPositionNumber"):
            if keyword in item and item[keyword].value is not None:
                return int(item[keyword].value)
    return 0


def _frame_time_s(ds: Dataset) -> float | None:
    """Seconds between frames of a cine instance (Frame Time or Frame Time Vector)."""
    if ds.get("FrameTime") not in (None, ""):
        return float(ds.FrameTime) / 1000.0
    vector = ds.get("FrameTimeVector")
    if vector:
        steps = [float(v) for v in list(vector)[1:]]
        return float(np.mean(steps)) / 1000.0 if steps else None
    if ds.get("CineRate"):
        return 1.0 / float(ds.CineRate)
    return None


# --- grouping: what tells the images of a series apart ----------------------------------------

# Where positions repeat, a series is split by the first of these that differs between its
# images. Echo and b-value come before time: a multi-echo cine is one cine per echo.
_SPATIAL_SPLITS: tuple[tuple[str, Callable[[_Frame], object]], ...] = (
    ("echo", lambda f: f.echo),
    ("b-value", lambda f: f.b_value),
)
_TEMPORAL_SPLITS: tuple[tuple[str, Callable[[_Frame], object]], ...] = (
    ("phase", lambda f: f.temporal_position if f.temporal_position is not None else f.trigger_ms),
    ("acquisition", lambda f: f.acquisition),
)

Group = tuple[list[_Frame], list[str]]


def _partition(frames: list[_Frame]) -> list[Group]:
    """The series' frames in groups, each with the words that tell it from the others."""
    groups: list[Group] = []
    sizes = _split_by(frames, lambda f: f.shape)
    for shape, same_size in sizes.items():
        size = [f"{shape[0]}x{shape[1]} images"] if len(sizes) > 1 else []
        groups += _split_unlocated([f for f in same_size if not f.located], size)
        planes = _split_by_orientation([f for f in same_size if f.located])
        for planar in planes:
            cosines = "\\".join(f"{v:g}" for v in np.round(planar[0].orientation, 3) + 0.0)
            words = [*size, f"Image Orientation (Patient) {cosines}"] if len(planes) > 1 else size
            groups += _split_repeats(planar, words)
    return groups


def _split_by(frames: list[_Frame], key: Callable[[_Frame], object]) -> dict:
    out: dict = {}
    for f in frames:
        out.setdefault(key(f), []).append(f)
    return dict(sorted(out.items(), key=lambda item: (item[0] is None, str(item[0]))))


def _split_by_orientation(frames: list[_Frame]) -> list[list[_Frame]]:
    """Frames by Image Orientation (Patient), equal within ORIENTATION_TOLERANCE (cosines written
    with different precision fall together), largest group first."""
    planes: list[list[_Frame]] = []
    for f in frames:
        for plane in planes:
            if np.abs(f.orientation - plane[0].orientation).max() <= ORIENTATION_TOLERANCE:
                plane.append(f)
                break
        else:
            planes.append([f])
    return sorted(planes, key=len, reverse=True)


def _split_unlocated(frames: list[_Frame], words: list[str]) -> list[Group]:
    """Images without geometry: each multi-frame instance with a frame time is a cine loop of its
    own; the other images are one loop when they differ in time, else each instance is a group
    of its own (the views of a radiograph series are separate projections, not one image)."""
    if not frames:
        return []
    loops = _split_by([f for f in frames if f.frame_time_s], lambda f: f.source.sop_instance_uid)
    loops = {uid: members for uid, members in loops.items() if len(members) > 1}
    rest = [f for f in frames if f.source.sop_instance_uid not in loops]
    groups: list[Group] = [(members, [*words, f"cine {uid}"]) for uid, members in loops.items()]
    instances = _split_by(rest, lambda f: f.source.sop_instance_uid)
    if len(instances) == 1 or _is_temporal(rest):
        groups.append((rest, [*words, "images without position"]))
    elif rest:
        groups += [(members, [*words, f"image {uid}"]) for uid, members in instances.items()]
    return groups


def _split_repeats(frames: list[_Frame], words: list[str]) -> list[Group]:
    """One orientation: split where positions repeat, by echo, b-value, then (unless the images
    are one position over time: a cine) phase and acquisition."""
    if len(frames) < 2 or not _positions_repeat(frames):
        return [(frames, words)]
    for name, key in _SPATIAL_SPLITS:
        parts = _split_by(frames, key)
        if len(parts) > 1:
            return [g for value, part in parts.items() for g in _split_repeats(part, [*words, _word(name, value)])]
    if _one_position(frames) and _is_temporal(frames):
        return [(frames, words)]
    for name, key in _TEMPORAL_SPLITS:
        parts = _split_by(frames, key)
        if len(parts) > 1:
            return [g for value, part in parts.items() for g in _split_repeats(part, [*words, _word(name, value)])]
    return [(frames, words)]


def _word(name: str, value: object) -> str:
    if value is None:
        return f"{name} not given"
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def _normal(frame: _Frame) -> np.ndarray:
    row, col = _directions(frame.orientation)
    return np.cross(row, col)


def _positions_repeat(frames: list[_Frame]) -> bool:
    distances = np.sort([float(f.position @ _normal(frames[0])) for f in frames])
    return bool(np.any(np.diff(distances) < POSITION_TOLERANCE))


def _one_position(frames: list[_Frame]) -> bool:
    positions = np.stack([f.position for f in frames])
    return bool(np.ptp(positions, axis=0).max() < POSITION_TOLERANCE)


def _is_temporal(frames: list[_Frame]) -> bool:
    """A loop over time: one multi-frame instance with a frame time, or images whose temporal
    position or trigger time differs from image to image."""
    if len(frames) < 2:
        return False
    if len({f.source.sop_instance_uid for f in frames}) == 1 and frames[0].frame_time_s:
        return True
    for values in ([f.temporal_position for f in frames], [f.trigger_ms for f in frames]):
        if None not in values and len(set(values)) == len(values):
            return True
    return False


def _time_order(frames: list[_Frame]) -> list[_Frame]:
    if all(f.temporal_position is not None for f in frames):
        return sorted(frames, key=lambda f: (f.temporal_position, f.order_key))
    if all(f.trigger_ms is not None for f in frames):
        return sorted(frames, key=lambda f: (f.trigger_ms, f.order_key))
    return sorted(frames, key=lambda f: f.order_key)


def _cine_frame_time(frames: list[_Frame]) -> float | None:
    """Seconds between frames: the instance's Frame Time, else the median step of trigger times."""
    if frames[0].frame_time_s and len({f.source.sop_instance_uid for f in frames}) == 1:
        return frames[0].frame_time_s
    triggers = [f.trigger_ms for f in frames]
    if None not in triggers:
        steps = np.diff(np.asarray(triggers, dtype=float))
        steps = steps[steps > 0]
        if len(steps):
            return float(np.median(steps)) / 1000.0
    return None


def _assemble(frames: list[_Frame]) -> tuple[VolumeKind, list[_Frame], np.ndarray, float | None, str]:
    """A group's kind, its frames in order, its affine, its frame time (cine) and, for 2D images,
    why they are not a volume."""
    if not all(f.located for f in frames):
        if _is_temporal(frames):
            ordered = _time_order(frames)
            return "cine", ordered, _affine_without_stack(ordered[0]), _cine_frame_time(ordered), ""
        ordered = sorted(frames, key=lambda f: f.order_key)
        note = "" if len(frames) == 1 else "the images have no Image Position/Orientation (Patient)"
        return "images", ordered, _affine_without_stack(ordered[0]), None, note
    if len(frames) == 1:
        return "images", frames, _affine_without_stack(frames[0]), None, ""
    if _one_position(frames):
        ordered = _time_order(frames)
        if _is_temporal(frames):
            return "cine", ordered, _affine_without_stack(ordered[0]), _cine_frame_time(ordered), ""
        note = f"the {len(frames)} images share one position and nothing tells them apart in time"
        return "images", ordered, _affine_without_stack(ordered[0]), None, note
    try:
        ordered, affine = _stack(frames)
    except SeriesError as err:
        ordered = sorted(frames, key=lambda f: (float(f.position @ _normal(frames[0])), f.order_key))
        return "images", ordered, _affine_without_stack(ordered[0]), None, str(err)
    return "volume", ordered, affine, None, ""


# --- geometry ---------------------------------------------------------------------------------


def _affine_without_stack(frame: _Frame) -> np.ndarray:
    """Affine of a 2D image or cine loop: in-plane geometry, unit step along the normal (time)."""
    row, col = _directions(frame.orientation)
    affine = np.eye(4)
    affine[:3, 0] = row * frame.spacing[1]
    affine[:3, 1] = col * frame.spacing[0]
    affine[:3, 2] = np.cross(row, col) * (frame.thickness or 1.0)
    affine[:3, 3] = frame.position if frame.position is not None else 0.0
    return affine


def _directions(orientation: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if orientation is None:
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    row, col = orientation[:3], orientation[3:]
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _stack(frames: list[_Frame]) -> tuple[list[_Frame], np.ndarray]:
    """Order frames along the slice normal and build the exact affine; refuse what is not a grid."""
    ref = frames[0]
    for f in frames[1:]:
        if np.abs(f.orientation - ref.orientation).max() > ORIENTATION_TOLERANCE:
            raise SeriesError("the slices have different Image Orientation (Patient) (e.g. a localizer mixed in)")
        if not np.allclose(f.spacing, ref.spacing, rtol=1e-4, atol=1e-4):
            raise SeriesError(f"the slices have different Pixel Spacing ({ref.spacing} and {f.spacing})")
    row, col = _directions(ref.orientation)
    normal = np.cross(row, col)
    distances = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(distances, kind="stable")
    frames = [frames[i] for i in order]
    distances = distances[order]
    affine = np.eye(4)
    affine[:3, 0] = row * ref.spacing[1]
    affine[:3, 1] = col * ref.spacing[0]
    affine[:3, 3] = frames[0].position
    if len(frames) == 1:
        affine[:3, 2] = normal * (ref.thickness or 1.0)
        return frames, affine
    steps = np.diff(distances)
    if np.any(steps < POSITION_TOLERANCE):
        dupes = int(np.sum(steps < POSITION_TOLERANCE))
        raise SeriesError(f"{dupes} slice(s) share a position with another slice (duplicates or several stacks)")
    median = float(np.median(steps))
    if np.abs(steps - median).max() > SPACING_TOLERANCE * median:
        raise SeriesError(
            f"uneven slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm "
            f"(median {median:.3g} mm; a gap or missing slice?)"
        )
    # Positions off the normal line (in-plane shifts between slices) are no grid either.
    step = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    expected = frames[0].position + np.outer(np.arange(len(frames)), step)
    drift = np.linalg.norm(np.stack([f.position for f in frames]) - expected, axis=1).max()
    if drift > SPACING_TOLERANCE * median + 0.01:
        raise SeriesError(f"the slice positions do not lie on one line (off by up to {drift:.3g} mm)")
    # The slice step is the mean displacement between neighbours: exact for gantry tilt too.
    affine[:3, 2] = step
    return frames, affine


# --- grids for models -------------------------------------------------------------------------


def resample_to_spacing(
    volume: Volume, spacing: Sequence[float], order: int = 1, data: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The volume's pixels (or ``data`` on its grid) on a grid of the same orientation and extent
    with ``spacing`` (k, j, i) mm; returns (array, affine of the new grid)."""
    src = volume.pixels if data is None else data
    old = np.asarray(volume.spacing)
    new_shape = np.maximum(1, np.round(np.asarray(src.shape) * old / np.asarray(spacing))).astype(int)
    zoom = (np.asarray(src.shape) - 1) / np.maximum(new_shape - 1, 1)
    # Corners align: voxel 0 and the last voxel keep their centres, so the mapping stays exact.
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] @ np.diag(zoom[::-1])
    coords = np.meshgrid(*(np.arange(n) * z for n, z in zip(new_shape, zoom)), indexing="ij")
    out = ndimage.map_coordinates(src.astype(np.float32), coords, order=order, mode="nearest")
    return out.astype(np.float32), affine


def resample_back(volume: Volume, work_affine: np.ndarray, data: np.ndarray, order: int = 1) -> np.ndarray:
    """Values on a working grid (channels first allowed) sampled at every source voxel."""
    to_work = np.linalg.inv(work_affine) @ volume.affine  # source (i, j, k) -> working (i, j, k)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in volume.pixels.shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ to_work.T
    coords = [ijk[..., 2], ijk[..., 1], ijk[..., 0]]
    if data.ndim == 3:
        return ndimage.map_coordinates(data, coords, order=order, mode="nearest").astype(np.float32)
    return np.stack([ndimage.map_coordinates(c, coords, order=order, mode="nearest") for c in data]).astype(np.float32)


def argmax_on_source(
    volume: Volume,
    work_affine: np.ndarray,
    data: np.ndarray,
    chunk_voxels: int = 1 << 20,
    threads: int | None = None,
) -> np.ndarray:
    """Arg-max over the channels of ``data`` (C, k, j, i on a working grid) sampled trilinearly at
    every source voxel: the labels of ``resample_back(volume, work_affine, data).argmax(0)``
    without interpolating C full-resolution volumes.

    A trilinear sample is a convex combination of the 8 corners of its working-grid cell, so where
    one channel is the largest at all 8 corners it is the largest at every point of the cell: those
    voxels take the cell's label by a lookup. Only voxels in cells whose corners disagree (organ
    boundaries, a few percent of a CT) are interpolated, in float64 like scipy. Outside the working
    grid the nearest edge value is used (scipy's ``mode="nearest"``). When the source axes are
    parallel to the working axes (axial, coronal, sagittal, any slice order) the cell of a voxel
    comes from three 1D index arrays; oblique and tilted sources compute it per voxel. Slabs of
    source slices run in ``threads`` threads (default: this process's CPU share, ``cpu_threads``).
    """
    to_work = np.linalg.inv(work_affine) @ volume.affine  # source (i, j, k) -> working (i, j, k)
    n_classes = int(data.shape[0])
    work_shape = data.shape[1:]  # (k, j, i)
    label_dtype = np.uint8 if n_classes < 255 else np.int32
    mixed = n_classes  # cell label meaning "the corners disagree"
    corner_labels = data.argmax(axis=0).astype(label_dtype)
    cells = _cell_labels(corner_labels, mixed)
    values = np.ascontiguousarray(np.moveaxis(data, 0, -1), dtype=np.float64)  # (k, j, i, C)
    shape = volume.pixels.shape
    out = np.empty(shape, dtype=label_dtype)
    slab = max(1, int(chunk_voxels // max(1, shape[1] * shape[2])))
    perm = _axis_permutation(to_work[:3, :3])

    def label_slab(k0: int) -> None:
        k1 = min(shape[0], k0 + slab)
        if perm is not None:
            # Working axis perm[s] varies along source axis s only: one 1D array per axis, shaped
            # to broadcast over the slab (k, j, i).
            counts = (shape[2], shape[1], k1 - k0)
            starts = (0, 0, k0)
            coords: list[np.ndarray] = [np.empty(0)] * 3
            for s in range(3):
                w = perm[s]
                index = np.arange(starts[s], starts[s] + counts[s], dtype=np.float64)
                view = [1, 1, 1]
                view[2 - s] = counts[s]
                coords[w] = (to_work[w, s] * index + to_work[w, 3]).reshape(view)
        else:
            k, j, i = np.meshgrid(
                np.arange(k0, k1, dtype=np.float64),
                np.arange(shape[1], dtype=np.float64),
                np.arange(shape[2], dtype=np.float64),
                indexing="ij",
                sparse=True,
            )
            coords = [to_work[w, 0] * i + to_work[w, 1] * j + to_work[w, 2] * k + to_work[w, 3] for w in range(3)]
        # Per working axis (k, j, i order): lower corner, upper corner, weight of the upper one.
        lo, hi, frac = zip(*(_corner_indices(coords[w], work_shape[2 - w]) for w in (2, 1, 0)))
        if perm is not None:
            # Separable lookup: take along each working axis, then put the axes in source order
            # (slab dimension t holds source axis 2 - t, which runs along working axis perm[2 - t]).
            labels = cells.take(lo[0].ravel(), 0).take(lo[1].ravel(), 1).take(lo[2].ravel(), 2)
            labels = labels.transpose([2 - perm[2 - t] for t in range(3)])
        else:
            labels = cells[lo[0], lo[1], lo[2]]
        where = np.nonzero(labels == mixed)
        if len(where[0]):
            pick = [
                (
                    np.broadcast_to(a, labels.shape)[where],
                    np.broadcast_to(b, labels.shape)[where],
                    np.broadcast_to(f, labels.shape)[where],
                )
                for a, b, f in zip(lo, hi, frac)
            ]
            total = np.zeros((len(where[0]), n_classes))
            for corner in range(8):
                idx, weight = [], np.ones(len(where[0]))
                for axis, (a, b, f) in enumerate(pick):
                    upper = (corner >> (2 - axis)) & 1
                    idx.append(b if upper else a)
                    weight = weight * (f if upper else 1 - f)
                total += weight[:, None] * values[idx[0], idx[1], idx[2]]
            labels[where] = total.argmax(axis=1)
        out[k0:k1] = labels

    # Slabs are independent and numpy releases the GIL in these array operations: a worker's
    # CPU threads share them (the same labels in any order).
    starts = range(0, shape[0], slab)
    threads = min(cpu_threads() if threads is None else threads, len(starts))
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="labels") as pool:
            list(pool.map(label_slab, starts))
    else:
        for k0 in starts:
            label_slab(k0)
    return out


def cpu_threads() -> int:
    """The CPU threads this process may use for array work: the worker's share
    (``OMP_NUM_THREADS``, set by ``workers.worker.share_cpu_threads``), else its cores."""
    try:
        given = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        given = 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, given or cores)


def label_counts_per_slice(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(slices, n_labels) voxel counts of each label value in each slice k of a (k, j, i) integer
    label array (values at or above ``n_labels`` are not counted)."""
    counts = np.zeros((labels.shape[0], n_labels), dtype=np.int64)
    for k in range(labels.shape[0]):
        counts[k] = np.bincount(labels[k].ravel(), minlength=n_labels)[:n_labels]
    return counts


def _cell_labels(labels: np.ndarray, mixed: int) -> np.ndarray:
    """Per working-grid cell (corner voxel (a, b, c) to (a+1, b+1, c+1)): the label all 8 corners
    share, or ``mixed``. An axis of one voxel has one (degenerate) cell."""
    ends = [(slice(0, max(n - 1, 1)), slice(min(1, n - 1), n)) for n in labels.shape]
    first = labels[ends[0][0], ends[1][0], ends[2][0]]
    same = np.ones(first.shape, dtype=bool)
    for a in ends[0]:
        for b in ends[1]:
            for c in ends[2]:
                same &= labels[a, b, c] == first
    return np.where(same, first, mixed).astype(labels.dtype)


def _corner_indices(position: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For fractional positions along a working axis of n voxels: lower and upper corner index and
    the upper corner's weight; positions outside are clamped (the edge value, scipy "nearest")."""
    p = np.clip(position, 0, n - 1)
    lo = np.minimum(np.floor(p).astype(np.intp), max(n - 2, 0))
    return lo, np.minimum(lo + 1, n - 1), p - lo


def _axis_permutation(m: np.ndarray, tolerance: float = 1e-9) -> list[int] | None:
    """For a source → working index matrix that maps each source axis onto one working axis,
    ``perm[s]`` = the working axis of source axis s (0 = i, 1 = j, 2 = k); None when oblique."""
    nonzero = np.abs(m) > tolerance * np.abs(m).max()
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    return [int(np.flatnonzero(nonzero[:, s])[0]) for s in range(3)]


def canonical_grid(volume: Volume, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned grid (i -> patient left, j -> posterior, k -> superior) of isotropic
    ``spacing`` covering the volume's extent: models see every series as if it were axial."""
    shape = np.asarray(volume.pixels.shape)
    corners = np.array([[k, j, i] for k in (0, shape[0] - 1) for j in (0, shape[1] - 1) for i in (0, shape[2] - 1)])
    xyz = volume.index_to_patient(corners)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    n_ijk = np.maximum(1, np.ceil((hi - lo) / spacing).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * spacing
    # Centre the grid on the volume so both ends get the same margin.
    affine[:3, 3] = (lo + hi) / 2 - (n_ijk - 1) / 2 * spacing
    return (int(n_ijk[2]), int(n_ijk[1]), int(n_ijk[0])), affine


def on_canonical_grid(
    volume: Volume, spacing: float, order: int = 1, fill: float | None = None
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """(values, shape, affine): the volume resampled onto its canonical grid of ``spacing`` mm
    (``canonical_grid``, ``resample_to_grid``), computed once per volume and parameters and kept
    with it read-only (the intended-use check and the model's preprocessing both sample it)."""
    key = (float(spacing), int(order), fill, id(volume.pixels))  # new pixels: a new sampling
    if key not in volume.resampled:
        shape, affine = canonical_grid(volume, spacing)
        values = resample_to_grid(volume, shape, affine, order=order, fill=fill)
        values.setflags(write=False)
        volume.resampled[key] = (values, shape, affine)
    return volume.resampled[key]


def resample_to_grid(
    volume: Volume, shape: tuple[int, int, int], affine: np.ndarray, order: int = 1, fill: float | None = None
) -> np.ndarray:
    """The volume's pixels sampled at every voxel of another grid (outside: ``fill``, default the
    volume's minimum, i.e. air for CT)."""
    cval = float(volume.pixels.min()) if fill is None else fill
    return sample_on_grid(volume.pixels, volume.affine, shape, affine, order=order, cval=cval)


def sample_on_grid(
    data: np.ndarray,
    data_affine: np.ndarray,
    shape: tuple[int, ...],
    affine: np.ndarray,
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
) -> np.ndarray:
    """``data`` (k, j, i), placed in patient space by ``data_affine``, sampled at every voxel centre
    of the grid (``shape``, ``affine``); outside it scipy's ``mode`` applies (``cval`` for constant)."""
    to_data = np.linalg.inv(data_affine) @ affine  # target (i, j, k) -> data (i, j, k)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ to_data.T
    return ndimage.map_coordinates(
        data, [ijk[..., 2], ijk[..., 1], ijk[..., 0]], order=order, mode=mode, cval=cval
    ).astype(np.float32)
