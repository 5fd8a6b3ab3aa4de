"""Intended use end to end: real out-of-scope files pushed with storescu to `ainode serve`, with
rules that send them to the lung/abdomen, chest radiograph and ejection-fraction models.

Every job ends "not applicable" with its reason (the router refuses what the headers rule out, the
worker what the image shows), nothing with findings reaches the PACS, `ainode status` lists them;
an in-domain phantom radiograph in the same run is still analysed and delivered.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.core.db import engine_for, session_scope
from node.jobs.table import FINAL_STATES, Job
from tests.helpers import NodeProcess, wait_for
from tests.real_files import renamed, stacked_series
from tests.results.test_end_to_end import result_series, storescu
from workers.synthetic.projection import projection_source, radiographs_of, write_dx

pytestmark = pytest.mark.slow

RULES = [
    {"name": "ct-trunk", "match": {"modality": "CT"}, "analyses": ["ct-segmentation", "ct-lesion-detection"]},
    {"name": "chest-xr", "match": {"modality": {"one_of": ["CR", "DX"]}}, "analyses": ["nodule-classification"]},
    {"name": "lvef", "match": {"modality": {"one_of": ["US", "MR"]}}, "analyses": ["ejection-fraction"]},
]


def _jobs(node: NodeProcess) -> list[Job]:
    with session_scope(engine_for(node.database_url)) as session:
        jobs = list(session.scalars(select(Job).order_by(Job.id)))
        for job in jobs:
            session.expunge(job)
        return jobs


def test_out_of_scope_real_files_end_not_applicable_and_phantom_is_analysed(tmp_path, orthanc):
    head_ct = stacked_series("693_UNCI.dcm", tmp_path / "head", slices=12, step_mm=5.0)
    tibia = renamed("RG3_UNCI.dcm", tmp_path / "tibia")
    brain = renamed("emri_small.dcm", tmp_path / "brain")
    hu, lung, spacing = projection_source(424_011)
    shot = radiographs_of(hu, lung, spacing, 1, np.random.default_rng(11))[0]
    chest = write_dx(shot, tmp_path / "dx" / "chest.dcm")
    uid = {
        name: str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        for name, files in {"head": head_ct, "tibia": [tibia], "brain": [brain], "chest": [chest]}.items()
    }
    node = NodeProcess(
        tmp_path / "node",
        {
            "destinations": [
                {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "rules": [dict(rule, destinations=["pacs"]) for rule in RULES],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    with node:
        for files in (head_ct, [tibia], [brain], [chest]):
            storescu(node.port, node.ae_title, files)
        finished = wait_for(
            lambda: len(jobs := _jobs(node)) == 5 and all(j.state in FINAL_STATES for j in jobs),
            timeout=600,
            interval=1.0,
        )
        assert finished, node.log_text()[-4000:]
        delivered = wait_for(lambda: "SR" in result_series(orthanc, uid["chest"]), timeout=300, interval=1.0)
        assert delivered, node.log_text()[-4000:]
        status = subprocess.run(
            [sys.executable, "-m", "node.cli", "status", "--json", "-c", str(node.config_path)],
            capture_output=True,
            text=True,
        )
    by_study = {(j.study_uid, j.analysis): j for j in _jobs(node)}
    for analysis in ("ct-segmentation", "ct-lesion-detection"):
        job = by_study[(uid["head"], analysis)]
        # The head CT says nothing of its region: the worker's image check refuses it.
        assert job.state == "inapplicable" and "not an adult chest or abdomen" in job.error, job.error
        assert job.attempts == 1
    tibia_job = by_study[(uid["tibia"], "nodule-classification")]
    # Refused by the router from the headers, before any worker saw it.
    assert tibia_job.state == "inapplicable" and "BodyPartExamined 'EXTREMITY'" in tibia_job.error
    assert tibia_job.attempts == 0
    brain_job = by_study[(uid["brain"], "ejection-fraction")]
    assert brain_job.state == "inapplicable" and "head" in brain_job.error and brain_job.attempts == 0
    assert by_study[(uid["chest"], "nodule-classification")].state == "succeeded"
    # Nothing reached the PACS for the out-of-scope studies.
    for name in ("head", "tibia", "brain"):
        assert result_series(orthanc, uid[name]) == {}, name
    report = json.loads(status.stdout)
    listed = {j["id"] for j in report["jobs"]["not_applicable"]}
    assert listed == {j.id for j in by_study.values() if j.state == "inapplicable"}
    assert report["jobs"]["jobs"]["inapplicable"] == 4
