"""What the result objects need of their sources, checked before inference.

A requirement the writers would only meet at writing time (a SEG of CT slices without a Frame of
Reference UID, millimetres on an uncalibrated image) is a permanent property of the series: the
job fails once, before the model runs, with a reason naming the series and the attribute, instead
of failing after a full inference (``check_writable``, called by the job runner).
"""

from __future__ import annotations

# The rule highdicom's SEG applies itself (no public name for it): checked with the same table.
from highdicom._standard_utils import (
    ModuleUsageValues,
    does_iod_have_pixel_data,
    get_iod_module_map,
    get_module_usage,
    get_sop_class_iod_map,
)
from pydicom.dataset import Dataset
from pydicom.uid import UID

from workers.analysis.contract import AnalysisError
from workers.analysis.findings import Volume
from workers.analysis.imaging import frame_attribute, functional_groups, pixel_spacing
from workers.results.sources import read_source

# Tasks whose results are segments (written as SEG) and tasks that report millimetres (organ
# volumes, lesion diameters): these need the source's geometry.
SEGMENT_TASKS = frozenset({"segmentation"})
MILLIMETRE_TASKS = frozenset({"segmentation", "detection"})
# Tasks whose results include a derived series in the source's own IOD.
DERIVED_TASKS = frozenset({"reconstruction"})


class NotWritable(AnalysisError):
    """The results of this analysis cannot be written for these sources; the message says why."""


def _present(ds: Dataset, keyword: str) -> bool:
    return ds.get(keyword) not in (None, "")


def frame_of_reference_required(source: Dataset, frames: int) -> bool:
    """Whether a SEG of ``source`` must carry a Frame of Reference UID: the source's IOD has the
    Frame of Reference module as mandatory, or the segmentation has more than one frame (a SEG
    without one can only be a single frame laid on its single source frame)."""
    if frames > 1:
        return True
    try:
        return get_module_usage("frame-of-reference", str(source.SOPClassUID)) == ModuleUsageValues.MANDATORY
    except KeyError:  # an IOD highdicom does not know: its own check cannot fail on it either
        return False


def multiframe_iod(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` is a multi-frame one (references may name frames):
    it has the Multi-frame module or the Frame Extraction module (every enhanced IOD); True for
    an IOD highdicom does not know."""
    try:
        return any(get_module_usage(key, str(sop_class_uid)) is not None for key in ("multi-frame", "frame-extraction"))
    except KeyError:
        return True


def enhanced_iod(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` keeps its frames' attributes in functional groups
    (Enhanced CT, MR, XA ...), whether or not a given file has them."""
    try:
        return any(
            module["key"].endswith("multi-frame-functional-groups")
            for module in get_iod_module_map()[get_sop_class_iod_map()[str(sop_class_uid)]]
        )
    except KeyError:
        return False


def seg_reason(volume: Volume, first: Dataset) -> str | None:
    """Why a SEG cannot be written over ``volume`` (whose first source header is ``first``)."""
    frames = int(volume.pixels.shape[0])
    series = volume.series_instance_uid
    if not _present(first, "FrameOfReferenceUID"):
        if frame_of_reference_required(first, frames):
            return (
                f"series {series}: a segmentation (SEG) needs the source's Frame of Reference UID "
                "(0020,0052), which the images do not have"
            )
        return None
    groups = functional_groups(first, 0)
    position = frame_attribute(groups, first, "PlanePositionSequence", "ImagePositionPatient")
    orientation = frame_attribute(groups, first, "PlaneOrientationSequence", "ImageOrientationPatient")
    if frames > 1 and (position is None or orientation is None):
        missing = (
            "Image Position (Patient) (0020,0032)" if position is None else "Image Orientation (Patient) (0020,0037)"
        )
        return (
            f"series {series}: a segmentation (SEG) of {frames} frames needs each frame's {missing}, which is missing"
        )
    if "PerFrameFunctionalGroupsSequence" in first and position is not None:
        shared = first.get("SharedFunctionalGroupsSequence")
        if not shared or "PlaneOrientationSequence" not in shared[0]:
            return (
                f"series {series}: a segmentation (SEG) of an enhanced image needs Plane Orientation "
                "(0020,9116) in the Shared Functional Groups, which is missing"
            )
    if position is not None and pixel_spacing(first, groups) is None:
        return f"series {series}: a segmentation (SEG) needs the source's Pixel Spacing (0028,0030), which is missing"
    return None


# Objects that are results themselves, not images to analyse (a forwarded SEG, a dose grid).
NOT_IMAGES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "SR", "KO", "PR", "REG"})
IDENTITY = (
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
    ("SOPInstanceUID", "(0008,0018)"),
)


def source_reason(first: Dataset, series: str) -> str | None:
    """Why no result can reference these sources: not an image, or an identity that is not a UID
    (every result object references the study, series and instances it was made from)."""
    modality = str(first.get("Modality", "") or "")
    if modality in NOT_IMAGES:
        return f"series {series}: Modality (0008,0060) {modality}: results are written for images, not for {modality} objects"
    sop_class = str(first.get("SOPClassUID", ""))
    try:
        image = does_iod_have_pixel_data(sop_class)
    except KeyError:
        image = False
    if not image:
        return f"series {series}: SOP Class UID (0008,0016) {sop_class} is not an image storage class results can reference"
    for keyword, tag in IDENTITY:
        if not UID(str(first.get(keyword, ""))).is_valid:
            return f"series {series}: the source's {keyword} {tag} is not a valid UID, so no result can reference it"
    return None


def writable_reason(volume: Volume, task: str) -> str | None:
    """None when the results of ``task`` can be written for the volume's sources, else why not
    (naming the series and the attribute)."""
    first = read_source(volume.sources[0].path, stop_before_pixels=True)
    reason = source_reason(first, volume.series_instance_uid)
    if reason:
        return reason
    if task in SEGMENT_TASKS:
        reason = seg_reason(volume, first)
        if reason:
            return reason
    if task in DERIVED_TASKS and enhanced_iod(first.SOPClassUID) and "PerFrameFunctionalGroupsSequence" not in first:
        return (
            f"series {volume.series_instance_uid}: a derived image of an enhanced image needs the source's "
            "Per-frame Functional Groups Sequence (5200,9230), which is missing"
        )
    if task in MILLIMETRE_TASKS and pixel_spacing(first) is None:
        return (
            f"series {volume.series_instance_uid}: {task} results are measured in mm, but the images state no "
            "pixel size (Pixel Spacing (0028,0030), Imager Pixel Spacing (0018,1164) or Pixel Measures are "
            "absent or zero)"
        )
    return None


def check_writable(volume: Volume, task: str) -> None:
    """Raise ``NotWritable`` (a permanent error) when the results of ``task`` cannot be written."""
    reason = writable_reason(volume, task)
    if reason:
        raise NotWritable(reason)
