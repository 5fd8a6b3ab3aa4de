"""What an analysis returns, and the volume it is computed on: the contract between stages.

``workers.analysis.imaging`` builds a ``Volume`` from stored instances; an analysis in
``workers.analysis.registry`` turns it into ``Findings``; ``workers.results`` turns findings into DICOM.
Arrays are indexed (k, j, i) = (slice/frame, row, column). ``affine`` maps the homogeneous index
(i, j, k, 1) — column, row, slice — to patient coordinates in mm (DICOM LPS), so a mask voxel or
a detection lands exactly on the source pixel it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import Dataset

Code = tuple[str, str, str]
"""A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning), e.g. ("10200004", "SCT", "Liver")."""


@dataclass(frozen=True)
class SourceFrame:
    """The stored image (and frame, for multi-frame) that one slice of a volume came from."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    frame_number: int | None = None  # 1-based, for multi-frame instances


VolumeKind = Literal["volume", "cine", "images"]
"""What a group of images is: a 3D volume (distinct, evenly spaced positions along one normal),
a cine (one plane over time, with a frame time where the header gives one), or 2D images."""


@dataclass
class Volume:
    """Pixels of one series (or one group of its images: an echo, a phase) with their exact
    geometry and provenance."""

    pixels: np.ndarray  # (k, j, i) float32, in modality units (HU for CT) after rescale
    affine: np.ndarray  # 4x4: (i, j, k, 1) -> patient LPS mm
    sources: list[SourceFrame]  # one per k
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    # Time between frames for dynamic imaging (cine), seconds; None for still volumes.
    frame_time_s: float | None = None
    kind: VolumeKind = "volume"
    # Within its series: what tells this group from the others (e.g. "echo 2"); "" when alone.
    label: str = ""
    # For "images": why they are not a volume (e.g. "uneven slice spacing ..."), for refusals.
    note: str = ""
    # Where the pixels came from: "streamed" (the series' volume decoded at ingest,
    # node.core.volumes) or "files: <why not streamed>" (every instance file read and decoded).
    pixels_from: str = "files"
    # The header-only datasets the loader read (streamed pixels), per SOP Instance UID: handed
    # to the result writers, which would otherwise read the same headers again. Not compared.
    headers: dict[str, Dataset] = field(default_factory=dict, repr=False, compare=False)
    # The pixels resampled onto canonical grids, per (spacing, order, fill): the intended-use
    # check and a model's preprocessing sample the same 4 mm grid once (``imaging.on_canonical_grid``).
    resampled: dict[tuple, tuple] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> str:
        """The group in words, for job summaries and refusals (no patient data)."""
        n = self.pixels.shape[0]
        what = {
            "volume": f"a 3D volume of {n} slices",
            "cine": f"a cine of {n} frames"
            + (f" ({self.frame_time_s * 1000:.3g} ms apart)" if self.frame_time_s else " without a frame time"),
            "images": f"{n} 2D image{'s' if n != 1 else ''}",
        }[self.kind]
        return what + (f": {self.note}" if self.note else "")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (k, j, i) in mm: slice step, row step, column step."""
        cols = np.linalg.norm(self.affine[:3, :3], axis=0)  # |i|, |j|, |k| steps
        return float(cols[2]), float(cols[1]), float(cols[0])

    def index_to_patient(self, kji: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (k, j, i) to (N, 3) patient coordinates in mm."""
        kji = np.atleast_2d(np.asarray(kji, dtype=float))
        ijk1 = np.c_[kji[:, 2], kji[:, 1], kji[:, 0], np.ones(len(kji))]
        return (ijk1 @ self.affine.T)[:, :3]

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) patient coordinates in mm to fractional (k, j, i) voxel indices."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        ijk = (np.c_[xyz, np.ones(len(xyz))] @ np.linalg.inv(self.affine).T)[:, :3]
        return ijk[:, ::-1]


@dataclass
class Segment:
    """One labelled structure: a boolean mask over the volume, with its codes."""

    label: str
    # bool, same (k, j, i) shape as the volume; None when the segment is one value of ``labels``
    # (cut on demand: ``full_mask``, ``slice_mask``). Read it through those two methods.
    mask: np.ndarray | None
    property_type: Code  # e.g. ("10200004", "SCT", "Liver")
    property_category: Code = ("91723000", "SCT", "Anatomical structure")
    anatomic_region: Code | None = None
    tracking_id: str = ""  # stable across re-runs, e.g. "liver"
    # Where the mask came from, when it is one value of a label array (``mask == (labels ==
    # label_value)``): the SEG writer then remaps that array once instead of rebuilding it from
    # each mask.
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    label_value: int = 0
    # Voxels set per slice k; computed from the mask once when not given (a 300-slice 512² CT:
    # each full pass over a mask costs tens of milliseconds, and several writers ask).
    voxels_per_slice: np.ndarray | None = field(default=None, repr=False, compare=False)

    def full_mask(self) -> np.ndarray:
        """The boolean (k, j, i) mask (cut from ``labels`` now when not kept)."""
        if self.mask is not None:
            return self.mask
        if self.labels is None:
            raise ValueError(f"segment {self.label!r} has neither a mask nor a label array")
        return self.labels == self.label_value

    def slice_mask(self, k: int) -> np.ndarray:
        """The boolean (j, i) mask of slice k."""
        if self.mask is not None or self.labels is None:
            return self.full_mask()[k]
        return self.labels[k] == self.label_value

    @property
    def shape(self) -> tuple[int, ...]:
        """The (k, j, i) shape of the mask."""
        source = self.mask if self.mask is not None else self.labels
        if source is None:
            raise ValueError(f"segment {self.label!r} has neither a mask nor a label array")
        return tuple(source.shape)

    def slice_counts(self) -> np.ndarray:
        """Voxels set in each slice k (counted once, then kept)."""
        if self.voxels_per_slice is None:
            mask = self.full_mask()
            self.voxels_per_slice = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
        return self.voxels_per_slice

    def present(self) -> bool:
        """Whether the segment has any voxel."""
        return bool(self.slice_counts().any())

    def slices(self) -> list[int]:
        """Indices k of the slices where the segment has a voxel."""
        return [int(k) for k in np.flatnonzero(self.slice_counts())]


@dataclass
class Detection:
    """A found lesion: centre and box in voxel indices and in patient mm, with a score."""

    label: str
    finding_type: Code  # e.g. ("4147007", "SCT", "Mass") or a nodule code
    center_kji: tuple[float, float, float]
    box_kji: tuple[tuple[float, float, float], tuple[float, float, float]]  # (min corner, max corner)
    score: float
    diameter_mm: float | None = None
    finding_site: Code | None = None
    tracking_id: str = ""


@dataclass
class Classification:
    """A diagnosis-type output: the probability that a finding is present."""

    label: str
    finding: Code
    probability: float
    threshold: float = 0.5
    finding_site: Code | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass
class Measurement:
    """A number with a UCUM unit, optionally tied to a segment (e.g. organ volume)."""

    name: Code  # e.g. ("118565006", "SCT", "Volume")
    value: float
    unit: Code  # e.g. ("cm3", "UCUM", "cubic centimeter")
    segment_label: str | None = None
    finding_site: Code | None = None
    tracking_id: str = ""


@dataclass
class DerivedImage:
    """A new image volume on the source geometry (e.g. a denoised series)."""

    pixels: np.ndarray  # (k, j, i) in modality units, same geometry as the source volume
    series_description: str
    derivation_description: str
    derivation_code: Code = ("113086", "DCM", "Image Processing")  # placeholder, writers refine


@dataclass
class Findings:
    """Everything one analysis produced for one volume, plus what identifies the algorithm."""

    analysis: str
    algorithm_name: str
    algorithm_version: str
    model_sha256: str
    volume: Volume
    kind: Literal["segmentation", "classification", "detection", "reconstruction", "ejection_fraction"]
    segments: list[Segment] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    classifications: list[Classification] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    derived: list[DerivedImage] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)  # load, preprocess, inference, postprocess

    @property
    def empty(self) -> bool:
        """True when the analysis found nothing (results still say so explicitly)."""
        return (
            not (self.segments and any(s.present() for s in self.segments))
            and not self.detections
            and not any(c.present for c in self.classifications)
        )
