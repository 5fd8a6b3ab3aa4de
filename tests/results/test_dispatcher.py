"""Delivery through the durable outbox to real DICOM peers (pynetdicom SCPs; a STOW-RS stub for
the answers Orthanc cannot give: test_dicomweb.py delivers to Orthanc)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from sqlalchemy import select

from node.core.db import init_db, session_scope
from node.core.settings import CapabilityProfile, Settings
from node.dispatch.outbox import backoff_s, deliver, deliver_due, enqueue_results, status_summary
from node.dispatch.senders import classify_dimse_status
from node.dispatch.table import DELIVERED, FAILED, PENDING, Delivery
from tests.helpers import wait_for
from tests.results.peers import StoreSCP, StowServer
from tests.results.synthetic import segmentation_findings
from workers.results import ResultContext, write_results

SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.34"
KOS_SOP = "1.2.840.10008.5.1.4.1.1.88.59"


def make_settings(tmp_path: Path, destinations: list[dict]) -> Settings:
    for d in destinations:
        d.setdefault("retry_initial_s", 0.2)
        d.setdefault("retry_max_s", 1.0)
    return Settings.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path}/ainode.db"},
            "node": {"ae_title": "AINODE", "acse_timeout_s": 5, "network_timeout_s": 10, "dimse_timeout_s": 10},
            "destinations": destinations,
        }
    )


def results(ct, tmp_path, profiles=None) -> list[Path]:
    volume, _ = ct
    ctx = ResultContext(
        job_key="job-1", output_dir=tmp_path / "results", destinations=profiles or [CapabilityProfile()]
    )
    return write_results(segmentation_findings(volume), ctx)


def enqueue(settings, paths, names, job_id=1):
    engine = init_db(settings.database.url)
    with session_scope(engine) as session:
        return enqueue_results(session, job_id, paths, names, settings=settings)


def rows(settings) -> list[Delivery]:
    with session_scope(init_db(settings.database.url)) as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def run_until_settled(settings, timeout=60.0) -> bool:
    """Delivery passes (as the node's periodic task does) until nothing is pending or sending."""

    def settled() -> bool:
        deliver_due(settings)
        return all(r.state not in (PENDING, "sending") for r in rows(settings))

    return wait_for(settled, timeout=timeout, interval=0.2)


def test_status_classes():
    assert classify_dimse_status(0x0000).result == DELIVERED
    assert classify_dimse_status(0xB007).result == DELIVERED
    assert classify_dimse_status(0xA700).result == PENDING
    assert classify_dimse_status(0xA702).result == PENDING
    assert classify_dimse_status(0xA900).result == FAILED
    assert classify_dimse_status(0xC000).result == FAILED


def test_backoff_is_exponential_and_capped(tmp_path):
    dest = make_settings(
        tmp_path,
        [{"name": "p", "ae_title": "P", "host": "127.0.0.1", "port": 1, "retry_initial_s": 5, "retry_max_s": 3600}],
    ).destinations[0]
    assert [backoff_s(dest, n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_s(dest, 30) == 3600


def test_out_of_resources_is_retried(ct, tmp_path):
    scp = StoreSCP([SEG_SOP, SR_SOP, KOS_SOP], statuses=[0xA700]).start()
    try:
        settings = make_settings(
            tmp_path, [{"name": "pacs", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}]
        )
        paths = results(ct, tmp_path)
        ids = enqueue(settings, paths, ["pacs"])
        first = deliver(ids[0], settings)
        assert first["retry"] == 1 and first["delivered"] == len(paths) - 1
        assert run_until_settled(settings)
        assert {r.state for r in rows(settings)} == {DELIVERED}
        assert scp.answers[0] == 0xA700
        assert sorted(scp.received) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
        assert max(r.attempts for r in rows(settings)) == 2
    finally:
        scp.stop()


def test_refused_sop_class_fails_for_good_and_others_are_served(ct, tmp_path):
    picky = StoreSCP([CTImageStorage], aet="PICKY").start()  # accepts no result SOP class
    good = StoreSCP([SEG_SOP, SR_SOP, KOS_SOP], aet="GOOD").start()
    try:
        settings = make_settings(
            tmp_path,
            [
                {"name": "picky", "ae_title": "PICKY", "host": "127.0.0.1", "port": picky.port},
                {"name": "good", "ae_title": "GOOD", "host": "127.0.0.1", "port": good.port},
            ],
        )
        paths = results(ct, tmp_path)
        enqueue(settings, paths, ["picky", "good"])
        assert run_until_settled(settings)
        by_dest = {}
        for r in rows(settings):
            by_dest.setdefault(r.destination, set()).add(r.state)
        assert by_dest == {"picky": {FAILED}, "good": {DELIVERED}}
        assert all("does not accept SOP class" in r.reason for r in rows(settings) if r.destination == "picky")
        assert len(good.received) == len(paths)
        with session_scope(init_db(settings.database.url)) as session:
            summary = status_summary(session)
        assert summary["destinations"]["picky"]["failed"] == len(paths)
        assert summary["destinations"]["good"]["delivered"] == len(paths)
    finally:
        picky.stop()
        good.stop()


def test_down_destination_waits_without_blocking_others(ct, tmp_path):
    good = StoreSCP([SEG_SOP, SR_SOP, KOS_SOP], aet="GOOD").start()
    down = StoreSCP([SEG_SOP, SR_SOP, KOS_SOP], aet="LATER")  # not started yet: port closed
    try:
        settings = make_settings(
            tmp_path,
            [
                {"name": "later", "ae_title": "LATER", "host": "127.0.0.1", "port": down.port},
                {"name": "good", "ae_title": "GOOD", "host": "127.0.0.1", "port": good.port},
            ],
        )
        paths = results(ct, tmp_path)
        enqueue(settings, paths, ["later", "good"])
        deliver_due(settings)
        states = {(r.destination, r.state) for r in rows(settings)}
        assert states == {("later", PENDING), ("good", DELIVERED)}
        with session_scope(init_db(settings.database.url)) as session:
            summary = status_summary(session)["destinations"]["later"]
        assert summary["pending"] == len(paths) and summary["consecutive_failures"] >= 1
        assert "LATER@127.0.0.1" in summary["last_error"]
        down.start()
        assert run_until_settled(settings)
        assert {r.state for r in rows(settings)} == {DELIVERED}
        assert sorted(down.received) == sorted(good.received)
    finally:
        good.stop()
        down.stop()


def test_capability_profile_filters_per_destination(ct, tmp_path):
    scp = StoreSCP([SEG_SOP, SR_SOP, KOS_SOP, "1.2.840.10008.5.1.4.1.1.11.1"], aet="OLD").start()
    try:
        old = {"seg": False, "sr": False, "kos": False, "gsps": True}
        settings = make_settings(
            tmp_path, [{"name": "old", "ae_title": "OLD", "host": "127.0.0.1", "port": scp.port, "capabilities": old}]
        )
        paths = results(ct, tmp_path, [CapabilityProfile(), CapabilityProfile(**old)])
        enqueue(settings, paths, ["old"])
        assert run_until_settled(settings)
        assert {r.kind for r in rows(settings)} == {"gsps"}
        assert len(scp.received) == 1
    finally:
        scp.stop()


def test_enqueue_is_idempotent(ct, tmp_path):
    scp = StoreSCP([SEG_SOP, SR_SOP, KOS_SOP], aet="P").start()
    try:
        settings = make_settings(tmp_path, [{"name": "p", "ae_title": "P", "host": "127.0.0.1", "port": scp.port}])
        paths = results(ct, tmp_path)
        first = enqueue(settings, paths, ["p"])
        assert run_until_settled(settings)
        again = enqueue(settings, paths, ["p"], job_id=2)  # a re-run writes the same UIDs
        assert first == again
        assert run_until_settled(settings)
        assert len(scp.received) == len(paths)  # delivered once
    finally:
        scp.stop()


def failed_sop_body(failed_uid: str, stored_uids: list[str]) -> dict:
    """A STOW-RS response (PS3.18 10.5.3): one instance in the Failed SOP Sequence (reason 0xA700)."""
    ref = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in stored_uids]
    failed = [{"00081155": {"vr": "UI", "Value": [failed_uid]}, "00081197": {"vr": "US", "Value": [0xA700]}}]
    return {"00081199": {"vr": "SQ", "Value": ref}, "00081198": {"vr": "SQ", "Value": failed}}


@pytest.mark.parametrize("answer,state", [(503, PENDING), (429, PENDING), (415, FAILED)])
def test_stow_rs_status_classes(ct, tmp_path, answer, state):
    server = StowServer(answer=answer)
    try:
        settings = make_settings(
            tmp_path, [{"name": "web", "type": "dicomweb", "url": server.url, "retry_initial_s": 60}]
        )
        paths = results(ct, tmp_path)
        ids = enqueue(settings, paths, ["web"])
        deliver(ids[0], settings)
        assert {r.state for r in rows(settings)} == {state}
        assert len(server.bodies) == 1  # the outbox retries, not the client
    finally:
        server.stop()


@pytest.mark.parametrize("answer", [202, 409])
def test_stow_rs_failed_sop_sequence_fails_only_those_instances(ct, tmp_path, answer):
    paths = results(ct, tmp_path)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    server = StowServer(answer=answer, body=failed_sop_body(uids[0], uids[1:]))
    try:
        settings = make_settings(tmp_path, [{"name": "web", "type": "dicomweb", "url": server.url}])
        enqueue(settings, paths, ["web"])
        assert run_until_settled(settings)
        by_uid = {r.sop_instance_uid: r for r in rows(settings)}
        assert by_uid[uids[0]].state == FAILED
        assert by_uid[uids[0]].reason == "STOW-RS refused the instance: failure reason 0xA700"
        assert {by_uid[u].state for u in uids[1:]} == {DELIVERED}
    finally:
        server.stop()
