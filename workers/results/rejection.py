"""IHE IOCM rejection notes: a KOS withdrawing results that a re-run superseded.

When a re-run of a job (new inputs, or the same inputs through a new model) writes new result
objects, the ones it replaces are still at every destination that acknowledged them, where a
radiologist would see both. IHE Imaging Object Change Management (RAD TF-2, "Rejection Note
Stored") asks the system that made them to send a Key Object Selection whose Document Title is the
rejection reason (PS3.16 CID 7011) and which references exactly the rejected instances; an IOCM
Image Manager then hides them (dcm4chee-arc does).

The reason is (113001, DCM, "Rejected for Quality Reasons"): CID 7011's other titles say the
object was made for the wrong patient or procedure (113037 "Rejected for Patient Safety Reasons",
113038 "Incorrect Modality Worklist Entry") or has reached its retention end (113039 "Data
Retention Policy Expired"), none of which is true of a superseded AI result; IOCM uses the
quality reason for an object replaced by a better one.

The note is a new series in the rejected objects' study; its patient and study attributes are the
rejected objects' own (what the PACS holds), and its UIDs follow from the superseding job's key
and the rejected instances, so writing it again gives the same object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.dispatch.kinds import REJECTION, ResultObject
from workers.results.context import ResultContext, derived_uid
from workers.results.sources import finish_common, read_source, referenced_request, write

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # (113001, DCM), CID 7011
# Its own series number, beside the result kinds' block (context.SERIES_NUMBERS) and the
# not-applicable notice's 9009.
REJECTION_SERIES_NUMBER = 9008


def build_rejection_note(rejected: Sequence[Dataset], ctx: ResultContext, analysis: str) -> Dataset:
    """The rejection note (a KOS) of ``rejected`` (their headers, all of one study).

    The Current Requested Procedure Evidence Sequence lists exactly them, grouped by series, and
    the content tree references each one (IMAGE or COMPOSITE by its SOP class).
    """
    if not rejected:
        raise ValueError("a rejection note needs at least one rejected instance")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ValueError(f"a rejection note covers one study, not {len(studies)}")
    first = rejected[0]
    seed = (ctx.job_key, "rejection", "|".join(sorted(str(ds.SOPInstanceUID) for ds in rejected)))
    content = KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=list(rejected),
        description=f"AI results of {analysis} superseded by a re-run; the new results replace them"[:1024],
    )
    note = KeyObjectSelectionDocument(
        evidence=list(rejected),
        content=content,
        series_instance_uid=derived_uid(*seed, "series"),
        series_number=REJECTION_SERIES_NUMBER,
        sop_instance_uid=derived_uid(*seed, "sop"),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        institution_name=ctx.institution_name,
        requested_procedures=[referenced_request(first, ctx)],
    )
    # The node's own object: a PACS that forwards it back is recognised (ingest.arrival.made_here).
    note.DeviceSerialNumber = ctx.device_serial_number
    note.SoftwareVersions = ctx.software_version
    return finish_common(note, first, None, ctx, f"AI {analysis} rejected results")


def write_rejection_note(rejected_paths: Sequence[Path], ctx: ResultContext, analysis: str) -> ResultObject:
    """Write the note of the result files at ``rejected_paths`` under ``ctx.output_dir``."""
    headers = [read_source(p, stop_before_pixels=True) for p in rejected_paths]
    unique = list({str(ds.SOPInstanceUID): ds for ds in headers}.values())
    note = build_rejection_note(unique, ctx, analysis)
    path = write(note, Path(ctx.output_dir), f"rejection-{note.SOPInstanceUID}")
    return ResultObject(path, REJECTION, str(note.SOPClassUID), str(note.SOPInstanceUID), str(note.StudyInstanceUID))
