"""`ainode demo --out DIR` end to end: Orthanc as the test PACS, the real model, results checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from tests.helpers import REPO_ROOT, outside_patient_objects
from tests.results.validators import dciodvfy_errors

pytestmark = pytest.mark.slow

SEG, COMPREHENSIVE_3D_SR, KOS = (
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.59",
)


def test_demo_delivers_every_result_to_the_test_pacs(tmp_path: Path):
    from workers.analysis.models.segmentation import WEIGHTS

    if not WEIGHTS.exists():
        pytest.skip(f"the ct-segmentation weights are not in this checkout ({WEIGHTS}); `ainode train` makes them")
    out = tmp_path / "demo-out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Timeline per stage" in proc.stderr and "all " in proc.stderr
    objects = sorted(out.glob("*.dcm"))
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in objects}
    assert {SEG, KOS} <= classes and any(c.startswith("1.2.840.10008.5.1.4.1.1.88.") and c != KOS for c in classes)
    for path in objects:
        assert dciodvfy_errors(path) == [], path
        # Results go back into the source study (IHE AIR), which is the phantom's.
        assert pydicom.dcmread(path, stop_before_pixels=True).PatientID == "DEMO0001"
    # The node's audit trail: application start and stop, and the phantom study's arrival.
    trail = (tmp_path / "work" / "audit.log").read_text()
    assert trail.count('csd-code="110100"') == 2 and 'EventActionCode="C" ' in trail and 'csd-code="110104"' in trail
    # The patient is named only in the Patient participant objects PS3.15 asks for.
    assert "DEMO0001" in trail
    outside = outside_patient_objects(trail)
    assert "Demo^Phantom" not in outside and "DEMO0001" not in outside
    # The key slice shows a finding (the largest lesion at its widest), not an empty slice.
    assert re.search(r"key slice \d+ \([1-9]\d* finding", proc.stderr), proc.stderr[-3000:]
    png = Image.open(out / "key-slice.png")
    assert png.size[0] >= 256 and png.mode == "RGB"
    # The overlay is drawn: some pixels are coloured (grey CT pixels have R == G == B).
    pixels = png.get_flattened_data() if hasattr(png, "get_flattened_data") else png.getdata()
    assert sum(1 for r, g, b in pixels if not (r == g == b)) > 50


def test_demo_fails_when_the_test_pacs_gets_nothing(tmp_path: Path, capsys):
    """A demo whose analysis produces no result objects must say so and exit non-zero."""
    from node.demo import run_demo

    assert run_demo(None, tmp_path / "work", analysis="count-instances") == 1
    assert "the node produced no result objects" in capsys.readouterr().err.replace("\n", " ")


def test_demo_without_orthanc_uses_the_builtin_storage_scp(tmp_path: Path, monkeypatch, capsys):
    from workers.analysis.models.segmentation import WEIGHTS

    if not WEIGHTS.exists():
        pytest.skip(f"the ct-segmentation weights are not in this checkout ({WEIGHTS})")
    import node.demo as demo

    monkeypatch.setattr(demo, "orthanc_binary", lambda: None)
    out = tmp_path / "out"
    assert demo.run_demo(out, tmp_path / "work") == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "built-in storage SCP" in err
    objects = sorted(out.glob("*.dcm"))
    assert len(objects) >= 3 and all(dciodvfy_errors(p) == [] for p in objects)
