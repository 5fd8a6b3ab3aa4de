"""The folder where the node's processes keep their Prometheus samples (multiprocess mode).

``ainode serve`` creates one per run in the temporary folder, named after its process id
(``ainode-metrics-<pid>-…``), and removes it when it stops. A node killed with SIGKILL cannot;
the next start removes every such folder whose processes are all gone.

This module must not import prometheus-client: the folder is chosen before it is first imported.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "ainode-metrics-"
UNNAMED_GRACE_S = 86400.0
# A sample file is "<kind>_<pid>.db" (prometheus-client's multiprocess naming).
_SAMPLE_PID = re.compile(r"_(\d+)\.db$")


def create_folder() -> Path:
    """A fresh, private folder for this process's run."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def remove_folder(folder: Path) -> None:
    """Remove this run's folder (at stop)."""
    shutil.rmtree(folder, ignore_errors=True)


def remove_stale_folders(parent: Path | None = None) -> list[Path]:
    """Remove the metrics folders of runs that are over: no process named in them is alive.

    A folder names its node's main process (in its name, earlier releases did not) and every
    process that wrote samples (in its files' names). Only this user's folders are looked at.
    """
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            pids = _pids(folder)
            if any(_alive(pid) for pid in pids):
                continue
            # A folder naming no process (an earlier release's, not yet written to) may belong to
            # a node starting right now: only a day-old one is certainly over.
            if not pids and time.time() - folder.stat().st_mtime < UNNAMED_GRACE_S:
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _pids(folder: Path) -> set[int]:
    pids = set()
    named = re.match(rf"{PREFIX}(\d+)-", folder.name)
    if named:
        pids.add(int(named.group(1)))
    for sample in folder.iterdir():
        match = _SAMPLE_PID.search(sample.name)
        if match:
            pids.add(int(match.group(1)))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
