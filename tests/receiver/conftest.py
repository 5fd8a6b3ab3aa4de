"""Fixtures of the receiver tests: a running node and DCMTK/pynetdicom peers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import NodeProcess


@pytest.fixture
def node(tmp_path: Path):
    """A running `ainode serve` with the test defaults (one receiver, SQLite)."""
    with NodeProcess(tmp_path / "node") as proc:
        yield proc


def storescu(node: NodeProcess, *files: Path | str, aet: str = "STORESCU", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Push files with DCMTK storescu (verbose, so answers can be read from stderr)."""
    cmd = ["storescu", "-v", "-aet", aet, "-aec", node.ae_title, *extra, "127.0.0.1", str(node.port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True)


def echoscu(node: NodeProcess, aet: str = "ECHOSCU") -> subprocess.CompletedProcess:
    """C-ECHO the node with DCMTK echoscu."""
    cmd = ["echoscu", "-v", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    return subprocess.run(cmd, capture_output=True, text=True)
