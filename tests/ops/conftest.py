"""Fixtures of the ops tests: a running node with a token, a small CT study, HTTP helpers."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.helpers import TEST_PEERS, NodeProcess, free_port, wait_for

TOKEN = "s3cret-ops-token"
RULES = [{"name": "ct-count", "match": {"modality": "CT"}, "analyses": ["count-instances"]}]


def make_ct_study(folder: Path, n: int = 5) -> str:
    """A small synthetic CT series written to folder; returns its Study Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.Modality, ds.InstanceNumber = "Ops^Patient", "OPS0001", "CT", i + 1
        ds.StudyDescription, ds.SliceThickness = "CT OPS", 1.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(i)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((16, 16), i * 10, dtype=np.uint16).tobytes()
        pydicom.dcmwrite(folder / f"{i:03d}.dcm", ds, enforce_file_format=True)
    return study_uid


def storescu(node: NodeProcess, folder: Path, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    """Push a folder with DCMTK storescu."""
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
        capture_output=True,
        text=True,
    )


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (openssl CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "api.crt", folder / "api.key"
    subprocess.run(
        ["/usr/bin/openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


class Client:
    """A tiny HTTP client for the node's API (urllib: what an operator's script would use)."""

    def __init__(self, port: int, token: str | None = TOKEN):
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(
        self, method: str, path: str, token: str | None = "default", headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        token = self.token if token == "default" else token
        req = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None, headers=headers or {}
        )
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                status = r.status
                ctype = r.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            body, status, ctype = err.read(), err.code, err.headers.get("content-type", "")
        if "json" in ctype:
            return status, json.loads(body)
        return status, body

    def get(self, path: str, **kw: Any) -> Any:
        status, body = self.call("GET", path, **kw)
        assert status == 200, (path, status, body)
        return body

    def post(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.call("POST", path, **kw)

    def up(self) -> bool:
        try:
            return self.call("GET", "/api/health")[0] == 200
        except OSError:
            return False


def node_with_api(workdir: Path, overrides: dict | None = None) -> NodeProcess:
    """A node with a token, the count-instances rule, short timers and a destination to itself."""
    node = NodeProcess(
        workdir,
        {
            "api": {"token": TOKEN},
            "rules": RULES,
            "timers": {"series_quiet_s": 1, "study_quiet_s": 1},
            "peers": [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in TEST_PEERS + ["AINODE"]],
            **(overrides or {}),
        },
    )
    return node


@pytest.fixture
def running_node(tmp_path: Path):
    """A started node whose API answers, with its client."""
    node = node_with_api(tmp_path / "node")
    # A destination pointing at the node itself lets the C-ECHO action be tested against a real SCP.
    node.config["destinations"] = [
        {"name": "self", "ae_title": "AINODE", "host": "127.0.0.1", "port": node.port},
        {"name": "nowhere", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
    ]
    import yaml

    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    with node:
        client = Client(node.config["api"]["port"])
        assert wait_for(client.up, 120), node.log_text()[-3000:]
        yield node, client


def audit_text(node: NodeProcess) -> str:
    """The node's audit file so far."""
    path = Path(node.config["audit"]["path"])
    return path.read_text() if path.exists() else ""


def wait_phase(client: Client, study_uid: str, phases: tuple[str, ...], timeout: float = 180) -> dict:
    """Poll the study until its phase is one of ``phases``; return the view."""
    seen: dict = {}

    def check() -> bool:
        status, body = client.call("GET", f"/api/studies/{study_uid}")
        if status == 200:
            seen.update(body)
            return body["phase"] in phases
        return False

    assert wait_for(check, timeout, 0.5), seen
    time.sleep(0)
    return seen
