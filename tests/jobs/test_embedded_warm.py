"""The embedded worker keeps one child process between jobs (models stay loaded) and replaces it
when it has to be killed: the crash isolation of a child per job, without a reload per job.

The second test is a real embedded node (``ainode serve``, no broker) with a TorchScript model
plugged in the way a hospital plugs in its own: two studies pushed over DICOM, two jobs, one
model load; their series' pixels come from the streamed volumes (node.core.volumes).
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, select, text

from node import assembler
from node.core.db import engine_for, session_scope
from node.jobs import embedded as node_jobs
from node.jobs.table import Job
from tests.helpers import wait_for
from tests.jobs.conftest import add_study
from tests.jobs.test_completion_and_routing import CT_RULE
from tests.jobs.test_model_path import threshold_node
from workers.synthetic import phantoms


def _job_of(settings, study_uid: str) -> Job | None:
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.scalar(select(Job).where(Job.study_uid == study_uid))
        if job is not None:
            session.expunge(job)
        return job


def _finish(settings, study_uid: str, modality: str = "CT") -> Job:
    add_study(settings, study_uid=study_uid, modality=modality, age=timedelta(seconds=10))
    assembler.tick(settings)
    assert wait_for(lambda: (j := _job_of(settings, study_uid)) is not None and j.finished_at is not None, 180)
    return _job_of(settings, study_uid)


def test_jobs_share_one_child_until_it_must_be_killed(make_settings):
    settings = make_settings(
        rules=[
            CT_RULE,
            {
                "name": "hang",
                "match": {"modality": "MR"},
                "analyses": [{"name": "sleep", "params": {"seconds": 60, "ignore_soft_limit": True}}],
            },
        ],
        analyses=[{"name": "sleep", "soft_time_limit_s": 1, "time_limit_s": 3}],
    )
    worker = node_jobs.EmbeddedWorker(settings).start()
    try:
        first = _finish(settings, "1.2.7.1")
        second = _finish(settings, "1.2.7.2")
        assert (first.state, second.state) == ("succeeded", "succeeded")
        assert first.worker == second.worker  # the same child ran both
        hung = _finish(settings, "1.2.7.3", modality="MR")
        assert hung.state == "failed" and "time limit" in (hung.error or "")
        assert hung.worker == first.worker  # killed at the hard limit: that child is gone
        after = _finish(settings, "1.2.7.4")
        assert after.state == "succeeded"
        assert after.worker != first.worker  # a fresh child took over
        assert worker.children_started == 2
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_real_embedded_node_loads_the_model_once_and_maps_streamed_volumes(tmp_path):

    studies = [tmp_path / "study-a", tmp_path / "study-b"]
    for seed, folder in enumerate(studies):
        phantoms.write_ct_series(phantoms.make_ct_phantom(seed + 7, shape=(16, 32, 32)), folder)
    node = threshold_node(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}],
        rules=[{"name": "ct", "match": {"modality": "CT"}, "analyses": ["threshold-test"], "destinations": ["pacs"]}],
    )
    with node:
        engine = create_engine(node.database_url)

        def jobs():
            with engine.connect() as conn:
                return conn.execute(text("SELECT id, state, error, result, worker FROM jobs ORDER BY id")).all()

        for n, folder in enumerate(studies, start=1):
            files = sorted(str(p) for p in folder.glob("*.dcm"))
            subprocess.run(
                ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
                check=True,
                capture_output=True,
                timeout=300,
            )
            assert wait_for(lambda n=n: len(jobs()) == n and jobs()[-1][1] in ("succeeded", "failed", "dead"), 300), (
                node.log_text()[-4000:]
            )
        rows = jobs()
        engine.dispose()
        assert [r[1] for r in rows] == ["succeeded", "succeeded"], [r[2] for r in rows]
        assert rows[0][4] == rows[1][4]  # one child ran both jobs
        for row in rows:
            assert [s["pixels"] for s in json.loads(row[3])["series"]] == ["streamed"]
        loads = re.findall(r"analysis threshold-test: model loaded on (\w+)", node.log_text())
        assert loads == ["cpu"] or loads == ["cuda"], loads
