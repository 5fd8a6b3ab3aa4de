"""A Key Object Selection ("Of Interest") of the images that carry findings."""

from __future__ import annotations

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from workers.analysis.findings import Findings
from workers.results.context import SERIES_NUMBERS, ResultContext, UIDFactory
from workers.results.sources import SourceImages, contributing_equipment, finish_common, referenced_request


def slices_with_findings(findings: Findings) -> list[int]:
    """Slice indices k where a segment has voxels or a detection is centred, in order."""
    ks: set[int] = set()
    for segment in findings.segments:
        ks.update(segment.slices())
    last = len(findings.volume.sources) - 1
    for det in findings.detections:
        ks.add(min(max(int(round(det.center_kji[0])), 0), last))
    return sorted(ks)


def write_kos(
    findings: Findings, sources: SourceImages, ctx: ResultContext, uids: UIDFactory, results: list[Dataset]
) -> Dataset | None:
    """KOS naming the key images and the result objects; None when nothing was found."""
    ks = slices_with_findings(findings)
    if not ks:
        return None
    images = list({sources.frames[k].sop_instance_uid: sources.header_of_slice(k) for k in ks}.values())
    content = KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=images + results,
        observer_device_context=None,
        description=f"Images with findings of {findings.analysis}"[:1024],
    )
    kos = KeyObjectSelectionDocument(
        evidence=list(sources.headers) + results,
        content=content,
        series_instance_uid=uids.uid("kos", "series"),
        series_number=SERIES_NUMBERS["kos"],
        sop_instance_uid=uids.uid("kos", "sop"),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        institution_name=ctx.institution_name,
        requested_procedures=[referenced_request(sources.first, ctx)],
        contributing_equipment=contributing_equipment(findings, ctx),
    )
    return finish_common(kos, sources.first, findings, ctx, f"AI {findings.analysis} key images")
