"""The real analysis path of a job: series loaded as a volume, a configured (TorchScript) model run
through the registry, DICOM results written, outbox rows recorded for the rule's destinations.

The model here is a test fixture plugged in the way a hospital plugs in its own: a one-layer
TorchScript network with fixed weights (an intensity threshold). It is not one of the project's models.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from tests.helpers import NodeProcess, wait_for
from tests.results.peers import Orthanc
from tests.results.validators import dciodvfy_errors

pytestmark = pytest.mark.slow


class Threshold(torch.nn.Module):
    """Two-class logits from a 1x1x1 convolution: voxels above the window's middle are foreground."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([10.0, -10.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def threshold_node(tmp_path: Path, **extra) -> NodeProcess:
    """A node running the Threshold TorchScript model on CT; ``extra`` replaces config sections."""
    model = tmp_path / "threshold.pt"
    torch.jit.script(Threshold()).save(str(model))
    config = {
        "analyses": [
            {
                "name": "threshold-test",
                "format": "torchscript",
                "path": str(model),
                "task": "segmentation",
                "modalities": ["CT"],
                "labels": ["liver"],
                "params": {"window": [-200, 200], "output": "softmax", "roi_size": [16, 32, 32]},
            }
        ],
        "rules": [{"name": "ct-threshold", "match": {"modality": "CT"}, "analyses": ["threshold-test"]}],
        "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
    }
    config.update(extra)
    return NodeProcess(tmp_path / "node", config)


def test_job_runs_a_configured_model_and_records_results_for_delivery(tmp_path):
    from workers.synthetic import phantoms

    model = tmp_path / "threshold.pt"
    torch.jit.script(Threshold()).save(str(model))
    series = tmp_path / "series"
    phantoms.write_ct_series(phantoms.make_ct_phantom(7, shape=(16, 32, 32)), series)
    node = NodeProcess(
        tmp_path / "node",
        {
            "analyses": [
                {
                    "name": "threshold-test",
                    "format": "torchscript",
                    "path": str(model),
                    "task": "segmentation",
                    "modalities": ["CT"],
                    "labels": ["liver"],
                    "params": {"window": [-200, 200], "output": "softmax", "roi_size": [16, 32, 32]},
                }
            ],
            "destinations": [{"name": "pacs", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}],
            "rules": [
                {
                    "name": "ct-threshold",
                    "match": {"modality": "CT"},
                    "analyses": ["threshold-test"],
                    "destinations": ["pacs"],
                }
            ],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    with node:
        files = sorted(str(p) for p in series.glob("*.dcm"))
        subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
            check=True,
            capture_output=True,
            timeout=300,
        )
        engine = create_engine(node.database_url)

        def job():
            with engine.connect() as conn:
                return conn.execute(text("SELECT id, state, error, result FROM jobs")).first()

        assert wait_for(lambda: job() is not None and job()[1] in ("succeeded", "failed", "dead"), 300), (
            node.log_text()[-4000:]
        )
        job_id, state, error, result = job()
        assert state == "succeeded", error
        outputs = [Path(p) for p in json.loads(result)["outputs"]]
        assert outputs and all(p.exists() and p.parent.name == f"job-{job_id}" for p in outputs)
        assert any(p.name.startswith("seg-") for p in outputs)
        for path in outputs:
            assert dciodvfy_errors(path) == [], path.name
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT destination, job_id FROM deliveries")).all()
        assert rows and {r[0] for r in rows} == {"pacs"} and {str(r[1]) for r in rows} == {str(job_id)}
        engine.dispose()


def _into_study(src: str, path: Path, like: Path) -> Path:
    """A real image re-identified into the study (and patient) of ``like``, as its own series."""
    ds, ref = pydicom.dcmread(src), pydicom.dcmread(like, stop_before_pixels=True)
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = ref.StudyInstanceUID, ref.PatientID, ref.PatientName
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_study_level_job_analyses_every_series_it_accepts_and_results_reach_the_pacs(tmp_path):
    """Two CT volumes and one real single CT image in one study: both volumes are analysed and
    their results reach Orthanc; the single image is skipped as not a 3D volume, with its reason.
    A second study of two copies of a real CT image at one position ends "not applicable"."""
    from workers.synthetic import phantoms

    model = tmp_path / "threshold.pt"
    torch.jit.script(Threshold()).save(str(model))
    study_uid = generate_uid()
    volumes = {}
    for n, seed in enumerate((7, 8), start=1):
        series_uid = generate_uid()
        phantom = phantoms.make_ct_phantom(seed, shape=(16, 32, 32))
        paths = phantoms.write_ct_series(
            phantom, tmp_path / f"ct{n}", study_uid=study_uid, series_uid=series_uid, series_number=n
        )
        volumes[series_uid] = paths
    single = _into_study(get_testdata_file("CT_small.dcm"), tmp_path / "single" / "ct.dcm", paths[0])
    copies = [tmp_path / "copies" / f"{n}.dcm" for n in range(2)]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for path in copies:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)
    pacs = Orthanc(tmp_path / "orthanc").start()
    node = NodeProcess(
        tmp_path / "node",
        {
            "analyses": [
                {
                    "name": "threshold-test",
                    "format": "torchscript",
                    "path": str(model),
                    "task": "segmentation",
                    "modalities": ["CT"],
                    "labels": ["liver"],
                    "params": {"window": [-200, 200], "output": "softmax", "roi_size": [16, 32, 32]},
                }
            ],
            "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
            "rules": [
                {"name": "ct", "match": {"modality": "CT"}, "analyses": ["threshold-test"], "destinations": ["pacs"]}
            ],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    try:
        with node:
            files = [str(p) for paths in volumes.values() for p in paths] + [str(single)] + [str(p) for p in copies]
            subprocess.run(
                ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
                check=True,
                capture_output=True,
                timeout=300,
            )
            engine = create_engine(node.database_url)

            def jobs():
                with engine.connect() as conn:
                    return conn.execute(text("SELECT study_uid, state, error, result FROM jobs ORDER BY id")).all()

            def segs_referencing() -> set[str]:
                seen = set()
                for orthanc_id in pacs.instances():
                    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(orthanc_id)), stop_before_pixels=True)
                    if ds.Modality == "SEG" and ds.StudyInstanceUID == study_uid:
                        seen |= {str(item.SeriesInstanceUID) for item in ds.ReferencedSeriesSequence}
                return seen

            final = ("succeeded", "inapplicable", "failed", "dead")
            assert wait_for(lambda: len(jobs()) == 2 and all(j[1] in final for j in jobs()), 600), node.log_text()[
                -4000:
            ]
            by_study = {j[0]: j for j in jobs()}
            _, state, error, result = by_study[study_uid]
            assert state == "succeeded", error
            summary = json.loads(result)
            assert {s["series_uid"] for s in summary["series"]} == set(volumes)
            single_uid = str(pydicom.dcmread(single, stop_before_pixels=True).SeriesInstanceUID)
            (skipped,) = summary["not_applicable"]
            assert skipped["series_uid"] == single_uid and "3D volume" in skipped["reason"]
            # Both volumes' results reach the PACS.
            assert wait_for(lambda: segs_referencing() == set(volumes), 300), node.log_text()[-4000:]
            # Two images at one position are not a volume (nor a cine): not applicable, with why.
            _, state, error, _ = by_study[str(ds.StudyInstanceUID)]
            assert state == "inapplicable" and "share one position" in error
            engine.dispose()
    finally:
        pacs.stop()
