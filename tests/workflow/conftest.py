"""Fixtures of the workflow area: Orthanc as the PACS holding a study the node has never seen."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.core.db import init_db
from node.core.settings import Settings
from tests.helpers import free_port
from tests.results.peers import Orthanc
from tests.results.synthetic import write_ct_series


def push_to_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    """The modality's images reach the PACS only (DCMTK storescu), never the node."""
    subprocess.run(
        ["/usr/bin/storescu", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
        check=True,
        capture_output=True,
    )


def source_of(orthanc: Orthanc, method: str = "c-move", name: str = "orthanc") -> dict:
    """The node's ``sources`` entry naming this Orthanc."""
    return {
        "name": name,
        "method": method,
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "timeout_s": 120,
    }


@pytest.fixture
def node_port() -> int:
    """The DICOM port the node will listen on (Orthanc must know it for C-MOVE)."""
    return free_port()


@pytest.fixture
def pacs(tmp_path, node_port):
    """Orthanc knowing the node (AINODE at node_port) as a modality; stopped at the end."""
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"ainode": ("AINODE", node_port)}).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def study_in_pacs(tmp_path, pacs) -> tuple[str, list[str]]:
    """A 12-slice CT study pushed to Orthanc only: (Study Instance UID, SOP Instance UIDs)."""
    paths, _, _ = write_ct_series(tmp_path / "ct")
    push_to_orthanc(pacs, paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return str(headers[0].StudyInstanceUID), sorted(str(h.SOPInstanceUID) for h in headers)


def copy_as_other_study(paths: list[Path], folder: Path, study_date: str) -> tuple[str, list[Path]]:
    """The same patient's series again as another study on ``study_date`` (new UIDs throughout)."""
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study_uid, series_uid, study_date
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name)
        out.append(folder / path.name)
    return study_uid, out


@pytest.fixture
def priors_in_pacs(tmp_path, pacs, study_in_pacs) -> tuple[str, str]:
    """Two more studies of the same patient in Orthanc: (an earlier one, a later one)."""
    paths = sorted((tmp_path / "ct").iterdir())
    date = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyDate
    earlier, files = copy_as_other_study(paths, tmp_path / "earlier", str(int(date) - 10000))
    push_to_orthanc(pacs, files)
    later, files = copy_as_other_study(paths, tmp_path / "later", str(int(date) + 10000))
    push_to_orthanc(pacs, files)
    return earlier, later


def local_settings(tmp_path: Path, sources: list[dict], node_port: int = 11112) -> Settings:
    """Settings of a node whose store and index live under tmp_path (schema created)."""
    settings = Settings.model_validate(
        {
            "node": {"ae_title": "AINODE", "port": node_port, "acse_timeout_s": 5},
            "storage": {"path": str(tmp_path / "store"), "min_free_bytes": "16MiB"},
            "database": {"url": f"sqlite:///{tmp_path}/ainode.db"},
            "audit": {"path": str(tmp_path / "audit.log")},
            "sources": sources,
        }
    )
    init_db(settings.database.url)
    return settings
