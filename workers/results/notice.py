"""A short SR saying the study was not analysed and why (issue 14: refusal is an outcome).

When the worker refuses a job's input as outside the analysis' intended use, a destination may
ask (``notify_not_applicable``) to receive this note in the source study, so the radiologist sees
that the AI did not look at it rather than silence. It carries no findings, only the analysis'
name and the reason; patient and study attributes are the header highdicom copies from the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.dispatch.kinds import ResultObject
from workers.results.context import MANUFACTURER, SOFTWARE_VERSION, ResultContext, derived_uid
from workers.results.sources import (
    algorithm_device_uid,
    algorithm_equipment,
    finish_common,
    read_source,
    referenced_request,
    write,
)

# Its own series number, beside the result kinds' block (context.SERIES_NUMBERS).
NOTICE_SERIES_NUMBER = 9009


def notice_text(analysis: str, reason: str) -> str:
    """What the note says: the analysis did not run on these images, and why."""
    return f"Not analysed by {analysis}: the images are outside its intended use. Reason: {reason}"[:1024]


def build_not_applicable_sr(
    sources: Sequence[Dataset], analysis: str, reason: str, ctx: ResultContext
) -> hd.sr.ComprehensiveSR:
    """The note as a Comprehensive SR in the source study, its evidence the refused instances.

    UIDs follow from the job key, the analysis and the source instances: writing it again for
    the same job gives the same object (a re-delivery is idempotent at the PACS).
    """
    first = sources[0]
    seed = (ctx.job_key, "not-applicable", analysis, "|".join(sorted(str(s.SOPInstanceUID) for s in sources)))
    text = hd.sr.TextContentItem(
        name=codes.DCM.Comment,
        value=notice_text(analysis, reason),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    root = hd.sr.ContainerContentItem(
        name=codes.LN.DiagnosticImagingReport,
        template_id=None,
    )
    root.ContentSequence = [text]
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources),
        content=root,
        series_instance_uid=derived_uid(*seed, "series"),
        series_number=NOTICE_SERIES_NUMBER,
        sop_instance_uid=derived_uid(*seed, "sop"),
        instance_number=1,
        manufacturer=ctx.manufacturer or MANUFACTURER,
        is_complete=True,
        institution_name=ctx.institution_name,
        requested_procedures=[referenced_request(first, ctx)],
        contributing_equipment=algorithm_equipment(
            ctx,
            analysis,
            SOFTWARE_VERSION,
            algorithm_device_uid(analysis, analysis, SOFTWARE_VERSION),
            f"{analysis}: not applicable",
        ),
    )
    sr.SoftwareVersions = ctx.software_version
    return finish_common(sr, first, None, ctx, f"AI {analysis} not analysed")


def write_not_applicable_sr(
    source_paths: Sequence[Path], analysis: str, reason: str, ctx: ResultContext
) -> ResultObject:
    """Write the note under ``ctx.output_dir``; return it as a result object of kind "sr"."""
    sources = [read_source(p, stop_before_pixels=True) for p in source_paths]
    unique = list({str(s.SOPInstanceUID): s for s in sources}.values())
    sr = build_not_applicable_sr(unique, analysis, reason, ctx)
    path = write(sr, Path(ctx.output_dir), f"sr-{sr.SOPInstanceUID}")
    return ResultObject(path, "sr", str(sr.SOPClassUID), str(sr.SOPInstanceUID), str(sr.StudyInstanceUID))
