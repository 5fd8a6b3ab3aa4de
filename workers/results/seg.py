"""Segmentation masks as a DICOM Segmentation (BINARY by default, LABELMAP or FRACTIONAL)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from workers.analysis.findings import Code, Findings, Segment
from workers.results.context import SERIES_NUMBERS, ResultContext, UIDFactory, derived_uid
from workers.results.sources import SourceImages, algorithm_identification, contributing_equipment, finish_common


def coded(code: Code) -> hd.sr.CodedConcept:
    """A (value, scheme, meaning) tuple as a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code[0], scheme_designator=code[1], meaning=code[2])


def tracking_uid(findings: Findings, tracking_id: str) -> str:
    """A finding's Tracking UID: stable across re-runs of the same analysis on the same series."""
    return derived_uid("tracking", findings.volume.series_instance_uid, findings.analysis, tracking_id)


def present_segments(findings: Findings) -> list[Segment]:
    """The segments with at least one voxel; they get segment numbers 1..n in this order.

    A structure the model did not find is not given an empty segment (a segment without frames
    says nothing a viewer can show); the SR states its absence instead.
    """
    return [s for s in findings.segments if s.present()]


def segment_description(number: int, segment: Segment, findings: Findings) -> hd.seg.SegmentDescription:
    tracking_id = segment.tracking_id or segment.label
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.label[:64],
        segmented_property_category=coded(segment.property_category),
        segmented_property_type=coded(segment.property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(findings),
        tracking_uid=tracking_uid(findings, tracking_id),
        tracking_id=tracking_id[:64],
        anatomic_regions=[coded(segment.anatomic_region)] if segment.anatomic_region else None,
    )


def _label_array(segments: list[Segment]) -> np.ndarray | None:
    """(frames, rows, columns) segment numbers when no two segments share a voxel, else None."""
    shared = _remapped_labels(segments)
    if shared is not None:
        return shared
    labels = np.zeros(segments[0].shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    count = 0
    for number, segment in enumerate(segments, 1):
        mask = segment.full_mask().astype(bool, copy=False)
        labels[mask] = number
        count += int(np.count_nonzero(mask))
    return labels if count == int(np.count_nonzero(labels)) else None


def _remapped_labels(segments: list[Segment]) -> np.ndarray | None:
    """Segment numbers from the one label array every segment's mask was cut from (distinct
    values: disjoint by construction), in one lookup pass; None when they were not."""
    source = segments[0].labels
    values = [s.label_value for s in segments]
    if source is None or any(s.labels is not source for s in segments) or len(set(values)) != len(values):
        return None
    if source.dtype not in (np.uint8, np.uint16) or len(segments) > 255:
        return None
    if values == list(range(1, len(values) + 1)) and source.dtype == np.uint8 and int(source.max()) <= len(values):
        return source  # already the segment numbers (every class found, in order): nothing to remap
    lut = np.zeros(np.iinfo(source.dtype).max + 1, dtype=np.uint8)
    for number, value in enumerate(values, 1):
        lut[value] = number
    return lut[source]


def _pixel_array(segments: list[Segment], seg_type: str) -> np.ndarray:
    """(frames, rows, columns, segments) for BINARY/FRACTIONAL; (frames, rows, columns) labels.

    BINARY segments that do not overlap (one model's arg-max) go to highdicom as one label array
    (same SEG, encoded frame by frame and segment by segment), which spares stacking a boolean
    volume per segment and highdicom's overlap check over it.
    """
    if seg_type == "BINARY":
        labels = _label_array(segments)
        if labels is not None:
            return labels
    stack = np.stack([s.full_mask().astype(bool) for s in segments], axis=-1)
    if seg_type == "LABELMAP":
        # Segments must not overlap in a label map: the first listed segment wins a voxel.
        labels = np.zeros(stack.shape[:3], dtype=np.uint8 if len(segments) < 256 else np.uint16)
        for number in range(len(segments), 0, -1):
            labels[stack[..., number - 1]] = number
        return labels
    if seg_type == "FRACTIONAL":
        return stack.astype(np.float32)
    return stack


# SOP classes highdicom gives a SEG: Label Map Segmentation for LABELMAP, Segmentation otherwise.
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"


def seg_reference(findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory) -> Dataset:
    """What the SR and the KOS read of the SEG ``write_seg`` makes (its SOP class, UIDs and image
    size), before it exists: they can be built while the SEG is (``workers.results.aside``)."""
    ref = Dataset()
    ref.SOPClassUID = LABEL_MAP_SEGMENTATION if ctx.segmentation_type == "LABELMAP" else SEGMENTATION
    ref.SOPInstanceUID = uids.uid("seg", "sop")
    ref.SeriesInstanceUID = uids.uid("seg", "series")
    ref.StudyInstanceUID = sources.first.StudyInstanceUID
    ref.Rows, ref.Columns = findings.segments[0].shape[-2:]
    return ref


def write_seg(findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory) -> Dataset | None:
    """The SEG of the findings' segments, or None when no structure was found (empty result)."""
    segments = present_segments(findings)
    if not segments:
        return None
    seg_type = ctx.segmentation_type
    pixels = _pixel_array(segments, seg_type)
    if sources.multiframe:
        source_images = [sources.first]
    else:
        source_images = [sources.header_of_slice(k) for k in range(len(sources.frames))]
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=[segment_description(n, s, findings) for n, s in enumerate(segments, 1)],
        series_instance_uid=uids.uid("seg", "series"),
        series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=uids.uid("seg", "sop"),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=findings.algorithm_name[:64],
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial_number,
        fractional_type="PROBABILITY" if seg_type == "FRACTIONAL" else None,
        content_label="AI_SEG",
        content_description=f"{findings.analysis} segmentation"[:64],
        content_creator_name="AINODE^" + findings.algorithm_name[:20],
        # Empty frames carry no information; highdicom records only frames with a voxel set.
        omit_empty_frames=True,
        contributing_equipment=contributing_equipment(findings, ctx),
    )
    shared = seg.get("SharedFunctionalGroupsSequence")
    oriented = bool(shared) and "PlaneOrientationSequence" in shared[0]
    if not oriented and "PatientOrientation" not in seg:
        # Without a plane orientation the General Image module's Patient Orientation (Type 2C)
        # is required: the source's, or empty when it has none.
        seg.PatientOrientation = sources.first.get("PatientOrientation") or ""
    return finish_common(seg, sources.first, findings, ctx, f"AI {findings.analysis} SEG")
