"""No patient data in the logs, and no secrets in an embedded job's environment (issue 19, item 5).

Studies whose Patient Name has no caret (which many modalities send), is multi-byte (ISO_IR 192)
or carries CR/LF go through every path: the receiver, an analysis that writes DICOM results with
highdicom (whose person-name check quotes a caret-less name in a warning) in the embedded worker
and in a Celery worker, and the delivery of the results to a PACS (Orthanc). Every log the node
and the worker wrote (node.log with the receivers' and the job children's lines, the worker's
log, the audit trail) is then searched for the names, the IDs and a forged line.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from tests.helpers import NodeProcess, outside_patient_objects, wait_for
from tests.jobs.conftest import RedisServer, Worker
from tests.results.peers import Orthanc
from workers.synthetic import phantoms

pytestmark = pytest.mark.slow

# Caret-less and multi-byte: "Wang Xiaoming" as a Chinese modality sends it.
MULTIBYTE_NAME = "王小明"
# Caret-less (so highdicom quotes it) and with CR/LF: a line that would look like the node's own.
FORGING_NAME = "Kowalczyk Zofia\r\nFAKE 00:00:00 ainode ERROR forged line"  # PN: 64 at most
FORGED_LINE_START = "FAKE"


def storescu(port: int, aec: str, files: list[Path]) -> None:
    """Push files with DCMTK storescu."""
    subprocess.run(
        ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )


def ct_study(folder: Path, patient_name: str, patient_id: str, charset: str) -> tuple[str, list[Path]]:
    """A small phantom CT (enough for ct-segmentation) with this patient; (study UID, files)."""
    phantom = phantoms.make_ct_phantom(7, shape=(24, 48, 48), spacing=(8.0, 8.0, 8.0))
    files = phantoms.write_ct_series(phantom, folder, patient_id=patient_id)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient_name
        ds.save_as(path, enforce_file_format=True)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def result_modalities(orthanc: Orthanc, study_uid: str) -> set[str]:
    """The modalities of the study's series in Orthanc."""
    found = set()
    for study in orthanc.get_json("/studies"):
        info = orthanc.get_json(f"/studies/{study}")
        if info["MainDicomTags"]["StudyInstanceUID"] == study_uid:
            for series in info["Series"]:
                found.add(orthanc.get_json(f"/series/{series}")["MainDicomTags"]["Modality"])
    return found


def node_config(orthanc: Orthanc, broker_url: str = "") -> dict:
    return {
        "broker": {"url": broker_url},
        "destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "rules": [
            {"name": "ct-seg", "match": {"modality": "CT"}, "analyses": ["ct-segmentation"], "destinations": ["pacs"]}
        ],
        "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        "jobs": {"reconcile_interval_s": 1},
    }


def leaks(folder: Path, needles: list[str]) -> list[str]:
    """What of the needles (or a line starting with FAKE) the logs under folder hold, per file."""
    found = []
    for path in sorted(folder.rglob("*.log")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if path.name == "audit.log":
            # The audit trail is the protected record of whose data was handled: it names the
            # patient in the Patient participant objects PS3.15 asks for, and nowhere else.
            text = outside_patient_objects(text)
        for needle in needles:
            # Also as mis-decoded Latin-1 (mojibake), in case a library decodes the bytes wrongly.
            forms = {needle, needle.encode("utf-8").decode("latin-1")}
            if any(form in text for form in forms):
                found.append(f"{path.name}: {needle!r}")
        if "\r" in text:
            found.append(f"{path.name}: a carriage return")
        if any(line.startswith(FORGED_LINE_START) for line in re.split(r"[\r\n]", text)):
            found.append(f"{path.name}: a forged line")
    return found


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    yield server
    server.stop()


def run_study(node: NodeProcess, orthanc: Orthanc, study_uid: str, files: list[Path], logs: Path) -> None:
    """Push the study to the node and wait until its SEG and SR are in the PACS."""
    storescu(node.port, node.ae_title, files)
    arrived = wait_for(lambda: {"SEG", "SR"} <= result_modalities(orthanc, study_uid), timeout=900, interval=1.0)
    assert arrived, "\n".join(p.read_text(errors="replace")[-3000:] for p in logs.rglob("*.log"))


def test_embedded_worker_logs_no_patient_data(tmp_path, orthanc):
    """Receiver, embedded job child and the node's dispatcher: one study, both kinds of name."""
    logs = tmp_path / "node"
    node = NodeProcess(logs, node_config(orthanc))
    study_a, files_a = ct_study(tmp_path / "a", MULTIBYTE_NAME, "PIDQ7X4Z9A", "ISO_IR 192")
    study_b, files_b = ct_study(tmp_path / "b", FORGING_NAME, "PIDQ7X4Z9B", "ISO_IR 100")
    with node:
        run_study(node, orthanc, study_a, files_a, logs)
        run_study(node, orthanc, study_b, files_b, logs)
    assert "job 1 succeeded" in node.log_text()  # the job child's own lines reach node.log
    assert leaks(logs, [MULTIBYTE_NAME, "Kowalczyk", "Zofia", "forged line", "PIDQ7X4Z9"]) == []


def test_celery_worker_logs_no_patient_data(tmp_path, orthanc, redis):
    """Receiver, a Celery worker's analysis and its delivery task."""
    logs = tmp_path / "node"
    node = NodeProcess(logs, node_config(orthanc, redis.url))
    study, files = ct_study(tmp_path / "c", FORGING_NAME + " " + MULTIBYTE_NAME, "PIDQ7X4Z9C", "ISO_IR 192")
    with node:
        worker = Worker(node.config_path)
        try:
            run_study(node, orthanc, study, files, logs)
        finally:
            worker.stop()
    assert "succeeded" in worker.output()
    assert leaks(logs, [MULTIBYTE_NAME, "Kowalczyk", "Zofia", "forged line", "PIDQ7X4Z9"]) == []


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` and whose command line runs an embedded job."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"workers.tasks" in cmdline:
            found.append(int(entry))
    return found


def test_embedded_job_environment_holds_no_secret(tmp_path):
    """The settings reach the job child without its environment: /proc/PID/environ holds no secret."""
    token, password = "tok-3b9d1f-not-in-env", "stow-7c2e8a-not-in-env"
    record = tmp_path / "record.txt"
    node = NodeProcess(
        tmp_path / "node",
        {
            "destinations": [
                {"name": "web", "type": "dicomweb", "url": "http://127.0.0.1:9/dicom-web", "password": password}
            ],
            "rules": [
                {
                    "name": "sleep",
                    "match": {"modality": "CT"},
                    "analyses": [{"name": "sleep", "params": {"seconds": 3, "record": str(record)}}],
                }
            ],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 1},
        },
        env={"AINODE_API__TOKEN": token},  # the operator's way to keep the token out of the file
    )
    _, files = ct_study(tmp_path / "ct", "Env^Test", "ENV0001", "ISO_IR 100")
    with node:
        storescu(node.port, node.ae_title, files[:2])
        assert wait_for(lambda: child_pids(node.proc.pid), timeout=120, interval=0.05), node.log_text()[-3000:]
        environ = Path(f"/proc/{child_pids(node.proc.pid)[0]}/environ").read_bytes()
        # The child read its settings and ran the job.
        assert wait_for(record.exists, timeout=300), node.log_text()[-3000:]
    assert token.encode() not in environ
    assert password.encode() not in environ
    assert b"AINODE_" not in environ
