"""Findings and measurements as a Comprehensive 3D SR following TID 1500 (Measurement Report)."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForRegion,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from workers.analysis.findings import Classification, Code, Detection, Findings, Segment
from workers.analysis.imaging import frame_attribute, functional_groups, pixel_spacing
from workers.results.context import SERIES_NUMBERS, ResultContext, UIDFactory, derived_uid
from workers.results.requirements import multiframe_iod
from workers.results.seg import coded, present_segments, tracking_uid
from workers.results.sources import SourceImages, contributing_equipment, finish_common, referenced_request

PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
NO_FINDING = hd.sr.CodedConcept("373572006", "SCT", "Clinical finding absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
DIAMETER = hd.sr.CodedConcept("81827009", "SCT", "Diameter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MILLIMETER = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
# Procedure reported must come from CID 100 (Quantitative Diagnostic Imaging Procedures), which
# has no radiography code (LOINC 43468-8 is refused by DicomSRValidator): CR/DX report the
# general "Imaging procedure".
PROCEDURES = {
    "CT": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "NM": hd.sr.CodedConcept("49118-3", "LN", "NM unspecified body region"),
    "PT": hd.sr.CodedConcept("44136-0", "LN", "PET unspecified body region"),
}
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def algorithm_id(findings: Findings) -> AlgorithmIdentification:
    """TID 4019 algorithm identification, repeated in every measurement group."""
    return AlgorithmIdentification(name=findings.algorithm_name[:64], version=findings.algorithm_version[:64])


def tracking(findings: Findings, tracking_id: str) -> TrackingIdentifier:
    """Tracking identifier and UID of one finding (the same UID on every re-run)."""
    return TrackingIdentifier(uid=tracking_uid(findings, tracking_id), identifier=tracking_id[:64])


def sites(code: Code | None) -> list[FindingSite] | None:
    return [FindingSite(anatomic_location=coded(code))] if code else None


def _measurements_of(findings: Findings, segment_label: str | None) -> list[Measurement]:
    return [
        Measurement(
            name=coded(m.name),
            value=float(m.value),
            unit=coded(m.unit),
            algorithm_id=algorithm_id(findings),
            finding_sites=sites(m.finding_site),
        )
        for m in findings.measurements
        if m.segment_label == segment_label
    ]


def volume_group(
    findings: Findings, number: int, segment: Segment, seg: Dataset, sources: SourceImages
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411: one segmented structure, referencing its SEG segment, with its measurements."""
    referenced = ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(findings.volume.series_instance_uid),
    )
    group = VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(findings, segment.tracking_id or segment.label),
        referenced_segment=referenced,
        finding_type=coded(segment.property_type),
        algorithm_id=algorithm_id(findings),
        finding_sites=sites(segment.anatomic_region),
        measurements=_measurements_of(findings, segment.label) or None,
        qualitative_evaluations=[QualitativeEvaluation(coded(segment.property_type), PRESENT)],
    )
    return in_template_order(group)


# TID 1411 rows 7-8: the referenced segment and its source series come right after the tracking
# identifiers (rows 2-3) and before the finding (row 13); highdicom appends them last.
SEGMENT_REFERENCE_CODES = {"121191", "121232"}
TRACKING_CODES = {"112039", "112040"}


def in_template_order(group):  # type: ignore[no-untyped-def]
    """Move the segment reference items of a TID 1411 group to their place in the template."""
    items = list(group[0].ContentSequence)
    moved = [it for it in items if it.ConceptNameCodeSequence[0].CodeValue in SEGMENT_REFERENCE_CODES]
    rest = [it for it in items if it.ConceptNameCodeSequence[0].CodeValue not in SEGMENT_REFERENCE_CODES]
    last_tracking = max(n for n, it in enumerate(rest) if it.ConceptNameCodeSequence[0].CodeValue in TRACKING_CODES)
    group[0].ContentSequence = rest[: last_tracking + 1] + moved + rest[last_tracking + 1 :]
    return group


def absent_structure_group(findings: Findings, segment: Segment) -> MeasurementsAndQualitativeEvaluations:
    """A structure the model looked for and did not find: said explicitly, not left out."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(findings, segment.tracking_id or segment.label),
        finding_type=coded(segment.property_type),
        algorithm_id=algorithm_id(findings),
        finding_sites=sites(segment.anatomic_region),
        qualitative_evaluations=[QualitativeEvaluation(coded(segment.property_type), ABSENT)],
    )


def detection_region(findings: Findings, det: Detection, sources: SourceImages) -> ImageRegion:
    """TID 1410: the detection on its centre slice, a closed box polyline (or a point)."""
    k = int(round(det.center_kji[0]))
    k = min(max(k, 0), len(sources.frames) - 1)
    frame = sources.frames[k]
    # A frame number only for a multi-frame IOD (an old ultrasound "Image Storage" file may hold
    # two frames; its references may not name one).
    numbered = frame.frame_number is not None and multiframe_iod(frame.sop_class_uid)
    image = SourceImageForRegion(
        frame.sop_class_uid, frame.sop_instance_uid, [frame.frame_number] if numbered else None
    )
    (_, j0, i0), (_, j1, i1) = det.box_kji
    if j1 > j0 and i1 > i0:
        # Image coordinates are (column, row); +0.5 puts voxel centres on pixel centres.
        corners = np.array([[i0, j0], [i1, j0], [i1, j1], [i0, j1], [i0, j0]], dtype=float) + 0.5
        return ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners, source_image=image)
    point = np.array([[det.center_kji[2] + 0.5, det.center_kji[1] + 0.5]])
    return ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=point, source_image=image)


def detection_group(
    findings: Findings, index: int, det: Detection, sources: SourceImages
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    measurements = [
        Measurement(name=PROBABILITY, value=float(det.score), unit=NO_UNITS, algorithm_id=algorithm_id(findings))
    ]
    if det.diameter_mm is not None:
        measurements.append(
            Measurement(
                name=DIAMETER, value=float(det.diameter_mm), unit=MILLIMETER, algorithm_id=algorithm_id(findings)
            )
        )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(findings, det.tracking_id or f"{det.label}-{index}"),
        referenced_region=detection_region(findings, det, sources),
        finding_type=coded(det.finding_type),
        algorithm_id=algorithm_id(findings),
        finding_sites=sites(det.finding_site),
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(coded(det.finding_type), PRESENT)],
    )


def classification_group(findings: Findings, c: Classification) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: the finding present or absent by the threshold, with its probability."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(findings, c.label),
        finding_type=coded(c.finding),
        algorithm_id=algorithm_id(findings),
        finding_sites=sites(c.finding_site),
        measurements=[
            Measurement(
                name=PROBABILITY, value=float(c.probability), unit=NO_UNITS, algorithm_id=algorithm_id(findings)
            )
        ],
        qualitative_evaluations=[QualitativeEvaluation(coded(c.finding), PRESENT if c.present else ABSENT)],
    )


def no_finding_group(findings: Findings) -> MeasurementsAndQualitativeEvaluations:
    """The explicit statement that the analysis found nothing."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(findings, "no-finding"),
        algorithm_id=algorithm_id(findings),
        qualitative_evaluations=[QualitativeEvaluation(FINDING, NO_FINDING)],
    )


def loose_measurements_group(findings: Findings) -> MeasurementsAndQualitativeEvaluations | None:
    """Measurements tied to no segment (e.g. an ejection fraction) in one group."""
    measurements = _measurements_of(findings, None)
    if not measurements:
        return None
    tracking_id = next(
        (m.tracking_id for m in findings.measurements if m.segment_label is None and m.tracking_id),
        f"{findings.analysis}-measurements",
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(findings, tracking_id),
        algorithm_id=algorithm_id(findings),
        measurements=measurements,
    )


def observation_context(findings: Findings, ctx: ResultContext) -> ObservationContext:
    """TID 1002 device observer: the algorithm, identified by a UID stable per model version."""
    device = DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", findings.algorithm_name, findings.algorithm_version),
        name=findings.algorithm_name[:64],
        manufacturer_name=ctx.manufacturer,
        model_name=findings.algorithm_name[:64],
        serial_number=ctx.device_serial_number,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )


def measurement_groups(findings: Findings, seg: Dataset | None, sources: SourceImages) -> list:
    groups: list = []
    for segment in findings.segments:
        if not segment.present():
            groups.append(absent_structure_group(findings, segment))
    present = present_segments(findings)
    for number, segment in enumerate(present, 1):
        groups.append(volume_group(findings, number, segment, seg, sources))
    groups += [detection_group(findings, n, d, sources) for n, d in enumerate(findings.detections, 1)]
    groups += [classification_group(findings, c) for c in findings.classifications]
    loose = loose_measurements_group(findings)
    if loose is not None:
        groups.append(loose)
    # "Nothing found" is stated only for analyses that look for findings and reported no number.
    if findings.empty and not findings.measurements and findings.kind != "reconstruction":
        groups.append(no_finding_group(findings))
    return groups


def library_images(findings: Findings, sources: SourceImages) -> list[Dataset]:
    """TID 1600 Image Library: the images the report's regions are drawn on (else the first one).

    Every source image is listed in the evidence sequence anyway; describing all of them in the
    library (fifteen content items each) made the SR of a 300-slice CT slow to build and to store.
    """
    last = len(sources.frames) - 1
    ks = sorted({min(max(int(round(d.center_kji[0])), 0), last) for d in findings.detections})
    images = list({sources.frames[k].sop_instance_uid: sources.header_of_slice(k) for k in ks}.values())
    return images or [sources.first]


IMAGE_LIBRARY = "111028"
# TID 1602-1604 descriptors highdicom derives from an image's attributes, by attribute (codes DCM).
DESCRIPTORS = {
    "PixelSpacing": ("111026", "111066"),  # horizontal, vertical pixel spacing
    "ImagerPixelSpacing": ("111026", "111066"),
    "SliceThickness": ("112225",),
    "ImagePositionPatient": ("110901", "110902", "110903"),
    "ImageOrientationPatient": ("110904", "110905", "110906", "110907", "110908", "110909"),
    "PatientOrientation": ("111044", "111043"),  # row, column
}
# What highdicom is given for an attribute the image does not state; the descriptor is removed.
PLACEHOLDERS = {
    "PixelSpacing": [1.0, 1.0],
    "ImagerPixelSpacing": [1.0, 1.0],
    "SliceThickness": 0.0,
    "ImagePositionPatient": [0.0, 0.0, 0.0],
    "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "PatientOrientation": ["L", "P"],
}
# TID 1602 row 1 takes the modality from CID 29 (Acquisition Modality); highdicom derives it
# from the SOP class, which gives "OT" for secondary captures and "SEG" for segmentations.
MODALITY = "121139"
ACQUISITION_MODALITIES = frozenset(code.value for code in codes.cid29.concepts.values())
# The modalities highdicom describes with TID 1604 (cross-sectional) and TID 1603 (projection).
CROSS_SECTIONAL = ("CT", "MR", "PT")
PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _numbers(value: object, count: int) -> list[float] | None:
    """``value`` as ``count`` finite numbers, else None (absent, empty, malformed)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        numbers = [float(v) for v in (value if hasattr(value, "__iter__") else [value])]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _library_values(image: Dataset) -> dict[str, object]:
    """The values highdicom's image library descriptors need that ``image`` states, wherever it
    states them: top level, or the functional groups of an enhanced image (shared, else frame 1;
    a multi-frame image's position differs per frame and is not one of the instance's)."""
    multiframe = int(image.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in image
    groups = functional_groups(image, 0)
    values: dict[str, object] = {}
    modality = image.get("Modality")
    if modality in CROSS_SECTIONAL:
        spacing = pixel_spacing(image, groups)
        if spacing is not None and spacing[0] in ("PixelMeasuresSequence", "PixelSpacing"):
            values["PixelSpacing"] = list(spacing[1])
        thickness = _numbers(frame_attribute(groups, image, "PixelMeasuresSequence", "SliceThickness"), 1)
        if thickness is not None and thickness[0] > 0:
            values["SliceThickness"] = thickness[0]
        orientation = _numbers(frame_attribute(groups, image, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        if orientation is not None:
            values["ImageOrientationPatient"] = orientation
        position = _numbers(image.get("ImagePositionPatient"), 3)
        if position is not None and not multiframe:
            values["ImagePositionPatient"] = position
    elif modality in PROJECTION:
        spacing = pixel_spacing(image, groups)
        if spacing is not None and spacing[0] in ("ImagerPixelSpacing", "PixelSpacing", "PixelMeasuresSequence"):
            values["ImagerPixelSpacing"] = list(spacing[1])
        orientation = image.get("PatientOrientation")
        if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 and all(orientation):
            values["PatientOrientation"] = [str(v) for v in orientation]
    return values


def library_entry(image: Dataset) -> tuple[Dataset, set[str]]:
    """The image as highdicom's TID 1601 library entry reads it, and the descriptor codes to
    remove again because the image does not state them.

    highdicom reads Pixel Spacing, Image Position/Orientation and Slice Thickness of CT, MR and
    PET images and Imager Pixel Spacing and Patient Orientation of projection images as top-level
    attributes. Enhanced images state them in functional groups, a CR may state only Pixel
    Spacing (or 0\\0, or nothing); every descriptor is optional in TID 1602, so what the image
    does not state is left out rather than guessed.
    """
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Modality", "FrameOfReferenceUID", "Rows", "Columns"):
        if image.get(keyword) not in (None, ""):
            setattr(entry, keyword, image[keyword].value)
    entry.Modality = entry.get("Modality") or "OT"  # Type 1, yet absent from some secondary captures
    if image.get("SpacingBetweenSlices") not in (None, "") and _numbers(image.SpacingBetweenSlices, 1):
        entry.SpacingBetweenSlices = image.SpacingBetweenSlices
    values = _library_values(image)
    needed = ()
    if image.get("Modality") in CROSS_SECTIONAL:
        needed = ("PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient")
    elif image.get("Modality") in PROJECTION:
        needed = ("ImagerPixelSpacing", "PatientOrientation")
    unknown: set[str] = set()
    for keyword in needed:
        if keyword in values:
            setattr(entry, keyword, values[keyword])
        else:
            setattr(entry, keyword, PLACEHOLDERS[keyword])
            unknown.update(DESCRIPTORS[keyword])
    return entry, unknown


def _drop_non_acquisition_modality(item: Dataset) -> None:
    """Remove Modality descriptors (anywhere below ``item``) whose value is not in CID 29."""
    children = item.get("ContentSequence", [])
    for n in reversed(range(len(children))):
        child = children[n]
        name = child.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in child else None
        value = child.ConceptCodeSequence[0].CodeValue if "ConceptCodeSequence" in child else None
        if name == MODALITY and value not in ACQUISITION_MODALITIES:
            del children[n]
        else:
            _drop_non_acquisition_modality(child)


def _drop_descriptors(report: MeasurementReport, unknown: dict[str, set[str]]) -> None:
    """Remove the placeholder descriptors (``unknown``: codes per SOP Instance UID) of the image
    library's entries."""
    for library in report[0].ContentSequence:
        if library.ConceptNameCodeSequence[0].CodeValue != IMAGE_LIBRARY:
            continue
        _drop_non_acquisition_modality(library)
        for group in library.get("ContentSequence", []):
            for entry in group.get("ContentSequence", []):
                refs = entry.get("ReferencedSOPSequence", [])
                codes_ = unknown.get(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
                if not codes_ or "ContentSequence" not in entry:
                    continue
                descriptors = entry.ContentSequence
                for n in reversed(range(len(descriptors))):
                    if descriptors[n].ConceptNameCodeSequence[0].CodeValue in codes_:
                        del descriptors[n]


def write_sr(
    findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory, seg: Dataset | None
) -> Dataset:
    """The TID 1500 measurement report of the findings (always written, also when empty)."""
    entries = [library_entry(image) for image in library_images(findings, sources)]
    report = MeasurementReport(
        observation_context=observation_context(findings, ctx),
        procedure_reported=PROCEDURES.get(findings.volume.modality, IMAGING_PROCEDURE),
        imaging_measurements=measurement_groups(findings, seg, sources),
        referenced_images=[entry for entry, _ in entries],
    )
    _drop_descriptors(report, {str(entry.SOPInstanceUID): unknown for entry, unknown in entries if unknown})
    evidence = list(sources.headers) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.uid("sr", "series"),
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=uids.uid("sr", "sop"),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        is_complete=True,
        is_verified=False,
        is_final=False,
        institution_name=ctx.institution_name,
        requested_procedures=[referenced_request(sources.first, ctx)],
        contributing_equipment=contributing_equipment(findings, ctx),
    )
    return finish_common(sr, sources.first, findings, ctx, f"AI {findings.analysis} report")
