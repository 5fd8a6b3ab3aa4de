"""`ainode serve` removes its Prometheus multiprocess folder when it stops, and stale ones at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import NodeProcess


def dead_pid() -> int:
    """The process id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def metrics_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("ainode-metrics-*"))


def test_serve_removes_its_metrics_folder_at_stop_and_stale_ones_at_start(tmp_path: Path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pid = dead_pid()
    stale = tmp / f"ainode-metrics-{pid}-abcd"  # this release's name, its node gone
    stale.mkdir()
    (stale / f"counter_{pid}.db").write_bytes(b"\0" * 64)
    legacy = tmp / "ainode-metrics-q1w2e3r4"  # an earlier release's name: its samples say whose
    legacy.mkdir()
    (legacy / f"histogram_{pid}.db").write_bytes(b"\0" * 64)
    alive = tmp / "ainode-metrics-x9y8z7w6"  # a process that still runs (this one) keeps its folder
    alive.mkdir()
    (alive / f"counter_{os.getpid()}.db").write_bytes(b"\0" * 64)

    node = NodeProcess(tmp_path / "node", env={"TMPDIR": str(tmp)}).start()
    try:
        running = [f for f in metrics_folders(tmp) if f.name.startswith(f"ainode-metrics-{node.proc.pid}-")]
        assert len(running) == 1 and any(running[0].glob("*.db")), metrics_folders(tmp)
        assert not stale.exists() and not legacy.exists() and alive.exists()
    finally:
        assert node.stop() == 0
    assert metrics_folders(tmp) == [alive]
