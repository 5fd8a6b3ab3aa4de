"""The source images behind a volume, and the attributes every result object copies from them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from workers.analysis.findings import Findings, SourceFrame
from workers.results.context import ResultContext, derived_uid

# Type 2 attributes (present, possibly zero length) of the source modules the result objects copy
# or highdicom reads as attributes (``source.PatientID``: AttributeError when absent). A source that
# lacks one gets it empty in memory, never an invented value; the file itself is not touched.
PATIENT_STUDY_TYPE2 = (
    # Patient
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    # General Study
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
SOURCE_TYPE2 = (
    *PATIENT_STUDY_TYPE2,
    # General Series, General Equipment, General Image (derived images keep the source's header)
    "SeriesNumber",
    "Manufacturer",
    "InstanceNumber",
)


# Specific Character Set (PS3.3 C.12.1.1.2). highdicom takes only its defined terms; an empty first
# value (the usual Japanese and Korean form, "\\ISO 2022 IR 87") means the default repertoire,
# which highdicom takes spelt out. Multi-byte sets may not come first when there are several.
DEFAULT_REPERTOIRE = "ISO 2022 IR 6"
HIGHDICOM_CHARACTER_SETS = frozenset(value.value for value in hd.SpecificCharacterSetValues)
MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})
# What a set highdicom cannot take becomes: UTF-8 holds any text pydicom decoded.
UNICODE = "ISO_IR 192"
# The source's Specific Character Set as read, kept on the in-memory header for the results.
_SOURCE_CHARACTER_SET = "_ainode_source_character_set"


def character_set_values(ds: Dataset) -> list[str]:
    """The Specific Character Set's values as encoded (stripped; [] when absent or empty)."""
    value = ds.get("SpecificCharacterSet")
    if value in (None, ""):
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip() for v in values]


def standard_character_set(values: list[str]) -> bool:
    """Whether ``values`` is a Specific Character Set as PS3.3 C.12.1.1.2 allows it (one defined
    term, or ISO 2022 code extensions with the first value possibly empty) that pydicom encodes."""
    if not values or not all(v in python_encoding for v in values):
        return False
    if len(values) == 1:
        return True
    first = values[0] or DEFAULT_REPERTOIRE
    return first not in MULTI_BYTE_EXTENSIONS and all(v.startswith("ISO 2022") for v in [first, *values[1:]])


def highdicom_character_set(values: list[str]) -> str | list[str] | None:
    """The character set to hand highdicom for text in ``values``' character set.

    An empty first value is the default repertoire (``ISO 2022 IR 6``); a set highdicom does not
    take (a misspelt term, an invalid combination, one its list lacks such as ``ISO 2022 IR 149``)
    becomes ``ISO_IR 192``: the text has been decoded already and UTF-8 can hold it.
    """
    if not values:
        return None
    spelt = [values[0] or DEFAULT_REPERTOIRE, *values[1:]]
    if not standard_character_set(values) or not all(v in HIGHDICOM_CHARACTER_SETS for v in spelt):
        return UNICODE
    return spelt[0] if len(spelt) == 1 else spelt


def normalise_character_set(ds: Dataset) -> Dataset:
    """Give ``ds`` (in memory) a Specific Character Set highdicom takes; remember the source's.

    Every text value is decoded first with the source's own set, so changing the attribute
    changes how the results are encoded, never what the text says.
    """
    values = character_set_values(ds)
    wanted = highdicom_character_set(values)
    object.__setattr__(ds, _SOURCE_CHARACTER_SET, values)
    if wanted is None or wanted == (values[0] if len(values) == 1 else values):
        return ds
    ds.decode()
    ds.SpecificCharacterSet = wanted
    return ds


def result_character_set(source: Dataset) -> str | list[str] | None:
    """The Specific Character Set a result of ``source`` carries: the source's own, in the form
    it was encoded (an empty first value included) when pydicom can encode with it; else the
    set highdicom was given."""
    values = getattr(source, _SOURCE_CHARACTER_SET, None)
    if values is None:
        values = character_set_values(source)
    if standard_character_set(values):
        return values[0] if len(values) == 1 else values
    return highdicom_character_set(values)


def fill_type2(ds: Dataset) -> Dataset:
    """Add the Type 2 attributes ``ds`` lacks, present and empty (in memory; returns ``ds``).

    Frame of Reference's Position Reference Indicator only where the module is (a Frame of
    Reference UID), Image Plane's Slice Thickness (read by highdicom's SEG) only on single-frame
    images with a plane position; values already there, empty or not, are kept as they are.
    """
    keywords = list(SOURCE_TYPE2)
    if "FrameOfReferenceUID" in ds:
        keywords.append("PositionReferenceIndicator")
    if "ImagePositionPatient" in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        keywords.append("SliceThickness")
    for keyword in keywords:
        if keyword not in ds:
            setattr(ds, keyword, None)  # zero length, whatever the VR
    return ds


# Dates and times the results copy (highdicom parses them): ACR-NEMA wrote "14:04:38" and
# "2004.08.26", which DICOM spells "140438" and "20040826".
DATE = re.compile(r"\d{8}")
TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
DATES_TIMES = ("StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime", "PatientBirthDate")


def conformant_dates_times(ds: Dataset) -> Dataset:
    """Give the copied dates and times their DICOM form (in memory): separators of the old
    ACR-NEMA form removed; a value that is still no date or time becomes empty (Type 2)."""
    for keyword in DATES_TIMES:
        element = ds.get(keyword)
        if element in (None, "") or keyword not in ds:
            continue
        raw = str(ds[keyword].value).strip()
        form = TIME if keyword.endswith("Time") else DATE
        candidate = raw.replace(":", "") if keyword.endswith("Time") else raw.replace(".", "").replace("-", "")
        if not form.fullmatch(raw):
            setattr(ds, keyword, candidate if form.fullmatch(candidate) else "")
    return ds


def read_source(path: str | os.PathLike, stop_before_pixels: bool = False) -> Dataset:
    """A source instance as the writers use it: read, with its missing Type 2 attributes empty,
    dates and times in DICOM form and a Specific Character Set highdicom takes."""
    return prepared_source(pydicom.dcmread(path, stop_before_pixels=stop_before_pixels))


def prepared_source(ds: Dataset) -> Dataset:
    """A source dataset as read, prepared for the writers in place (see ``read_source``)."""
    return normalise_character_set(conformant_dates_times(fill_type2(ds)))


@dataclass
class SourceImages:
    """The stored instances one volume was built from, read once and shared by the writers.

    Every dataset handed out has the Type 2 attributes the source lacks filled in, empty
    (``fill_type2``), so highdicom and the copies in derived images find them.
    """

    frames: list[SourceFrame]
    # Header-only datasets the loader already read (``Volume.headers``), taken over as they are
    # (the writers' preparation changes them in memory) instead of reading those files again.
    handed: dict[str, Dataset] = field(default_factory=dict)

    @cached_property
    def headers(self) -> list[Dataset]:
        """One header (no pixel data) per distinct instance, in first-use order."""
        seen: dict[str, Dataset] = {}
        for frame in self.frames:
            uid = frame.sop_instance_uid
            if uid in seen:
                continue
            handed = self.handed.pop(uid, None)
            seen[uid] = (
                prepared_source(handed) if handed is not None else read_source(frame.path, stop_before_pixels=True)
            )
        return list(seen.values())

    @cached_property
    def by_uid(self) -> dict[str, Dataset]:
        """Header per SOP Instance UID."""
        return {ds.SOPInstanceUID: ds for ds in self.headers}

    def header_of_slice(self, k: int) -> Dataset:
        """The header of the instance slice k came from."""
        return self.by_uid[self.frames[k].sop_instance_uid]

    def full_dataset(self, k: int) -> Dataset:
        """Slice k's instance with pixel data (for overlays and derived images)."""
        return read_source(self.frames[k].path)

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def multiframe(self) -> bool:
        """True when the volume's slices are frames of one multi-frame instance."""
        return self.frames[0].frame_number is not None


# IHE AI Results (AIR), RAD TF-3 "Contributing Equipment": every AI result object names the
# algorithm that made it in a Contributing Equipment item whose Purpose of Reference is
# (1630, 99IHE, "Processing Algorithm"), with its manufacturer, model name, software version and
# a Device UID identifying that version of the algorithm.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("1630", "99IHE", "Processing Algorithm")


def algorithm_device_uid(analysis: str, name: str, version: str, model_sha256: str = "") -> str:
    """The algorithm's Device UID: the same analysis, model name, version and weights give the
    same UID; a new model version (or new weights) gives a new one."""
    return derived_uid("algorithm-device", analysis, name, version, model_sha256)


def algorithm_equipment(
    ctx: ResultContext, name: str, version: str, device_uid: str, description: str
) -> list[hd.ContributingEquipment]:
    """IHE AIR's Contributing Equipment item for one algorithm; its Contribution DateTime is when
    the analysis started (``ctx.analysis_started``, when known). Every writer uses this."""
    item = hd.ContributingEquipment(
        manufacturer=ctx.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # highdicom accepts CID 7005 only: replaced below
        manufacturer_model_name=name[:64],
        software_versions=version[:64],
        device_serial_number=ctx.device_serial_number,
        contribution_datetime=ctx.analysis_started,
        contribution_description=description[:64],
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = device_uid
    return [item]


def contributing_equipment(findings: Findings, ctx: ResultContext) -> list[hd.ContributingEquipment]:
    """IHE AIR: the algorithm that made the object, as Contributing Equipment."""
    return algorithm_equipment(
        ctx,
        findings.algorithm_name,
        findings.algorithm_version,
        algorithm_device_uid(
            findings.analysis, findings.algorithm_name, findings.algorithm_version, findings.model_sha256
        ),
        f"{findings.analysis} (model sha256 {findings.model_sha256[:16]})",
    )


def algorithm_identification(findings: Findings) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification for SEG: family artificial intelligence, name and version."""
    return hd.AlgorithmIdentificationSequence(
        name=findings.algorithm_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=findings.algorithm_version[:64],
        source=findings.analysis[:64],
    )


def accession_number(source: Dataset, ctx: ResultContext) -> str:
    """The order's accession number: the context's, else the source's (empty when unknown)."""
    if ctx.accession_number is not None:
        return ctx.accession_number
    return str(source.get("AccessionNumber", "") or "")


def requested_procedure_description(source: Dataset, ctx: ResultContext) -> str:
    if ctx.requested_procedure_description is not None:
        return ctx.requested_procedure_description
    for item in source.get("RequestAttributesSequence", []):
        if item.get("RequestedProcedureDescription"):
            return str(item.RequestedProcedureDescription)
    return str(source.get("RequestedProcedureDescription", "") or source.get("StudyDescription", "") or "")


def referenced_request(source: Dataset, ctx: ResultContext) -> Dataset:
    """One Referenced Request Sequence item (SR Document General): the order behind the study."""
    item = Dataset()
    item.StudyInstanceUID = source.StudyInstanceUID
    item.AccessionNumber = accession_number(source, ctx)
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    requested_id = ctx.requested_procedure_id
    if requested_id is None:
        attrs = source.get("RequestAttributesSequence", [])
        requested_id = str(attrs[0].get("RequestedProcedureID", "")) if attrs else ""
    item.RequestedProcedureID = requested_id or ""
    item.RequestedProcedureDescription = requested_procedure_description(source, ctx)[:64]
    item.RequestedProcedureCodeSequence = []
    item.ReferencedStudySequence = []
    return item


def finish_common(
    ds: Dataset, source: Dataset, findings: Findings | None, ctx: ResultContext, series_description: str
) -> Dataset:
    """Attributes every result object shares: order identifiers, description, content date.

    highdicom copies patient and study attributes from the source; here the order's accession
    number (possibly given by the job) and a description a radiologist recognises are set.
    """
    ds.AccessionNumber = accession_number(source, ctx)
    ds.SeriesDescription = series_description[:64]
    if findings is not None and ctx.analysis_started is not None:
        # IHE AIR: the content (the findings) dates from when the analysis started.
        ds.ContentDate = ctx.analysis_started.strftime("%Y%m%d")
        ds.ContentTime = ctx.analysis_started.strftime("%H%M%S.%f")
    # The source's character set in its own form (e.g. "\\ISO 2022 IR 87"); the text is held
    # decoded, so it is encoded in that set when the object is written.
    charset = result_character_set(source)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    if ctx.institution_name:
        ds.InstitutionName = ctx.institution_name
    # A de-identified source (Patient Identity Removed YES) that does not say how (Type 1C,
    # a real file's omission): the method is copied when stated, else said to be unknown.
    if ds.get("PatientIdentityRemoved") == "YES" and not (
        "DeidentificationMethod" in ds or "DeidentificationMethodCodeSequence" in ds
    ):
        ds.DeidentificationMethod = str(source.get("DeidentificationMethod") or "not stated by the source images")[:64]
    # Type 2 attributes the source may lack must still be present (empty) in our objects.
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def add_laterality(ds: Dataset, source: Dataset) -> Dataset:
    """General Series Laterality (Type 2C): the source's value when it has one.

    The condition depends on the body part: required (with a value) for a paired one, absent for
    an unpaired one, empty only when the body part is unknown. Without a value to copy, it is
    empty when the object names no body part and left out (as in the source) when it names one.
    """
    if source.get("Laterality"):
        ds.Laterality = source.Laterality
    elif not ds.get("BodyPartExamined"):
        ds.Laterality = ""
    elif "Laterality" in ds and not ds.Laterality:
        del ds.Laterality
    return ds


def write(ds: Dataset, folder: Path, name: str) -> Path:
    """Write a dataset atomically (tmp + rename) so no half-written file is ever picked up.

    Encoded as its file meta's transfer syntax says (a derived image of a big-endian source is
    written little endian)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    tmp = folder / f".{name}.dcm.tmp"
    syntax = ds.file_meta.TransferSyntaxUID
    # Every value decoded before it is written: a copied source element still raw carries the
    # source's encoding (an implicit VR file labelled explicit has no VR to write).
    for _ in ds.iterall():
        pass
    if ds.original_encoding[1] not in (None, syntax.is_little_endian):
        # pydicom's save_as keeps a data set's byte order: declare the one it is written in.
        ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, ds.original_character_set)
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path
