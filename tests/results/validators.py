"""Independent validators: dciodvfy (dicom3tools), DicomSRValidator (PixelMed), dsrdump (DCMTK)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

JAVA_OPTS = "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors for one file (warnings are not errors)."""
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, errors="replace")
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def sr_validator_errors(path: Path) -> list[str]:
    """Error lines of PixelMed's DicomSRValidator for one SR file."""
    env = dict(os.environ, _JAVA_OPTIONS=JAVA_OPTS)
    proc = subprocess.run(["DicomSRValidator", str(path)], capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    return [line for line in out.splitlines() if line.startswith("Error")]


def dsrdump(path: Path) -> str:
    """dsrdump's rendering of an SR; raises if DCMTK cannot parse the document."""
    proc = subprocess.run(["dsrdump", "-Ee", "-Ec", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"dsrdump failed on {path}: {proc.stderr}")
    return proc.stdout
