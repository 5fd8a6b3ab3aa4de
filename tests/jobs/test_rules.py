"""Routing rules: matching semantics, `ainode rules test` on files, and reloading."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.core.settings import Match
from node.router import RuleBook, age_in_years, evaluate
from tests.jobs.conftest import ROOT, env_for_children, settings_from, write_config

FACTS = {
    "modality": ["CT", "SR"],
    "slice_thickness": [1.25],
    "patient_age": [54.0],
    "instances": [120],
    "study_description": ["CT CHEST W/O"],
    "calling_ae": ["CT01"],
    "body_part": ["CHEST"],
}


@pytest.mark.parametrize(
    "match, ok, why",
    [
        ({"modality": "CT"}, True, ""),
        ({"modality": ["CR", "DX"]}, False, "modality: 'CT', 'SR' is not one of ['CR', 'DX']"),
        ({"slice_thickness": {"max": 1}}, False, "slice_thickness: 1.25 is not at most 1"),
        ({"patient_age": {"min": 18, "max": 120}}, True, ""),
        ({"study_description": {"regex": "^CT CHEST"}}, True, ""),
        ({"station_name": "CT-A"}, False, "station_name: no value is not equal to 'CT-A'"),
        (
            {"any": [{"modality": "MR"}, {"body_part": "HEAD"}]},
            False,
            "none of any: modality: 'CT', 'SR' is not equal to 'MR'; body_part: 'CHEST' is not equal to 'HEAD'",
        ),
        ({"all": [{"modality": "CT"}, {"instances": {"min": 50}}]}, True, ""),
        ({"not": {"calling_ae": "CT01"}}, False, "not: the excluded condition holds"),
        ({"modality": "CT", "not": {"body_part": "HEAD"}}, True, ""),
    ],
)
def test_match_semantics(match, ok, why):
    assert evaluate(Match.model_validate(match), FACTS) == (ok, why)


def test_age_strings():
    assert age_in_years("054Y") == 54 and age_in_years("006M") == 0.5 and age_in_years("bad") is None


def _write_ct(
    folder: Path, study_uid: str, series_uid: str, n: int, modality: str = "CT", thickness: str = "1.0"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.SliceThickness, ds.BodyPartExamined = modality, thickness, "CHEST"
        ds.PatientName, ds.PatientID, ds.PatientAge = "Doe^Jane", "MRN123", "061Y"
        ds.StudyDescription = "CT THORAX"
        pydicom.dcmwrite(folder / f"{modality}-{series_uid[-4:]}-{i}.dcm", ds, enforce_file_format=True)


def test_rules_test_command_explains_each_rule(tmp_path):
    data = tmp_path / "data"
    study = generate_uid()
    _write_ct(data, study, generate_uid(), 4, thickness="1.0")
    _write_ct(data, study, generate_uid(), 2, modality="SR")
    (data / "notes.txt").write_text("not dicom")
    cfg = write_config(
        tmp_path,
        rules=[
            {
                "name": "ct-thin",
                "match": {"modality": "CT", "slice_thickness": {"max": 2}},
                "analyses": ["count-instances"],
            },
            {"name": "cxr", "match": {"modality": ["CR", "DX"]}, "analyses": ["count-instances"]},
            {"name": "adults-only", "match": {"patient_age": {"max": 40}}, "analyses": ["count-instances"]},
            {"name": "per-ct-series", "level": "series", "match": {"modality": "CT"}, "analyses": ["count-instances"]},
        ],
    )
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "rules", "test", "-c", str(cfg), str(data)],
        cwd=ROOT,
        env=env_for_children(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "1 file(s) skipped" in text
    assert "(2 series, 6 instances, modality CT, SR)" in text
    assert "ct-thin: MATCH -> count-instances" in text and "on 1 of 2 series" in text
    # Per series: each series' reason, each distinct reason once.
    assert "cxr: no match - modality: 'CT' is not one of ['CR', 'DX']; modality: 'SR' is not one of" in text
    assert "adults-only: no match - patient_age: 61.0 is not at most 40" in text
    assert "(CT, 4 instances): MATCH" in text and "(SR, 2 instances): no match - modality: 'SR'" in text
    assert "Doe^Jane" not in text and "MRN123" not in text


def test_rules_test_without_dicom_fails(tmp_path):
    cfg = write_config(tmp_path)
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "rules", "test", "-c", str(cfg), str(tmp_path / "empty")],
        cwd=ROOT,
        env=env_for_children(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "no DICOM data found" in out.stdout


def test_rules_reload_on_change_and_keep_old_rules_on_error(tmp_path, caplog):
    rule = {"name": "one", "match": {"modality": "CT"}, "analyses": ["count-instances"]}
    cfg = write_config(tmp_path, rules=[rule])
    book = RuleBook(settings_from(cfg))
    assert [r.name for r in book.rules] == ["one"] and not book.check()
    write_config(tmp_path, rules=[rule, dict(rule, name="two")])
    os.utime(cfg, (time.time() + 5, time.time() + 5))
    assert book.check() and [r.name for r in book.rules] == ["one", "two"]
    # An invalid file: each error is logged with its line, the rules in force stay.
    text = cfg.read_text().replace("level: study", "level: sometimes", 1)
    if "level:" not in cfg.read_text():
        text = cfg.read_text().replace("- name: two", "- name: two\n  level: sometimes", 1)
    cfg.write_text(text)
    os.utime(cfg, (time.time() + 10, time.time() + 10))
    with caplog.at_level(logging.ERROR, logger="ainode.router"):
        assert not book.check()
    assert [r.name for r in book.rules] == ["one", "two"]
    assert f"rules not reloaded: {cfg}:" in caplog.text and "rules[1].level" in caplog.text
    # SIGHUP (request_reload) reloads even when the file's time did not change.
    write_config(tmp_path, rules=[dict(rule, name="three")])
    os.utime(cfg, (time.time() + 10, time.time() + 10))
    book.request_reload()
    assert book.check() and [r.name for r in book.rules] == ["three"]


def test_rule_book_belongs_to_its_settings_object_even_when_an_id_is_reused(tmp_path):
    from node import router

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = settings_from(
        write_config(tmp_path / "a", rules=[{"name": "old", "match": {}, "analyses": ["count-instances"]}])
    )
    second = settings_from(
        write_config(tmp_path / "b", rules=[{"name": "new", "match": {}, "analyses": ["count-instances"]}])
    )
    # What garbage collection can do: a new settings object gets the id of one that had a book.
    router._books[id(second)] = (first, RuleBook(first))
    try:
        assert [r.name for r in router.current_rules(second)] == ["new"]
    finally:
        router._books.pop(id(second), None)
