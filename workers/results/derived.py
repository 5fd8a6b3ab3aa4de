"""Reconstructions (e.g. denoised images) as a derived series in the source's own IOD.

Single-frame sources give one derived instance per source image. Multi-frame sources give one
derived multi-frame instance per source instance, frame for frame: the source's header and
functional groups (geometry, dimensions, acquisition) are kept, so frame n of the derived
instance lies exactly where frame n of its source lies, and:

- enhanced sources (functional groups) get Image Type and Frame Type value 1 DERIVED, a
  Derivation Image functional group per frame referencing the source frame (Referenced Frame
  Number), and the source instance in the Common Instance Reference module;
- other multi-frame sources (ultrasound or secondary-capture cine) get Image Type
  DERIVED\\SECONDARY and a Source Image Sequence item referencing the whole source instance.
"""

from __future__ import annotations

import copy
import datetime

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from workers.analysis.findings import Code, DerivedImage, Findings
from workers.results.context import SERIES_NUMBERS, ResultContext, UIDFactory
from workers.results.sources import SourceImages, add_laterality, contributing_equipment, finish_common, read_source

SOURCE_FOR_PROCESSING: Code = ("121322", "DCM", "Source image for image processing operation")
# Attributes that describe the source's pixel values or acquisition storage and would be false.
STALE = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "ContributingEquipmentSequence",
)
# A derived multi-frame instance stands alone: it is not part of the source's concatenation.
CONCATENATION = (
    "ConcatenationUID",
    "SOPInstanceUIDOfConcatenationSource",
    "ConcatenationFrameOffsetNumber",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
)
# Enhanced IODs (Enhanced CT / MR image modules): Lossy Image Compression is Type 1 there and the
# source's value stays true of pixels derived from it ("01" is never reset), so it is kept.
ENHANCED_STALE = ("SmallestImagePixelValue", "LargestImagePixelValue", "ContributingEquipmentSequence", *CONCATENATION)
# Image Type / Frame Type value 4 (Derived Pixel Contrast) of a frame whose pixels a model
# recomputed from one source frame: the enhanced image modules' defined term for filtered images.
DERIVED_PIXEL_CONTRAST = "FILTERED"


def code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _integer_dtype(bits_allocated: int, signed: bool) -> type:
    return {8: (np.uint8, np.int8), 16: (np.uint16, np.int16), 32: (np.uint32, np.int32)}[int(bits_allocated)][signed]


def stored_values(
    values: np.ndarray, source: Dataset, slope: float | None = None, intercept: float | None = None
) -> np.ndarray:
    """Modality values back to stored pixel values in the source's pixel representation (with the
    source's rescale, or the given frame's ``slope`` / ``intercept``)."""
    slope = float(slope if slope is not None else (source.get("RescaleSlope", 1) or 1))
    intercept = float(intercept if intercept is not None else (source.get("RescaleIntercept", 0) or 0))
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    bits = int(source.BitsStored)
    signed = int(source.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return np.clip(stored, low, high).astype(_integer_dtype(source.BitsAllocated, signed))


def _source_reference(source: Dataset, frame_number: int | None = None) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        ref.ReferencedFrameNumber = frame_number
    ref.PurposeOfReferenceCodeSequence = Sequence([code_item(SOURCE_FOR_PROCESSING)])
    return ref


def _new_identity(
    ds: Dataset,
    source: Dataset,
    image: DerivedImage,
    index: int,
    instance_number: int,
    findings: Findings,
    ctx: ResultContext,
    uids: UIDFactory,
) -> None:
    """New series and instance UIDs (deterministic), numbers, dates, equipment, file meta."""
    ds.SeriesInstanceUID = uids.uid("derived", index, "series")
    ds.SOPInstanceUID = uids.uid("derived", index, "sop", source.SOPInstanceUID)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesNumber = SERIES_NUMBERS["derived"] + index
    ds.InstanceNumber = instance_number
    now = datetime.datetime.now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ContributingEquipmentSequence = Sequence([e for e in contributing_equipment(findings, ctx)])


def derived_slice(
    image: DerivedImage, index: int, k: int, source: Dataset, findings: Findings, ctx: ResultContext, uids: UIDFactory
) -> Dataset:
    """One derived instance: the source's header with new pixels, new UIDs and its derivation."""
    ds = copy.deepcopy(source)
    if "PixelData" in ds:
        # Replaced, never decoded: a compressed source's element is encapsulated.
        del ds.PixelData
    if _as_monochrome(ds, source):  # a colour source: its luminance, 8-bit grey
        pixels = stored_values(image.pixels[k], ds, 1.0, 0.0)
    else:
        pixels = stored_values(image.pixels[k], source)
    ds.add_new(0x7FE00010, "OW" if int(ds.BitsAllocated) > 8 else "OB", pixels.tobytes())
    for keyword in STALE:
        if keyword in ds:
            delattr(ds, keyword)
    image_type = list(source.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
    _new_identity(ds, source, image, index, k + 1, findings, ctx, uids)
    ds.DerivationDescription = image.derivation_description[:1024]
    ds.DerivationCodeSequence = Sequence([code_item(image.derivation_code)])
    ds.SourceImageSequence = Sequence([_source_reference(source)])
    add_laterality(ds, source)
    return finish_common(ds, source, findings, ctx, image.series_description)


# --- multi-frame sources ----------------------------------------------------------------------


def _frame_rescale(source: Dataset, frame: int) -> tuple[float | None, float | None]:
    """Slope and intercept of 1-based ``frame``: per-frame group, shared group, else top level."""
    groups = []
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame <= len(per_frame):
        groups.append(per_frame[frame - 1])
    if "SharedFunctionalGroupsSequence" in source:
        groups.append(source.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get("PixelValueTransformationSequence")
        if items:
            slope, intercept = items[0].get("RescaleSlope"), items[0].get("RescaleIntercept")
            return (
                None if slope in (None, "") else float(slope),
                None if intercept in (None, "") else float(intercept),
            )
    return None, None


def _as_monochrome(ds: Dataset, source: Dataset) -> bool:
    """Make ``ds`` an 8-bit MONOCHROME2 image when ``source`` is colour (the volume holds its
    luminance, imaging._to_grey); True when it was colour."""
    colour = int(source.get("SamplesPerPixel", 1)) != 1 or str(source.get("PhotometricInterpretation", "")) in (
        "PALETTE COLOR",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_RCT",
        "YBR_ICT",
        "YBR_PARTIAL_420",
    )
    if colour:
        # The volume holds luminance (imaging._to_grey): the derived image is greyscale.
        for keyword in (
            "PlanarConfiguration",
            "RedPaletteColorLookupTableDescriptor",
            "GreenPaletteColorLookupTableDescriptor",
            "BluePaletteColorLookupTableDescriptor",
            "RedPaletteColorLookupTableData",
            "GreenPaletteColorLookupTableData",
            "BluePaletteColorLookupTableData",
            "SegmentedRedPaletteColorLookupTableData",
            "SegmentedGreenPaletteColorLookupTableData",
            "SegmentedBluePaletteColorLookupTableData",
        ):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return colour


def _set_pixels(ds: Dataset, source: Dataset, image: DerivedImage, frames: dict[int, int]) -> None:
    """Pixel Data of every frame of the source (in its frame order) from the derived volume."""
    colour = _as_monochrome(ds, source)
    planes = []
    for number in range(1, int(source.get("NumberOfFrames", 1) or 1) + 1):
        slope, intercept = (None, None) if colour else _frame_rescale(source, number)
        planes.append(stored_values(image.pixels[frames[number]], ds, slope, intercept))
    if "PixelData" in ds:
        del ds.PixelData  # a compressed source's element is encapsulated (undefined length)
    ds.add_new(0x7FE00010, "OW" if int(ds.BitsAllocated) > 8 else "OB", np.stack(planes).tobytes())


def _derived_type(values, pixel_contrast: bool = True) -> list[str]:
    """Image Type / Frame Type of an enhanced derived frame: value 1 DERIVED, value 4 the
    derived pixel contrast; values 2 and 3 (patient examination, image flavour) stay."""
    values = list(values or ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
    values += ["NONE"] * (4 - len(values))
    values[0] = "DERIVED"
    if pixel_contrast:
        values[3] = DERIVED_PIXEL_CONTRAST
    return values


def _derivation_item(image: DerivedImage, source: Dataset, frame_number: int) -> Dataset:
    item = Dataset()
    item.DerivationDescription = image.derivation_description[:1024]
    item.DerivationCodeSequence = Sequence([code_item(image.derivation_code)])
    item.SourceImageSequence = Sequence([_source_reference(source, frame_number)])
    return item


def _source_image_evidence(source: Dataset) -> Sequence:
    """Source Image Evidence Sequence (Enhanced CT / MR / XA image modules): the source instance."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([instance])
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    return Sequence([study])


def _reference_source_instance(ds: Dataset, source: Dataset) -> None:
    """Common Instance Reference module: the source instance, beside what the source referenced."""
    series = {item.SeriesInstanceUID: item for item in ds.get("ReferencedSeriesSequence", [])}
    item = series.get(source.SeriesInstanceUID)
    if item is None:
        item = Dataset()
        item.SeriesInstanceUID = source.SeriesInstanceUID
        item.ReferencedInstanceSequence = Sequence([])
        series[source.SeriesInstanceUID] = item
    if all(ref.ReferencedSOPInstanceUID != source.SOPInstanceUID for ref in item.ReferencedInstanceSequence):
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        item.ReferencedInstanceSequence.append(ref)
    ds.ReferencedSeriesSequence = Sequence(list(series.values()))


def derived_multiframe(
    image: DerivedImage,
    index: int,
    instance_number: int,
    source: Dataset,
    frames: dict[int, int],
    findings: Findings,
    ctx: ResultContext,
    uids: UIDFactory,
) -> Dataset:
    """The derived instance of one multi-frame source instance; ``frames`` maps each 1-based
    frame number of the source to its slice k of the volume."""
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    missing = sorted(set(range(1, n_frames + 1)) - set(frames))
    if missing:
        raise ValueError(f"frames {missing[:5]} of {source.SOPInstanceUID} are not in the derived volume")
    ds = copy.deepcopy(source)
    _set_pixels(ds, source, image, frames)
    enhanced = "PerFrameFunctionalGroupsSequence" in source
    for keyword in ENHANCED_STALE if enhanced else (*STALE, *CONCATENATION):
        if keyword in ds:
            delattr(ds, keyword)
    _new_identity(ds, source, image, index, instance_number, findings, ctx, uids)
    if enhanced:
        ds.ImageType = _derived_type(source.get("ImageType"))
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        groups = [g for g in (shared, *ds.PerFrameFunctionalGroupsSequence) if g is not None]
        for group in groups:
            for element in group:
                if element.keyword.endswith("FrameTypeSequence") and element.value:
                    element.value[0].FrameType = _derived_type(element.value[0].get("FrameType"))
        if shared is not None and "DerivationImageSequence" in shared:
            del shared.DerivationImageSequence  # a functional group is shared or per frame, not both
        for number, group in enumerate(ds.PerFrameFunctionalGroupsSequence, 1):
            group.DerivationImageSequence = Sequence([_derivation_item(image, source, number)])
        _reference_source_instance(ds, source)
        # The images this one was derived from (replacing the source's own evidence, which named
        # the source's sources).
        ds.SourceImageEvidenceSequence = _source_image_evidence(source)
    else:
        image_type = list(source.get("ImageType", ["ORIGINAL", "PRIMARY"]))
        ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
        ds.DerivationDescription = image.derivation_description[:1024]
        ds.DerivationCodeSequence = Sequence([code_item(image.derivation_code)])
        ds.SourceImageSequence = Sequence([_source_reference(source)])
        if "LossyImageCompression" in source:
            ds.LossyImageCompression = source.LossyImageCompression
    return finish_common(ds, source, findings, ctx, image.series_description)


def write_derived(findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory) -> list[Dataset]:
    """Every derived image volume as a series in the source IOD: one instance per source instance
    (single-frame slices, or multi-frame instances frame for frame)."""
    out = []
    for index, image in enumerate(findings.derived):
        if not sources.multiframe:
            for k in range(len(sources.frames)):
                out.append(derived_slice(image, index, k, sources.full_dataset(k), findings, ctx, uids))
            continue
        instances: dict[str, dict[int, int]] = {}
        paths = {}
        for k, frame in enumerate(sources.frames):
            instances.setdefault(frame.sop_instance_uid, {})[frame.frame_number or 1] = k
            paths[frame.sop_instance_uid] = frame.path
        for number, (uid, frames) in enumerate(instances.items(), 1):
            source = read_source(paths[uid])
            out.append(derived_multiframe(image, index, number, source, frames, findings, ctx, uids))
    return out
