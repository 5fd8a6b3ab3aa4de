"""Synthetic findings for each task over a real volume, written and checked by the validators.

No model runs: the findings are placed in the volume's middle, so every writer (SEG, SR, KOS,
GSPS, SC, derived) gets real headers nobody here wrote. Shared by the real-header tests
(tests/results/test_real_headers.py) and the corpus test (tests/realdata/test_corpus.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from node.core.settings import CapabilityProfile
from tests.results.validators import dciodvfy_errors
from workers.analysis.findings import (
    Classification,
    DerivedImage,
    Detection,
    Findings,
    Measurement,
    Segment,
    Volume,
)
from workers.results import ResultContext, ResultObject, writable_reason, write_results

# Every kind at once: SEG+SR+KOS for a modern PACS, GSPS and burned-in SC for one without SEG.
ALL_PROFILES = [CapabilityProfile(), CapabilityProfile(seg=False, secondary_capture=True)]
TASKS = ("segmentation", "detection", "classification", "reconstruction", "ejection_fraction")
NODULE = ("27925004", "SCT", "Nodule")
LIVER = ("10200004", "SCT", "Liver")


def synthetic_findings(volume: Volume, task: str) -> Findings:
    """Findings of ``task`` over the middle of the volume (what a model of that task returns)."""
    k, j, i = volume.pixels.shape
    mid = (k // 2, j // 2, i // 2)
    findings = Findings("realdata", "SyntheticNet", "1.0", "0" * 64, volume, task)  # type: ignore[arg-type]
    if task == "segmentation":
        mask = np.zeros(volume.pixels.shape, bool)
        mask[:, j // 4 : j // 2 + 1, i // 4 : i // 2 + 1] = True
        findings.segments = [Segment("liver", mask, LIVER, tracking_id="liver")]
        ml = float(mask.sum() * np.prod(volume.spacing)) / 1000.0
        findings.measurements = [
            Measurement(("118565006", "SCT", "Volume"), ml, ("cm3", "UCUM", "cubic centimeter"), segment_label="liver")
        ]
    elif task == "detection":
        box = ((mid[0], j / 4, i / 4), (mid[0], j / 2, i / 2))
        findings.detections = [Detection("nodule", NODULE, (mid[0], j / 3, i / 3), box, 0.9, diameter_mm=6.0)]
    elif task == "classification":
        findings.classifications = [Classification("nodule", NODULE, 0.8)]
    elif task == "reconstruction":
        findings.derived = [DerivedImage(volume.pixels.copy(), "AI processed", "copy of the source (test)")]
    else:
        findings.measurements = [
            Measurement(("10230-1", "LN", "Left ventricular Ejection fraction"), 60.0, ("%", "UCUM", "percent"))
        ]
    return findings


@dataclass
class Outcome:
    """What happened to one (volume, task): refused before inference, or objects written."""

    refused: str | None = None
    objects: list[ResultObject] = field(default_factory=list)


def write_task(volume: Volume, task: str, out: Path) -> Outcome:
    """Check writability as the job runner does, then write every kind of result."""
    reason = writable_reason(volume, task)
    if reason:
        return Outcome(refused=reason)
    context = ResultContext(job_key=f"realdata/{task}", output_dir=out, destinations=ALL_PROFILES)
    return Outcome(objects=write_results(synthetic_findings(volume, task), context))


def source_errors(volume: Volume) -> set[str]:
    """dciodvfy's errors of the source instances themselves (real files are not all valid)."""
    errors: set[str] = set()
    for path in {frame.path for frame in volume.sources}:
        errors.update(dciodvfy_errors(path))
    return errors


def object_errors(obj: ResultObject, volume: Volume, inherited: set[str]) -> list[str]:
    """dciodvfy's errors of a result object; a derived image (the source's IOD) copies its
    source's header, so errors the source has itself are not the writer's."""
    errors = dciodvfy_errors(obj.path)
    if obj.sop_class_uid == volume.sources[0].sop_class_uid:
        errors = [e for e in errors if e not in inherited]
    # Results must reference their sources by the sources' own UIDs, whatever their root.
    own = {volume.study_instance_uid, volume.series_instance_uid, *(f.sop_instance_uid for f in volume.sources)}
    return [e for e in errors if not ("Illegal root for UID" in e and any(f"<{uid}>" in e for uid in own))]


def patient_name(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("PatientName", ""))
