"""Result writers: findings → standard DICOM objects (SEG, SR TID 1500, KOS, GSPS, SC, derived).

``write_results(findings, context)`` is the one entry point the job runner calls. Every object is
a new series in the source study, carries Contributing Equipment naming the algorithm (IHE AI
Results), and has UIDs derived from (job key, input instance UIDs, model version), so writing a job
again yields the same objects. Files are written atomically; the objects are returned in
the order they should be delivered (referenced objects before the objects referencing them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydicom.dataset import Dataset

from node.dispatch.kinds import ALL_KINDS, ResultKind, ResultObject, kind_of, kinds_for_destinations, wanted_kinds
from workers.analysis.findings import Findings
from workers.results.aside import MIN_FRAMES, start_seg_aside
from workers.results.context import ResultContext, UIDFactory
from workers.results.derived import write_derived
from workers.results.kos import write_kos
from workers.results.presentation import write_gsps, write_secondary_captures
from workers.results.requirements import NotWritable, check_writable, writable_reason
from workers.results.seg import present_segments, write_seg
from workers.results.sources import SourceImages, write
from workers.results.sr import write_sr

__all__ = [
    "NotWritable",
    "ResultContext",
    "ResultObject",
    "check_writable",
    "writable_reason",
    "write_results",
    "wanted_kinds",
    "kinds_for_destinations",
    "kind_of",
    "ALL_KINDS",
    "ResultKind",
]


def build_results(findings: Findings, context: ResultContext | Mapping[str, Any]) -> list[Dataset]:
    """The result datasets for the context's destinations, in delivery order (not written)."""
    context = _as_context(context)
    sources, uids = _sources_and_uids(findings, context)
    seg = write_seg(findings, sources, context, uids) if _wants_seg(context) else None
    return _build_others(findings, context, sources, uids, seg)


def _as_context(context: ResultContext | Mapping[str, Any]) -> ResultContext:
    return context if isinstance(context, ResultContext) else ResultContext.from_job(context)


def _sources_and_uids(findings: Findings, context: ResultContext) -> tuple[SourceImages, UIDFactory]:
    # The loader's headers are handed over once (taken from the volume): a second build reads files.
    sources = SourceImages(findings.volume.sources, findings.volume.headers)
    uids = UIDFactory(context.job_key, [f.sop_instance_uid for f in sources.frames], findings.algorithm_version)
    return sources, uids


def _wants_seg(context: ResultContext) -> bool:
    # The SR's volume groups reference SEG segments, so SEG is written whenever SR is.
    return bool(context.kinds & {"seg", "sr", "kos"})


def _build_others(
    findings: Findings, context: ResultContext, sources: SourceImages, uids: UIDFactory, seg: Dataset | None
) -> list[Dataset]:
    """``seg`` (the SEG, or a reference standing for it) first, then every other result object,
    in delivery order."""
    kinds = context.kinds
    objects: list[Dataset] = [seg] if seg is not None else []
    # A pure reconstruction has nothing to report: its derived series is the result.
    reports = findings.kind != "reconstruction" or bool(
        findings.segments or findings.detections or findings.classifications or findings.measurements
    )
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


def write_results(
    findings: Findings, context: ResultContext | Mapping[str, Any], seg_aside_frames: int = MIN_FRAMES
) -> list[ResultObject]:
    """Write the job's result objects under ``context.output_dir``; return them (path, kind, UIDs).

    ``context`` is a ``ResultContext`` or the job runner's mapping (see ``ResultContext.from_job``).
    A SEG of at least ``seg_aside_frames`` frames is built and written by a child process while
    the other objects are built here (``workers.results.aside``); the files are the same.

    File names are ``<kind>-<SOP Instance UID>.dcm``; writing the same job again overwrites the
    same files with the same UIDs.
    """
    context = _as_context(context)
    folder = Path(context.output_dir)
    sources, uids = _sources_and_uids(findings, context)
    aside = None
    seg = None
    if _wants_seg(context) and present_segments(findings):
        aside = start_seg_aside(findings, sources, context, uids, folder, seg_aside_frames)
        seg = aside.reference if aside is not None else write_seg(findings, sources, context, uids)
    try:
        objects = _build_others(findings, context, sources, uids, seg)
        paths = {
            id(ds): write(ds, folder, f"{kind_of(ds.SOPClassUID)}-{ds.SOPInstanceUID}")
            for ds in objects
            if aside is None or ds is not aside.reference
        }
        if aside is not None:
            paths[id(aside.reference)] = aside.finish()
    finally:
        if aside is not None:
            aside.stop()
    return [
        ResultObject(
            paths[id(ds)],
            kind_of(ds.SOPClassUID),
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            str(ds.get("StudyInstanceUID", "")),
        )
        for ds in objects
    ]
