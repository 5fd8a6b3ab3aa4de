"""Issue 14, items 4-6, against the node as deployed (`ainode serve`, embedded worker), DCMTK
storescu and Orthanc: errors a hospital can act on, the node's own results coming back, a late
series, a corrected re-send, and the dashboard's window and values.

The models are fixtures plugged in the way a hospital plugs in its own (TorchScript with fixed
weights); the images are real files nobody here wrote (pydicom's test files) or phantoms.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.helpers import NodeProcess, wait_for
from tests.jobs.test_model_path import threshold_node
from tests.jobs.test_node_end_to_end import make_ct_study, query
from tests.results.peers import Orthanc
from tests.results.synthetic import segmentation_findings
from workers.analysis.imaging import load_series
from workers.results import ResultContext, write_results
from workers.synthetic import phantoms

pytestmark = pytest.mark.slow

STORESCU = "/usr/bin/storescu"


class Constant(torch.nn.Module):
    """One logit of 1.0 per image: probability sigmoid(1) = 0.731."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 0.0 + 1.0


def storescu(port: int, files: list[Path], aec: str = "AINODE") -> subprocess.CompletedProcess:
    # -R: propose the files' own SOP classes (SEG, SR, KOS are not in storescu's default list).
    return subprocess.run(
        [STORESCU, "-R", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


def jobs_of(node: NodeProcess, study_uid: str) -> list[tuple]:
    return query(
        node,
        "SELECT id, state, attempts, error, result, supersedes_job_id FROM jobs WHERE study_uid = :u ORDER BY id",
        u=study_uid,
    )


def finished(node: NodeProcess, study_uid: str, count: int = 1) -> bool:
    jobs = jobs_of(node, study_uid)
    return len(jobs) >= count and all(j[1] in ("succeeded", "failed", "dead", "inapplicable") for j in jobs)


def api_get(node: NodeProcess, path: str) -> bytes:
    return node.api_get(path)


# --- item 4: errors ---------------------------------------------------------------------------


def test_a_job_on_invalid_input_fails_once_naming_the_sop_instance_and_the_attribute(tmp_path):
    # A real CT image (pydicom's CT_small) whose Pixel Data holds half the bytes Rows x Columns need.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    node = threshold_node(tmp_path)
    with node:
        storescu(node.port, [bad])
        uid = str(ds.StudyInstanceUID)
        assert wait_for(lambda: finished(node, uid), 300), node.log_text()[-4000:]
        [(job_id, state, attempts, error, _, _)] = jobs_of(node, uid)
        assert (state, attempts) == ("failed", 1)
        assert f"SOP Instance UID {ds.SOPInstanceUID}" in error and "Pixel Data (7FE0,0010)" in error
        [stored] = query(node, "SELECT path FROM instances")
        assert Path(stored[0]).name not in error  # not the storage's hashed file name
        shown = json.loads(api_get(node, f"/api/jobs/{job_id}"))
        assert shown["error"] == error and shown["state"] == "failed"
        log = node.log_text()
        assert "attempt 1 failed" not in log  # not retried
        assert str(ds.PatientName) not in log and str(ds.PatientID) not in log


# --- item 5: PACS behaviour -------------------------------------------------------------------


def test_the_nodes_own_results_forwarded_back_by_the_pacs_are_never_analysed(tmp_path):
    # Orthanc forwards every instance it stores to the node (a routine auto-routing rule): the
    # modality's CT, and then the node's own SEG/SR/KOS once the node delivered them.
    orthanc = Orthanc(tmp_path / "orthanc")
    lua = tmp_path / "forward.lua"
    lua.write_text("function OnStoredInstance(id, tags, metadata, origin)\n  SendToModality(id, 'ainode')\nend\n")
    node = threshold_node(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        rules=[
            {
                "name": "ct-threshold",
                "match": {"modality": "CT"},
                "analyses": ["threshold-test"],
                "destinations": ["pacs"],
            }
        ],
    )
    orthanc.modalities = {"ainode": (node.ae_title, node.port)}
    orthanc.extra_config = {"LuaScripts": [str(lua)]}
    series = tmp_path / "series"
    phantoms.write_ct_series(phantoms.make_ct_phantom(3, shape=(16, 32, 32)), series)
    files = sorted(series.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc.start()
    try:
        with node:
            storescu(orthanc.dicom_port, files, aec=orthanc.aet)
            assert wait_for(lambda: finished(node, study_uid), 300), node.log_text()[-4000:]
            [(job_id, state, *_)] = jobs_of(node, study_uid)
            assert state == "succeeded"
            # The results reach Orthanc and come back: their series are indexed as the node's output.
            assert wait_for(
                lambda: query(node, "SELECT count(*) FROM series WHERE state = 'node-output'")[0][0] >= 3, 120
            ), node.log_text()[-4000:]
            modalities = {m for (m,) in query(node, "SELECT modality FROM series WHERE state = 'node-output'")}
            assert {"SEG", "SR", "KO"} <= modalities
            # Long enough for the quiet timers to fire several times over.
            time.sleep(6)
            assert [j[0] for j in jobs_of(node, study_uid)] == [job_id]
            assert query(node, "SELECT state FROM studies WHERE study_uid = :u", u=study_uid) == [("done",)]
            deliveries = query(node, "SELECT count(*) FROM deliveries")[0][0]

            # A result of the node sent straight back by storescu (new UIDs: another job's output).
            written = write_results(
                phantom_findings(files), ResultContext(job_key="sent-directly", output_dir=tmp_path / "direct")
            )
            storescu(node.port, [w.path for w in written])
            assert wait_for(
                lambda: (
                    query(
                        node,
                        "SELECT count(*) FROM instances i JOIN series s ON i.series_pk = s.id "
                        "WHERE s.state = 'node-output'",
                    )[0][0]
                    >= 6
                ),
                60,
            )
            time.sleep(6)
            assert [j[0] for j in jobs_of(node, study_uid)] == [job_id]
            assert query(node, "SELECT count(*) FROM deliveries")[0][0] == deliveries
            assert "made by this node" in node.log_text()
    finally:
        orthanc.stop()


def phantom_findings(files: list[Path]):
    """Findings of a segmentation on the phantom (the writers' input), for a direct send."""
    return segmentation_findings(load_series(files))


def test_a_late_series_is_analysed_whole_after_its_own_quiet_time(tmp_path):
    # The study completes, then stays done past force_complete_s; a second series arrives one
    # instance at a time. Counting force-complete from the first arrival made the reopened study
    # ready on the late series' first instance.
    node = NodeProcess(
        tmp_path / "node",
        {
            "rules": [{"name": "ct-count", "match": {"modality": "CT"}, "analyses": ["count-instances"]}],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 3, "force_complete_s": 10},
        },
    )
    first = make_ct_study(tmp_path / "first", 3)
    study_uid = first[0].StudyInstanceUID
    late = tmp_path / "late"
    late.mkdir()
    late_series = generate_uid()
    for i, ds in enumerate(make_ct_study(tmp_path / "late-src", 4)):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, late_series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = first[0].PatientName, first[0].PatientID
        ds.save_as(late / f"{i:03d}.dcm", enforce_file_format=True)
    with node:
        started = time.monotonic()
        storescu(node.port, sorted((tmp_path / "first").glob("*.dcm")))
        assert wait_for(lambda: finished(node, study_uid), 180), node.log_text()[-4000:]
        # Past force_complete_s since the first arrival.
        time.sleep(max(0.0, 11 - (time.monotonic() - started)))
        for path in sorted(late.glob("*.dcm")):
            storescu(node.port, [path])
            time.sleep(0.7)
        assert wait_for(lambda: finished(node, study_uid, 2), 180), node.log_text()[-4000:]
        time.sleep(4)  # anything the reopening would still start
        jobs = jobs_of(node, study_uid)
        assert len(jobs) == 2, jobs  # one job for the late series, made once it was complete
        summary = json.loads(jobs[1][4])
        assert summary == {"instances": 7, "series": 2}
        assert jobs[1][5] == jobs[0][0]  # it supersedes the first
        [(reason,)] = query(node, "SELECT ready_reason FROM studies WHERE study_uid = :u", u=study_uid)
        assert reason == "quiet-timer"


def test_a_corrected_re_send_replaces_the_copy_and_the_results_carry_the_corrected_name(tmp_path):
    series = tmp_path / "series"
    phantoms.write_ct_series(phantoms.make_ct_phantom(5, shape=(16, 32, 32)), series, patient_name="Wrong^Name")
    files = sorted(series.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = threshold_node(tmp_path)
    with node:
        storescu(node.port, files)
        assert wait_for(lambda: finished(node, study_uid), 300), node.log_text()[-4000:]
        # The RIS corrects the name; the modality sends the study again with the same UIDs.
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PatientName = "Right^Name"
            ds.save_as(path)
        answer = storescu(node.port, files)
        assert "Warning" not in answer.stdout + answer.stderr  # not "first copy kept" (B006)
        assert wait_for(lambda: finished(node, study_uid, 2), 300), node.log_text()[-4000:]
        jobs = jobs_of(node, study_uid)
        assert [j[1] for j in jobs] == ["succeeded", "succeeded"] and jobs[1][5] == jobs[0][0]
        outputs = [Path(p) for p in json.loads(jobs[1][4])["outputs"]]
        assert outputs
        first = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in json.loads(jobs[0][4])["outputs"]}
        # Changed content gets new UIDs: the PACS keeps both, the corrected ones are new objects.
        assert first.isdisjoint(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in outputs)
        for path in outputs:
            assert str(pydicom.dcmread(path, stop_before_pixels=True).PatientName) == "Right^Name", path.name
        assert query(node, "SELECT name FROM patients") == [("Right^Name",)]
        stored = [Path(node.storage) / p for (p,) in query(node, "SELECT path FROM instances")]
        assert len(stored) == len(files)
        assert all(str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) == "Right^Name" for p in stored)
        assert wait_for(lambda: "Patient Record" in (tmp_path / "node" / "audit.log").read_text(), 30)
    audit = (tmp_path / "node" / "audit.log").read_text()
    record = next(line for line in audit.splitlines() if "Patient Record" in line)
    assert study_uid in record and "PatientName" in record
    # The audit trail (the protected record) names the patient as now identified; the log never.
    assert "<ParticipantObjectName>Right^Name</ParticipantObjectName>" in record and "Wrong^Name" not in record
    assert "Right^Name" not in node.log_text() and "Wrong^Name" not in node.log_text()


# --- item 6: dashboard --------------------------------------------------------------------------


def test_a_radiograph_study_page_shows_its_probability_and_a_key_slice_in_its_own_window(tmp_path):
    model = tmp_path / "constant.pt"
    torch.jit.script(Constant()).save(str(model))
    node = NodeProcess(
        tmp_path / "node",
        {
            "analyses": [
                {
                    "name": "constant-test",
                    "format": "torchscript",
                    "path": str(model),
                    "task": "classification",
                    "modalities": ["CR", "DX"],
                    "labels": ["nodule"],
                    "params": {"size": [64, 64]},
                }
            ],
            "rules": [{"name": "cr", "match": {"modality": "CR"}, "analyses": ["constant-test"]}],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    # A real chest CR (MONOCHROME1, Window 15000/30000). Its missing Imager Pixel Spacing is added:
    # the SR writer's fallback for it is another part of issue 14 (item 2).
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.ImagerPixelSpacing = [0.2, 0.2]
    source = tmp_path / "rg1.dcm"
    ds.save_as(source)
    study_uid = str(ds.StudyInstanceUID)
    with node:
        storescu(node.port, [source])
        assert wait_for(lambda: finished(node, study_uid), 300), node.log_text()[-4000:]
        study = json.loads(api_get(node, f"/api/studies/{study_uid}"))
        [job] = study["jobs"]
        assert job["state"] == "succeeded", job["error"]
        [finding] = job["findings"]["classifications"]
        assert abs(finding["probability"] - 0.7311) < 1e-3 and finding["present"] is True
        k = study["key_slices"][0]
        png = api_get(node, f"/api/studies/{study_uid}/slices/{k}.png")
        grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
        assert (grey == 255).mean() < 0.05 and grey.std() > 20
