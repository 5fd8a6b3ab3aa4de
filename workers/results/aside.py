"""The SEG built and written in a child process while this one builds the other result objects.

Building a SEG (highdicom: one functional-group item per frame) and encoding it (pydicom) is pure
Python: for a 300-slice CT with eight structures about 900 frames, 0.6 s of one core, the largest
part of writing a job's results. The SR and the KOS only need the SEG's identity (its UIDs are
derived before it exists, ``UIDFactory``), so a forked child builds and writes the SEG from the
findings it shares copy-on-write while the parent builds the SR and the KOS against a reference
(``seg_reference``) with the same UIDs: both cores work, and the objects are byte for byte those
of the sequential path.

The child does nothing but highdicom, pydicom and numpy work and leaves with ``os._exit`` (no
locks of the parent's other threads, no database, no torch). When it fails, is killed or does not
finish in ``CHILD_DEADLINE_S``, the parent builds and writes the SEG itself: a result is never
lost to the shortcut.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

from pydicom.dataset import Dataset

from workers.analysis.findings import Findings
from workers.results.context import ResultContext, UIDFactory
from workers.results.seg import present_segments, seg_reference, write_seg
from workers.results.sources import SourceImages, write

log = logging.getLogger(__name__)

# Below this many SEG frames (segments x slices with voxels) forking costs more than it saves.
MIN_FRAMES = 100
# A child that has not written the SEG by then is killed and the SEG written here (a generous
# bound: a 2000-slice study with 100 structures takes well under a minute).
CHILD_DEADLINE_S = 300.0
_PR_SET_PDEATHSIG = 1


def seg_frames(findings: Findings) -> int:
    """Frames the SEG of the findings will have (non-empty segment slices)."""
    return sum(len(segment.slices()) for segment in present_segments(findings))


class SegAside:
    """A SEG being written by a forked child; ``reference`` stands for it meanwhile."""

    def __init__(self, pid: int, reference: Dataset, path: Path, write_here: Callable[[], Path]):
        self.pid = pid
        self.reference = reference
        self.path = path
        self._write_here = write_here
        self._status: int | None = None

    def finish(self) -> Path:
        """Wait for the child's SEG file; write it here when the child did not."""
        if self._wait(CHILD_DEADLINE_S) == 0 and self.path.exists():
            return self.path
        log.warning("the SEG's child process did not write it (status %s): written in the worker", self._status)
        return self._write_here()

    def stop(self) -> None:
        """Kill the child if it still runs (the job failed meanwhile); reap it."""
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait(None)

    def _wait(self, deadline_s: float | None) -> int:
        end = None if deadline_s is None else time.monotonic() + deadline_s
        while self._status is None:
            pid, status = os.waitpid(self.pid, 0 if end is None else os.WNOHANG)
            if pid == self.pid:
                self._status = os.waitstatus_to_exitcode(status)
            elif end is not None and time.monotonic() > end:
                os.kill(self.pid, signal.SIGKILL)
                end = None
            else:
                time.sleep(0.005)
        return self._status


def start_seg_aside(
    findings: Findings,
    sources: SourceImages,
    ctx: ResultContext,
    uids: UIDFactory,
    folder: Path,
    min_frames: int = MIN_FRAMES,
) -> SegAside | None:
    """Fork a child that builds and writes the findings' SEG into ``folder``; None when the SEG is
    too small to be worth it, there is none, or this platform cannot fork."""
    if not hasattr(os, "fork") or seg_frames(findings) < max(1, min_frames):
        return None
    sources.headers  # noqa: B018 - read (or prepared) once, before the fork: both processes share them
    reference = seg_reference(findings, sources, ctx, uids)
    path = folder / f"seg-{reference.SOPInstanceUID}.dcm"
    folder.mkdir(parents=True, exist_ok=True)

    def write_here() -> Path:
        seg = write_seg(findings, sources, ctx, uids)
        return write(seg, folder, path.stem)

    try:
        pid = os.fork()
    except OSError as err:  # out of processes or memory: the parent writes it
        log.warning("no child process for the SEG (%s): written in the worker", err.strerror)
        return None
    if pid == 0:  # the child: build, write, leave without running the parent's exit handlers
        code = 1
        try:
            _die_with_parent()
            write_here()
            code = 0
        except BaseException:  # noqa: BLE001 - any failure: the parent writes the SEG itself
            code = 1
        finally:
            os._exit(code)
    return SegAside(pid, reference, path, write_here)


def _die_with_parent() -> None:
    # A worker killed mid-job takes its SEG child with it (the job runs again from the start).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
