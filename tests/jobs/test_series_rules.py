"""Rule conditions are evaluated per series: a study-level rule matches when one series satisfies
its whole match, ``frames`` is the frame count of one instance (never a sum), and the job analyses
the series that matched. Real files for `ainode rules test`, index rows for the router."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from node import assembler
from node.core.db import engine_for, session_scope
from node.jobs.inputs import job_inputs
from node.jobs.table import Job
from node.router import explain_rules
from tests.jobs.conftest import add_study, settings_from, write_config

CINE_RULE = {"name": "cine", "match": {"modality": "US", "frames": {"min": 2}}, "analyses": ["count-instances"]}


def _jobs(settings) -> list[Job]:
    with session_scope(engine_for(settings.database.url)) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        for job in jobs:
            session.expunge(job)
        return jobs


def _one_study(files: list[str], folder: Path) -> None:
    """Real files put into one study (each keeps its own series), as a PACS would send a study."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    for n, name in enumerate(files):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{n}-{name}")


def test_three_real_ultrasound_stills_do_not_match_a_multi_frame_rule(tmp_path, capsys):
    stills = tmp_path / "stills"
    _one_study(["US1_UNCI.dcm", "examples_rgb_color.dcm", "OBXXXX1A.dcm"], stills)
    settings = settings_from(write_config(tmp_path, rules=[CINE_RULE]))
    assert explain_rules(settings, [stills]) == 0
    out = capsys.readouterr().out
    assert "cine: no match - frames: 1 is not at least 2" in out
    # The same stills with a real cine loop in the study: the rule holds, on the cine's series only.
    both = tmp_path / "both"
    _one_study(["US1_UNCI.dcm", "examples_rgb_color.dcm", "OBXXXX1A.dcm", "examples_ybr_color.dcm"], both)
    assert explain_rules(settings, [both]) == 0
    out = capsys.readouterr().out
    assert "cine: MATCH -> count-instances" in out and "on 1 of 4 series" in out


def test_router_counts_frames_per_instance_and_conditions_per_series(make_settings):
    settings = make_settings(
        rules=[
            CINE_RULE,
            {
                "name": "big-first-series",
                "match": {"series_description": "series 1", "instances": {"min": 5}},
                "analyses": ["count-instances"],
            },
        ]
    )
    # Three series of 3 single-frame US images: 9 frames in the study, 1 per instance.
    add_study(settings, study_uid="1.2.3.500", modality="US", series=3, instances=3, age=timedelta(seconds=5))
    assembler.tick(settings)
    # Neither rule matches: no instance has 2 frames; series 1 has 3 instances (6 in the study).
    assert _jobs(settings) == []


def test_study_level_rule_selects_the_series_that_match(make_settings):
    rule = {
        "name": "second",
        "match": {"modality": "CT", "series_description": "series 2"},
        "analyses": ["count-instances"],
    }
    settings = make_settings(rules=[rule])
    add_study(settings, study_uid="1.2.3.510", series=3, instances=2, age=timedelta(seconds=5))
    assembler.tick(settings)
    (job,) = _jobs(settings)
    assert job.level == "study" and job.selected_series() == ["1.2.3.510.2"]
    inputs = job_inputs(settings, job)
    assert {i.series_uid for i in inputs} == {"1.2.3.510.2"} and len(inputs) == 2
