"""The admin API and /metrics against a running `ainode serve` fed by DCMTK storescu."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.ops.conftest import TOKEN, audit_text, make_ct_study, storescu, wait_phase


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in a Prometheus text exposition."""
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    m = re.search(r"^" + pattern + r"$", text, re.M)
    return float(m.group(1)) if m else None


def test_study_flows_through_and_is_visible_with_timings(running_node, tmp_path: Path):
    node, client = running_node
    uid = make_ct_study(tmp_path / "study", 5)
    assert storescu(node, tmp_path / "study").returncode == 0
    view = wait_phase(client, uid, ("done", "failed"))
    assert view["phase"] == "done", view
    assert view["rules_matched"] == ["ct-count"]
    assert view["instances"] == 5 and view["modalities"] == ["CT"]
    assert [j["state"] for j in view["jobs"]] == ["succeeded"]
    timings = view["timings_s"]
    assert timings["completion"] is not None and timings["completion"] >= 1.0  # the 1 s quiet timer
    assert timings["analysis"] is not None and timings["total"] >= timings["analysis"]
    listed = client.get("/api/studies")
    assert [s["study_uid"] for s in listed] == [uid]
    assert client.get("/api/studies") == listed
    # Searches are audited (Query), the dashboard's repeated polling only once per interval.
    assert wait_for(lambda: 'csd-code="110112"' in audit_text(node), 30)
    assert audit_text(node).count('csd-code="110112"') == 1
    # No patient name or ID leaves through the API.
    assert "Ops^Patient" not in str(listed) and "OPS0001" not in str(view)
    overview = client.get("/api/overview")
    assert overview["phases"]["done"] == 1 and overview["index"]["instances"] == 5
    assert overview["disk"]["free_bytes"] > 0
    peers = {p["ae_title"]: p for p in client.get("/api/peers")}
    assert peers["STORESCU"]["last_contact"] is not None and peers["ECHOSCU"]["last_contact"] is None


def test_token_is_required_and_refusals_are_audited(running_node):
    node, client = running_node
    assert client.call("GET", "/api/studies", token=None)[0] == 401
    assert client.call("GET", "/api/studies", token="wrong")[0] == 401
    assert client.call("POST", "/api/config/reload", token=None)[0] == 401
    assert wait_for(lambda: audit_text(node).count('csd-code="110114"') >= 3, 30), audit_text(node)[-2000:]
    assert 'EventOutcomeIndicator="4"' in audit_text(node)
    assert client.get("/api/health", token=None) == {"status": "ok"}  # liveness needs no token


def test_config_is_masked_and_reload_is_validated(running_node):
    node, client = running_node
    cfg = client.get("/api/config")
    assert cfg["settings"]["api"]["token"] == "***" and TOKEN not in str(cfg)
    assert cfg["settings"]["rules"][0]["name"] == "ct-count"
    good = node.config_path.read_text()
    node.config_path.write_text(good.replace("ct-count", "ct-count-2"))
    status, body = client.post("/api/config/reload")
    assert status == 200 and body["ok"] and body["rules"] == ["ct-count-2"], body
    assert wait_for(lambda: "rules reloaded" in node.log_text(), 30), node.log_text()[-2000:]
    node.config_path.write_text(good.replace("port: " + str(node.port), "port: 99999999"))
    status, body = client.post("/api/config/reload")
    assert status == 422 and not body["ok"] and any("port" in e for e in body["errors"]), body
    assert wait_for(lambda: audit_text(node).count('csd-code="110131"') >= 2, 30)
    assert client.get("/api/config")["settings"]["node"]["port"] == node.port  # the running config stands


def test_rerun_and_retry_actions(running_node, tmp_path: Path):
    node, client = running_node
    uid = make_ct_study(tmp_path / "study", 3)
    assert storescu(node, tmp_path / "study").returncode == 0
    view = wait_phase(client, uid, ("done", "failed"))
    first = view["jobs"][0]["id"]
    assert client.post(f"/api/jobs/{first}/retry")[0] == 409  # succeeded jobs are not retried
    status, body = client.post(f"/api/jobs/{first}/rerun")
    assert status == 200 and body["supersedes"] == first, body
    second = body["job_id"]
    assert wait_for(lambda: client.get(f"/api/jobs/{second}")["state"] == "succeeded", 180)
    assert client.get(f"/api/jobs/{second}")["supersedes_job_id"] == first
    assert client.post("/api/jobs/999999/rerun")[0] == 404
    assert client.post(f"/api/studies/{uid}/resend")[0] == 404  # count-instances writes no objects
    assert wait_for(lambda: 'csd-code="110132"' in audit_text(node), 30)
    assert f"re-run job {first} as job {second}" in audit_text(node)


def test_echo_action_reaches_a_real_scp_and_reports_a_dead_one(running_node):
    node, client = running_node
    status, ok = client.post("/api/destinations/self/echo")
    assert status == 200 and ok["ok"] and ok["result"] == "status 0x0000", ok
    status, bad = client.post("/api/destinations/nowhere/echo")
    assert status == 200 and not bad["ok"], bad
    assert client.post("/api/destinations/unknown/echo")[0] == 404


def test_metrics_after_a_push(running_node, tmp_path: Path):
    node, client = running_node
    uid = make_ct_study(tmp_path / "study", 4)
    assert storescu(node, tmp_path / "study").returncode == 0
    # An unknown calling AE is rejected: counted in the receiver process, visible here.
    echo = subprocess.run(
        ["echoscu", "-aet", "STRANGER", "-aec", "AINODE", "127.0.0.1", str(node.port)], capture_output=True, text=True
    )
    assert echo.returncode != 0
    assert wait_for(lambda: 'UserID="STRANGER"' in audit_text(node), 30), audit_text(node)[-2000:]
    alert = next(line for line in audit_text(node).splitlines() if 'UserID="STRANGER"' in line)
    assert 'csd-code="110113"' in alert and 'csd-code="110126"' in alert and 'EventOutcomeIndicator="4"' in alert
    wait_phase(client, uid, ("done",))
    text = client.get("/metrics").decode()
    assert metric(text, "ainode_instances_received_total") == 4.0, text[:3000]
    sizes = sum(p.stat().st_size for p in (tmp_path / "study").glob("*.dcm"))
    received = metric(text, "ainode_bytes_received_total")
    assert received is not None and sizes * 0.9 < received < sizes * 1.1
    assert metric(text, "ainode_associations_total", 'outcome="accepted"') >= 1
    assert metric(text, "ainode_associations_total", 'outcome="rejected"') >= 1
    assert metric(text, "ainode_instances_stored") == 4.0
    assert metric(text, "ainode_stage_seconds_count", 'stage="store"') == 4.0
    assert metric(text, "ainode_jobs", 'state="succeeded"') == 1.0
    assert metric(text, "ainode_queue_depth", 'priority="routine"') == 0.0
    assert metric(text, "ainode_pipeline_stage_seconds_count", 'stage="analysis"') == 1.0
    assert metric(text, "ainode_studies", 'state="done"') == 1.0


def test_api_port_taken_leaves_the_node_receiving(tmp_path: Path):
    import socket

    from tests.ops.conftest import node_with_api

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    node = node_with_api(tmp_path / "node", {"api": {"port": blocker.getsockname()[1], "token": TOKEN}})
    try:
        with node:
            assert wait_for(lambda: "admin API could not listen" in node.log_text(), 60), node.log_text()[-2000:]
            uid = make_ct_study(tmp_path / "study", 2)
            assert storescu(node, tmp_path / "study").returncode == 0
    finally:
        blocker.close()
    assert uid


@pytest.mark.postgres
def test_api_and_metrics_on_postgresql(tmp_path: Path, postgres_url: str):
    from tests.ops.conftest import Client, node_with_api

    node = node_with_api(tmp_path / "node", {"database": {"url": postgres_url}})
    with node:
        client = Client(node.config["api"]["port"])
        assert wait_for(client.up, 120), node.log_text()[-2000:]
        uid = make_ct_study(tmp_path / "study", 3)
        assert storescu(node, tmp_path / "study").returncode == 0
        view = wait_phase(client, uid, ("done", "failed"))
        assert view["phase"] == "done" and view["rules_matched"] == ["ct-count"]
        assert client.get("/api/overview")["phases"]["done"] == 1
        text = client.get("/metrics").decode()
        assert metric(text, "ainode_instances_stored") == 3.0
        assert metric(text, "ainode_pipeline_stage_seconds_count", 'stage="analysis"') == 1.0
