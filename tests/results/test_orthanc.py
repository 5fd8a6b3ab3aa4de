"""Delivery to a real PACS (Orthanc): results land in the source study, decode, survive outages."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading

import highdicom as hd
import numpy as np
import pydicom

from node.core.settings import CapabilityProfile
from node.dispatch.outbox import DELIVERED, deliver_due
from tests.helpers import wait_for
from tests.results.peers import Orthanc
from tests.results.synthetic import detection_findings, segmentation_findings, volume_of, write_ct_series
from tests.results.test_dispatcher import enqueue, make_settings, rows, run_until_settled
from workers.results import ResultContext, write_results


def push_with_storescu(orthanc: Orthanc, folder) -> None:
    """The modality's images reach the PACS first (as they would in the hospital)."""
    subprocess.run(
        ["storescu", "-aec", orthanc.aet, "+sd", "127.0.0.1", str(orthanc.dicom_port), str(folder)],
        check=True,
        capture_output=True,
    )


def orthanc_destination(orthanc: Orthanc, **extra) -> dict:
    return {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, **extra}


def test_results_arrive_in_the_source_study_and_the_seg_decodes(tmp_path, orthanc):
    paths, hu, ids = write_ct_series(tmp_path / "ct", shape=(16, 64, 64))
    volume = volume_of(paths, hu, ids)
    push_with_storescu(orthanc, tmp_path / "ct")
    settings = make_settings(tmp_path, [orthanc_destination(orthanc)])
    outputs = write_results(segmentation_findings(volume), ResultContext(job_key="e2e", output_dir=tmp_path / "out"))
    enqueue(settings, outputs, ["pacs"])
    assert run_until_settled(settings)
    assert {r.state for r in rows(settings)} == {DELIVERED}

    studies = orthanc.get_json("/studies")
    assert len(studies) == 1  # the results joined the source study
    study = orthanc.get_json(f"/studies/{studies[0]}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == ids["study"]
    modalities = sorted(orthanc.get_json(f"/series/{s}")["MainDicomTags"].get("Modality") for s in study["Series"])
    assert modalities == ["CT", "KO", "SEG", "SR"]

    seg_series = next(
        s for s in study["Series"] if orthanc.get_json(f"/series/{s}")["MainDicomTags"]["Modality"] == "SEG"
    )
    seg_instance = orthanc.get_json(f"/series/{seg_series}")["Instances"][0]
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(orthanc.instance_file(seg_instance))))
    decoded = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[f.sop_instance_uid for f in volume.sources],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )[..., 0].astype(bool)
    truth = ids["organ"]
    dice = 2 * np.logical_and(decoded, truth).sum() / (decoded.sum() + truth.sum())
    print(f"SEG fetched back from Orthanc: Dice vs phantom ground truth = {dice:.4f}")
    assert dice > 0.99


def test_orthanc_killed_during_delivery_then_everything_arrives_once(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        paths, hu, ids = write_ct_series(tmp_path / "ct", shape=(80, 96, 96))
        volume = volume_of(paths, hu, ids)
        # Derived series + overlays: many objects, so the PACS dies in the middle of the batch.
        profiles = [CapabilityProfile(secondary_capture=True)]
        outputs = write_results(
            detection_findings(volume),
            ResultContext(job_key="outage", output_dir=tmp_path / "out", destinations=profiles),
        )
        outputs += write_results(
            segmentation_findings(volume),
            ResultContext(job_key="outage", output_dir=tmp_path / "out2", destinations=profiles),
        )
        settings = make_settings(tmp_path, [orthanc_destination(pacs, capabilities={"secondary_capture": True})])
        enqueue(settings, outputs, ["pacs"])

        sender = threading.Thread(target=deliver_due, args=(settings,))
        sender.start()
        assert wait_for(lambda: len(pacs.instances()) >= 1, timeout=120, interval=0.02)
        os.kill(pacs.proc.pid, signal.SIGKILL)  # the PACS dies mid-association
        pacs.proc.wait()
        sender.join()
        waiting = [r for r in rows(settings) if r.state != DELIVERED]
        assert waiting, "the PACS was killed after the whole batch: the outage was not exercised"
        assert all(r.last_status in ("link", "no-response", "not-sent") for r in waiting)

        pacs.start()  # same storage, same ports: the PACS is back
        assert run_until_settled(settings, timeout=300)
        assert {r.state for r in rows(settings)} == {DELIVERED}
        stored = {pacs.instance_tags(i)["SOPInstanceUID"] for i in pacs.instances()}
        expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in outputs}
        assert expected <= stored and len(pacs.instances()) == len(expected)
    finally:
        pacs.stop()


def test_storage_commitment_with_orthanc(tmp_path, ct):
    """N-ACTION to Orthanc; its N-EVENT-REPORT arrives on a new association and is recorded."""
    from pynetdicom import AE

    from node.core.dicom import STORAGE_COMMITMENT_PUSH
    from node.dispatch.commitment import commitment_handlers
    from tests.helpers import free_port

    listener_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", modalities={"ainode": ("AINODE", listener_port)}).start()
    try:
        settings = make_settings(tmp_path, [orthanc_destination(pacs, storage_commitment=True)])
        # Our listener's part: accept the report (the requestor plays the SCP role here).
        ae = AE(ae_title="AINODE")
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        server = ae.start_server(("127.0.0.1", listener_port), block=False, evt_handlers=commitment_handlers(settings))
        try:
            volume, _ = ct
            outputs = write_results(
                segmentation_findings(volume), ResultContext(job_key="commit", output_dir=tmp_path / "out")
            )
            enqueue(settings, outputs, ["pacs"])
            assert run_until_settled(settings)
            assert wait_for(lambda: {r.commitment for r in rows(settings)} == {"committed"}, timeout=60)
            assert len({r.transaction_uid for r in rows(settings)}) == 1
        finally:
            server.shutdown()
    finally:
        pacs.stop()


def test_storage_commitment_report_is_received_by_ainode_serve(tmp_path, ct):
    """The N-EVENT-REPORT that Orthanc sends on a new association reaches the running node."""
    from tests.helpers import NodeProcess

    node_dir = tmp_path / "node"
    node_dir.mkdir()
    placeholder = NodeProcess(node_dir)  # only to learn the port the node will listen on
    pacs = Orthanc(tmp_path / "orthanc", modalities={"ainode": ("AINODE", placeholder.port)}).start()
    try:
        settings = make_settings(tmp_path, [orthanc_destination(pacs, storage_commitment=True)])
        overrides = {
            "node": {"port": placeholder.port},
            "database": {"url": settings.database.url},
            "peers": [{"ae_title": pacs.aet, "hosts": ["127.0.0.1"]}],
            "destinations": [orthanc_destination(pacs, storage_commitment=True)],
        }
        with NodeProcess(node_dir, overrides):
            volume, _ = ct
            outputs = write_results(
                segmentation_findings(volume), ResultContext(job_key="commit-serve", output_dir=tmp_path / "out")
            )
            enqueue(settings, outputs, ["pacs"])
            assert run_until_settled(settings)
            assert wait_for(lambda: {r.commitment for r in rows(settings)} == {"committed"}, timeout=60)
    finally:
        pacs.stop()
