"""The real analysis path of a job: series loaded as a volume, a configured (TorchScript) model run
through the registry, DICOM results written, outbox rows recorded for the rule's destinations.

The model here is a test fixture plugged in the way a hospital plugs in its own: a one-layer
TorchScript network with fixed weights (an intensity threshold). It is not one of the project's models.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from tests.helpers import NodeProcess, wait_for
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
