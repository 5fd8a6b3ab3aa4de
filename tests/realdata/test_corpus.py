"""The corpus: every readable image of pydicom-data and pydicom's test files through the writers.

For each distinct image instance (the same instance in several transfer syntaxes counts once)
and each task a model produces, synthetic findings are written as results (no model runs):
every (file, task) either writes objects that pass dciodvfy, or is refused before inference by
``writable_reason`` (or by ``load_series``) with a reason; nothing crashes. One SR per modality
also goes through PixelMed's DicomSRValidator (a JVM per file: a sample, chosen by name).

Select it with ``-m realdata``; it takes a few minutes on two cores.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files

from tests.realdata.writers import TASKS, object_errors, source_errors, write_task
from tests.results.validators import sr_validator_errors
from workers.analysis.imaging import SeriesError, load_series

pytestmark = pytest.mark.realdata

# Known, documented limits (docs/conformance.md): a SEG over an image without Slice Thickness
# leaves Pixel Measures' Slice Thickness out rather than guess it. (DicomSRValidator's one known
# limitation is left out by tests/results/validators.py.)
SEG_WITHOUT_SLICE_THICKNESS = "/PixelMeasuresSequence(0028,9110)[1]/SliceThickness(0018,0050)> - Missing attribute"
# Refusals say why in words a hospital can act on.
REASON_WORDS = (
    *("(0020,0052)", "(0020,0032)", "(0020,0037)", "(0028,0030)", "(5200,9230)", "(0020,9116)"),
    *("(0020,000D)", "(0020,000E)", "(0008,0018)", "(0008,0016)", "(0008,0060)"),
)


def corpus() -> list[Path]:
    """The distinct image instances, first file name per SOP Instance UID (sorted: deterministic)."""
    seen: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(set(get_testdata_files("*")) | set(get_charset_files("*.dcm")), key=lambda p: Path(p).name):
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
                has_pixels = "PixelData" in pydicom.dcmread(name, specific_tags=["PixelData"])
            except Exception:  # noqa: BLE001 - not a readable DICOM file: not part of the corpus
                continue
            uid = str(ds.get("SOPInstanceUID", ""))
            if has_pixels and uid and uid not in seen:
                seen[uid] = Path(name)
    return list(seen.values())


def test_every_real_image_writes_valid_results_or_is_refused(tmp_path):
    files = corpus()
    assert len(files) > 40
    written, refused, unreadable, problems = 0, 0, 0, []
    sample_srs: dict[str, Path] = {}
    for n, path in enumerate(files):
        try:
            volume = load_series([path])
        except SeriesError as err:  # refused before any analysis, with its reason
            assert str(err), path.name
            unreadable += 1
            continue
        inherited = source_errors(volume)
        for task in TASKS:
            try:
                outcome = write_task(volume, task, tmp_path / f"{n}" / task)
            except Exception as err:  # noqa: BLE001 - collected: every crash is listed at the end
                problems.append(f"{path.name} {task}: crashed: {type(err).__name__}: {err}")
                continue
            if outcome.refused:
                refused += 1
                if not any(word in outcome.refused for word in REASON_WORDS):
                    problems.append(f"{path.name} {task}: unclear refusal: {outcome.refused}")
                continue
            for obj in outcome.objects:
                written += 1
                errors = [e for e in object_errors(obj, volume, inherited) if SEG_WITHOUT_SLICE_THICKNESS not in e]
                if errors:
                    problems.append(f"{path.name} {task} {obj.kind}: {errors[:3]}")
                if obj.kind == "sr":
                    sample_srs.setdefault(volume.modality, obj.path)
    for modality, sr in sorted(sample_srs.items()):
        errors = sr_validator_errors(sr)
        if errors:
            problems.append(f"SR of a {modality} image: {errors[:3]}")
    assert problems == [], "\n".join(problems)
    assert written > 100 and refused > 0
    print(f"{len(files)} images: {written} objects written, {refused} tasks refused, {unreadable} not a volume")
