"""Result writers: findings → standard DICOM objects (SEG, SR TID 1500, KOS, GSPS, SC, derived).

``write_results(findings, context)`` is the one entry point the job runner calls. Every object is
a new series in the source study, carries Contributing Equipment naming the algorithm (IHE AI
Results), and has UIDs derived from (job key, input instance UIDs, model version), so writing a job
again yields the same objects. Files are written atomically; the list of paths is returned in
the order they should be delivered (referenced objects before the objects referencing them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydicom.dataset import Dataset

from workers.analysis.findings import Findings
from workers.results.context import (ALL_KINDS, ResultContext, ResultKind, UIDFactory, kinds_for_destinations, wanted_kinds)
from workers.results.derived import write_derived
from workers.results.kos import write_kos
from workers.results.presentation import write_gsps, write_secondary_captures
from workers.results.seg import write_seg
from workers.results.sources import SourceImages, write
from workers.results.sr import write_sr

__all__ = ["ResultContext", "write_results", "wanted_kinds", "kinds_for_destinations", "kind_of",
           "ALL_KINDS", "ResultKind"]

SOP_CLASS_KINDS: dict[str, ResultKind] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.66.7": "seg",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.88.59": "kos",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
    "1.2.840.10008.5.1.4.1.1.7.4": "sc",
}


def kind_of(sop_class_uid: str) -> ResultKind:
    """The result kind of an object by its SOP class (anything else is a derived image)."""
    return SOP_CLASS_KINDS.get(str(sop_class_uid), "derived")


def build_results(findings: Findings, context: ResultContext | Mapping[str, Any]) -> list[Dataset]:
    """The result datasets for the context's destinations, in delivery order (not written)."""
    if not isinstance(context, ResultContext):
        context = ResultContext.from_job(context)
    sources = SourceImages(findings.volume.sources)
    uids = UIDFactory(context.job_key, [f.sop_instance_uid for f in sources.frames], findings.algorithm_version)
    kinds = context.kinds
    objects: list[Dataset] = []
    seg = None
    # The SR's volume groups reference SEG segments, so SEG is written whenever SR is.
    if kinds & {"seg", "sr", "kos"}:
        seg = write_seg(findings, sources, context, uids)
        if seg is not None:
            objects.append(seg)
    # A pure reconstruction has nothing to report: its derived series is the result.
    reports = findings.kind != "reconstruction" or bool(findings.segments or findings.detections
                                                        or findings.classifications or findings.measurements)
    if "sr" in kinds and reports:
        objects.append(write_sr(findings, sources, context, uids, seg))
    if "gsps" in kinds:
        gsps = write_gsps(findings, sources, context, uids)
        if gsps is not None:
            objects.append(gsps)
    if "sc" in kinds:
        objects += write_secondary_captures(findings, sources, context, uids)
    if "derived" in kinds and findings.derived:
        objects += write_derived(findings, sources, context, uids)
    if "kos" in kinds:
        kos = write_kos(findings, sources, context, uids, list(objects))
        if kos is not None:
            objects.append(kos)
    return objects


def write_results(findings: Findings, context: ResultContext | Mapping[str, Any]) -> list[Path]:
    """Write the job's result objects under ``context.output_dir``; return their paths.

    ``context`` is a ``ResultContext`` or the job runner's mapping (see ``ResultContext.from_job``).

    File names are ``<kind>-<SOP Instance UID>.dcm``; writing the same job again overwrites the
    same files with the same UIDs.
    """
    if not isinstance(context, ResultContext):
        context = ResultContext.from_job(context)
    paths = []
    for ds in build_results(findings, context):
        paths.append(write(ds, Path(context.output_dir), f"{kind_of(ds.SOPClassUID)}-{ds.SOPInstanceUID}"))
    return paths
