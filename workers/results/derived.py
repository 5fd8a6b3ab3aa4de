"""Reconstructions (e.g. denoised images) as a derived series in the source's own IOD."""

from __future__ import annotations

import copy
import datetime

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from workers.findings import Code, DerivedImage, Findings
from workers.results.context import SERIES_NUMBERS, ResultContext, UIDFactory
from workers.results.sources import SourceImages, add_laterality, contributing_equipment, finish_common

SOURCE_FOR_PROCESSING: Code = ("121322", "DCM", "Source image for image processing operation")
# Attributes that describe the source's pixel values or acquisition storage and would be false.
STALE = ("SmallestImagePixelValue", "LargestImagePixelValue", "LossyImageCompression",
         "LossyImageCompressionRatio", "LossyImageCompressionMethod", "ContributingEquipmentSequence")


def code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def stored_values(values: np.ndarray, source: Dataset) -> np.ndarray:
    """Modality values back to stored pixel values in the source's pixel representation."""
    slope = float(source.get("RescaleSlope", 1) or 1)
    intercept = float(source.get("RescaleIntercept", 0) or 0)
    stored = np.rint((values - intercept) / slope)
    bits = int(source.BitsStored)
    if int(source.PixelRepresentation) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        dtype = np.int16 if source.BitsAllocated == 16 else np.int8
    else:
        low, high = 0, 2 ** bits - 1
        dtype = np.uint16 if source.BitsAllocated == 16 else np.uint8
    return np.clip(stored, low, high).astype(dtype)


def derived_slice(image: DerivedImage, index: int, k: int, source: Dataset, findings: Findings,
                  ctx: ResultContext, uids: UIDFactory) -> Dataset:
    """One derived instance: the source's header with new pixels, new UIDs and its derivation."""
    ds = copy.deepcopy(source)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.PixelData = stored_values(image.pixels[k], source).tobytes()
    for keyword in STALE:
        if keyword in ds:
            delattr(ds, keyword)
    image_type = list(source.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
    ds.SeriesInstanceUID = uids.uid("derived", index, "series")
    ds.SOPInstanceUID = uids.uid("derived", index, "sop", source.SOPInstanceUID)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesNumber = SERIES_NUMBERS["derived"] + index
    ds.InstanceNumber = k + 1
    now = datetime.datetime.now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.DerivationDescription = image.derivation_description[:1024]
    ds.DerivationCodeSequence = Sequence([code_item(image.derivation_code)])
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = Sequence([code_item(SOURCE_FOR_PROCESSING)])
    ds.SourceImageSequence = Sequence([ref])
    ds.ContributingEquipmentSequence = Sequence([e for e in contributing_equipment(findings, ctx)])
    add_laterality(ds, source)
    return finish_common(ds, source, findings, ctx, image.series_description)


def write_derived(findings: Findings, sources: SourceImages, ctx: ResultContext,
                  uids: UIDFactory) -> list[Dataset]:
    """Every derived image volume as a series of single-frame instances of the source IOD."""
    if sources.multiframe:
        raise NotImplementedError("derived series from multi-frame sources are not written yet")
    out = []
    for index, image in enumerate(findings.derived):
        for k in range(len(sources.frames)):
            out.append(derived_slice(image, index, k, sources.full_dataset(k), findings, ctx, uids))
    return out
