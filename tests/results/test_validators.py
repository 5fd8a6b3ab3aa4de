"""The validators the result tests rely on are not blind: each reports a known-bad object, the
DicomSRValidator filter keeps its one tolerated message narrow, and a validator that cannot run
(a missing file, a failing Java) raises instead of reporting nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import pytest

from tests.results.synthetic import segmentation_findings
from tests.results.test_writers import by_kind, write
from tests.results.validators import (
    ValidatorFailed,
    dciodvfy_errors,
    known_sr_validator_limitation,
    sr_validator_errors,
)

IMAGING_MEASUREMENTS = "126010"
REFERENCED_SEGMENT = "121191"


@pytest.fixture
def written(ct, tmp_path) -> dict[str, list[Path]]:
    """A SEG, an SR (a TID 1411 group and a TID 1501 group) and a KOS of the synthetic CT."""
    volume, _ = ct
    return by_kind(write(segmentation_findings(volume), tmp_path))


def _copy(path: Path, tmp_path: Path, name: str) -> tuple[Path, pydicom.Dataset]:
    bad = tmp_path / name
    shutil.copy(path, bad)
    return bad, pydicom.dcmread(bad)


def _code(item: pydicom.Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""


def test_dciodvfy_reports_a_seg_without_its_segment_sequence(written, tmp_path):
    seg = written["seg"][0]
    assert dciodvfy_errors(seg) == []
    bad, ds = _copy(seg, tmp_path, "bad-seg.dcm")
    del ds.SegmentSequence  # Type 1 in the Segmentation Image module
    ds.save_as(bad, enforce_file_format=True)
    errors = dciodvfy_errors(bad)
    assert any("SegmentSequence" in e and "Type 1 Required" in e for e in errors), errors


def test_sr_validator_reports_an_sr_without_its_imaging_measurements(written, tmp_path):
    """TID 1500 needs one of Imaging Measurements (row 6), Derived Imaging Measurements (row 10)
    or Qualitative Evaluations (row 12); the report keeps none."""
    sr = written["sr"][0]
    assert sr_validator_errors(sr) == []  # the tolerated TID 1501 message is left out here
    bad, ds = _copy(sr, tmp_path, "bad-sr.dcm")
    ds.ContentSequence = [it for it in ds.ContentSequence if _code(it) != IMAGING_MEASUREMENTS]
    ds.save_as(bad, enforce_file_format=True)
    errors = sr_validator_errors(bad)
    assert any("Imaging Measurements" in e and "Missing conditional content item" in e for e in errors), errors


def test_the_tolerated_message_is_tolerated_only_for_a_tid_1501_group(written):
    """The validator's message naming the measurement group at 1.10.1 (TID 1501, the structure
    found Absent) is left out; the same message naming the TID 1411 group at 1.10.2 (it has its
    Referenced Segment), or another message, is not. (DicomSRValidator itself reports nothing when
    the TID 1411 group loses its Referenced Segment, so the narrowing is checked on the text.)"""
    sr = written["sr"][0]
    measurements = next(it for it in pydicom.dcmread(sr).ContentSequence if _code(it) == IMAGING_MEASUREMENTS)
    groups = [[_code(c) for c in g.ContentSequence] for g in measurements.ContentSequence]
    assert REFERENCED_SEGMENT not in groups[0] and REFERENCED_SEGMENT in groups[1]
    message = (
        'Error: Template 1411 VolumetricROIMeasurements/[Row 1] CONTAINER (125007,DCM,"Measurement Group")/'
        '[Row 7] IMAGE (121191,DCM,"Referenced Segment"): within 1.10.{n}: /CONTAINER (126000,DCM,'
        '"Imaging Measurement Report")/CONTAINER (126010,DCM,"Imaging Measurements")/CONTAINER (125007,DCM,'
        '"Measurement Group"): Missing conditional content item'
    )
    assert known_sr_validator_limitation(message.format(n=1), sr)
    assert not known_sr_validator_limitation(message.format(n=2), sr)
    assert not known_sr_validator_limitation(message.format(n=1).replace("conditional", "required"), sr)
    assert not known_sr_validator_limitation(message.format(n=9), sr)  # no such group


def test_a_validator_that_cannot_read_the_file_raises(tmp_path):
    missing = tmp_path / "missing.dcm"
    with pytest.raises(ValidatorFailed):
        dciodvfy_errors(missing)
    with pytest.raises(ValidatorFailed):  # DicomSRValidator prints the exception and exits 0
        sr_validator_errors(missing)


@pytest.mark.parametrize("java", ["exit 1", "exit 0"], ids=["java-fails", "java-prints-nothing"])
def test_a_java_failure_is_not_a_pass(written, tmp_path, monkeypatch, java):
    """DicomSRValidator is a shell script running ``java`` from PATH: a broken Java (an exit
    status, or no "IOD validation complete") makes the helper raise, not return no errors."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "java").write_text(f"#!/bin/sh\n{java}\n")
    (fake / "java").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with pytest.raises(ValidatorFailed):
        sr_validator_errors(written["sr"][0])
