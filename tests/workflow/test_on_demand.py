"""On-demand analysis of a study only the PACS holds: the running node retrieves it (C-MOVE to
itself, or C-GET), queues the analysis, and its results reach the PACS."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.error
import urllib.request

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from node.core.db import engine_for, session_scope
from node.core.settings import load_settings
from node.index import Instance, Study
from node.jobs.table import Job
from node.workflow.retrieve import retrieve_study
from tests.helpers import REPO_ROOT, NodeProcess, port_open, wait_for
from tests.results.test_end_to_end import result_series
from tests.workflow.conftest import push_to_orthanc, source_of
from workers.analysis.models import segmentation
from workers.synthetic import phantoms


def start_node(tmp_path, pacs, node_port, **extra) -> NodeProcess:
    """`ainode serve` with the PACS as source (C-MOVE "orthanc", C-GET "orthanc-get") and destination."""
    overrides = {
        "node": {"port": node_port},
        "sources": [source_of(pacs, "c-move"), source_of(pacs, "c-get", name="orthanc-get")],
        "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
        "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        **extra,
    }
    node = NodeProcess(tmp_path / "node", overrides).start()
    api_up = wait_for(lambda: port_open(node.config["api"]["port"]) and (node.storage / "api-token").exists(), 120)
    assert api_up, node.log_text()[-2000:]
    return node


def counts(node: NodeProcess, study_uid: str) -> tuple[int, int]:
    """(instances indexed, jobs) for the study in the node's database."""
    with session_scope(engine_for(node.database_url)) as s:
        instances = s.scalar(select(func.count(Instance.id)))
        jobs = s.scalar(select(func.count(Job.id)).where(Job.study_uid == study_uid))
    return instances, jobs


def api(node: NodeProcess, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.config['api']['port']}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {node.api_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_c_move_to_the_running_node_indexes_every_instance(tmp_path, pacs, node_port, study_in_pacs):
    study_uid, uids = study_in_pacs
    node = start_node(tmp_path, pacs, node_port)
    try:
        settings = load_settings(node.config_path)
        outcome = retrieve_study(settings, study_uid, "orthanc")
        assert outcome.ok, outcome.error + node.log_text()[-2000:]
        assert (outcome.method, outcome.state, outcome.at_source) == ("c-move", "retrieved", len(uids))
        assert (outcome.completed, outcome.failed, outcome.warning, outcome.not_indexed) == (len(uids), 0, 0, 0)
        with session_scope(engine_for(node.database_url)) as s:
            assert sorted(s.scalars(select(Instance.sop_instance_uid))) == uids
            assert s.scalar(select(Study.calling_ae)) == pacs.aet  # arrived by C-STORE from the PACS
    finally:
        node.stop()


def test_api_action_retrieves_by_c_get_with_a_prior_and_queues_the_analysis(
    tmp_path, pacs, node_port, study_in_pacs, priors_in_pacs
):
    study_uid, uids = study_in_pacs
    earlier, _ = priors_in_pacs
    node = start_node(tmp_path, pacs, node_port)
    try:
        code, started = api(
            node,
            "POST",
            f"/api/studies/{study_uid}/analyses",
            {"analysis": "count-instances", "source": "orthanc-get", "destinations": ["pacs"], "priors": 1},
        )
        assert code == 202, started
        done = {}

        def finished() -> bool:
            done.update(api(node, "GET", f"/api/analysis-requests/{started['id']}")[1])
            return done.get("job_state") == "succeeded" or done.get("state") == "failed"

        assert wait_for(finished, timeout=300, interval=0.5), done
        assert done["state"] == "job-queued" and done["job_state"] == "succeeded", done
        retrieval = done["retrieval"]
        assert (retrieval["method"], retrieval["completed"], retrieval["failed"]) == ("c-get", len(uids), 0)
        with session_scope(engine_for(node.database_url)) as s:
            job = s.get(Job, done["job_id"])
            assert (job.rule, json.loads(job.destinations)) == ("on-demand", ["pacs"])
            assert json.loads(job.result)["instances"] == len(uids)  # the job saw every retrieved instance
            assert json.loads(job.params)["prior_study_uids"] == [earlier]  # the prior, for the analysis
            assert s.scalar(select(Study.state).where(Study.study_uid == earlier)) == "done"  # input only
        assert (done["prior_study_uids"], done["prior_errors"]) == ([earlier], [])
        assert [r["id"] for r in api(node, "GET", f"/api/studies/{study_uid}/analyses")[1]] == [started["id"]]
        assert "on-demand count-instances from orthanc-get" in (node.workdir / "audit.log").read_text()
    finally:
        node.stop()


def test_requests_naming_unknown_sources_or_destinations_are_refused(tmp_path, pacs, node_port):
    node = start_node(tmp_path, pacs, node_port)
    try:
        code, answer = api(
            node,
            "POST",
            "/api/studies/1.2.826.0.1.3680043.99.7/analyses",
            {"analysis": "count-instances", "source": "x"},
        )
        assert code == 400 and "unknown source 'x'" in answer["detail"]
        code, answer = api(
            node, "POST", "/api/studies/1.2.826.0.1.3680043.99.7/analyses", {"analysis": "count-instances"}
        )
        assert code == 400 and "name the destinations" in answer["detail"]  # no rule runs it
        code, answer = api(
            node,
            "POST",
            "/api/studies/1.2.826.0.1.3680043.99.7/analyses",
            {"analysis": "x", "priors": 1, "destinations": ["pacs"]},
        )
        assert code == 400 and "prior studies are retrieved from a source" in answer["detail"]
        # No source: the node must hold the study already.
        code, started = api(
            node, "POST", "/api/studies/1.2.826.0.1.3680043.99.7/analyses", {"analysis": "x", "destinations": ["pacs"]}
        )
        assert code == 202
        done: dict = {}
        assert wait_for(
            lambda: done.update(api(node, "GET", f"/api/analysis-requests/{started['id']}")[1]) or done["finished_at"],
            60,
        )
        assert (done["state"], done["error"]) == (
            "failed",
            "the node holds no instance of study 1.2.826.0.1.3680043.99.7: name a source to retrieve it from",
        )
        assert "1.2.826.0.1.3680043.99.7" not in node.log_text()  # the log names the study by a hash
    finally:
        node.stop()


def test_unknown_study_and_source_down_fail_precisely_and_write_nothing(tmp_path, pacs, node_port, study_in_pacs):
    study_uid, _ = study_in_pacs
    node = start_node(tmp_path, pacs, node_port)
    try:
        run = ainode_run(node, "count-instances", "1.2.826.0.1.3680043.99.1", "orthanc", "--to", "pacs")
        assert run.returncode == 1
        assert "failed: source orthanc holds no instance of study 1.2.826.0.1.3680043.99.1" in run.stdout

        pacs.stop()  # the PACS is down
        run = ainode_run(node, "count-instances", study_uid, "orthanc", "--to", "pacs")
        assert run.returncode == 1
        assert (
            f"failed: source orthanc (ORTHANC@127.0.0.1:{pacs.dicom_port}) cannot be reached: Connection refused"
            in (run.stdout)
        ), run.stdout
        assert counts(node, study_uid) == (0, 0)  # no instance, no study, no job
    finally:
        node.stop()


def ainode_run(node: NodeProcess, analysis: str, study_uid: str, source: str, *more: str):
    """`ainode run ANALYSIS --study UID --from SOURCE` as a user types it (its own process)."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "run", analysis, "--study", study_uid, "--from", source, *more]
        + ["-c", str(node.config_path)],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not segmentation.WEIGHTS.exists(), reason="ct-segmentation weights not trained yet (ainode train ct-segmentation)"
)
def test_ainode_run_retrieves_analyses_and_stores_the_results_back(tmp_path, pacs, node_port):
    """The issue's test: Orthanc holds a study the node has never seen; `ainode run ct-segmentation
    --study UID --from orthanc` retrieves it (C-MOVE), analyses it, and the SEG and SR reach Orthanc."""
    phantom = phantoms.make_ct_phantom(4242, shape=(48, 64, 64))
    files = phantoms.write_ct_series(phantom, tmp_path / "study")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    push_to_orthanc(pacs, files)
    rules = [{"name": "ct-seg", "match": {"modality": "MR"}, "analyses": ["ct-segmentation"], "destinations": ["pacs"]}]
    node = start_node(tmp_path, pacs, node_port, rules=rules)  # the rule names the destination only
    try:
        run = ainode_run(node, "ct-segmentation", study_uid, "orthanc")
        assert run.returncode == 0, run.stdout + run.stderr + node.log_text()[-4000:]
        assert f"retrieved {len(files)} instance(s) (0 held before)" in run.stdout
        arrived = wait_for(lambda: {"SEG", "SR"} <= set(result_series(pacs, study_uid)), timeout=300, interval=1.0)
        assert arrived, node.log_text()[-4000:]
    finally:
        node.stop()
    series = result_series(pacs, study_uid)
    assert len(series["CT"]) == len(files)  # the results joined the study in the PACS
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(pacs.instance_file(series["SEG"][0]))))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    labels = {item.SegmentLabel: int(item.SegmentNumber) for item in seg.SegmentSequence}
    decoded = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[labels["liver"]], assert_missing_frames_are_empty=True
    )[..., 0].astype(bool)
    truth = phantom.labels == 2
    dice = 2 * np.logical_and(decoded, truth).sum() / (decoded.sum() + truth.sum())
    print(f"on demand: liver Dice from the SEG fetched back from Orthanc = {dice:.3f}")
    assert dice > 0.8
