"""The volume streamer: decodes each indexed instance once, in the background, into its series'
streamed volume (``node.core.volumes``), so the analysis maps one file instead of decoding them all.

Runs after the instance is durable, indexed and answered: nothing on the C-STORE path waits for
it, and what it fails to do (a full queue, a crash, a colour image) only means the analysis
reads the files, as before. Compressed transfer syntaxes are decoded here too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from node.core import volumes
from node.ingest import store

log = logging.getLogger("ainode.receiver")
_CHUNK = 32
# Larger instances (a long multi-frame) are left to the analysis' file loader: decoding one here
# would hold all its frames in the receiver's memory at once.
MAX_INSTANCE_BYTES = 128 * 1024 * 1024
# Decoding shares the receiver's interpreter (its GIL) and CPU: it waits until instances have
# stopped arriving for this long, so it never slows an association down (bench/ingest.py).
QUIET_S = 0.2


class VolumeStreamer:
    """A daemon thread appending indexed instances' stored values to their series' volumes."""

    def __init__(self, reserve: int = 0, max_queued: int = 20000):
        # Streamed volumes are a cache: they stop at twice the storage reserve, well before the
        # receiver would refuse instances (A700) for want of space.
        self._reserve = 2 * reserve
        self._queue: deque[Path] = deque()
        self._cond = threading.Condition()
        self._max_queued = max_queued
        self._busy = False
        self._stopping = False
        self._last_submit = 0.0
        self.streamed = 0
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="volume-stream", daemon=True)
        self._thread.start()

    def submit(self, paths: list[Path]) -> None:
        """Queue instance files (placed and indexed) for streaming; never blocks the caller."""
        with self._cond:
            room = self._max_queued - len(self._queue)
            if room < len(paths):  # far behind: those series are read from files instead
                self.skipped += len(paths) - max(room, 0)
            self._queue.extend(paths[: max(room, 0)])
            self._last_submit = time.monotonic()
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is streamed (tests, orderly shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after what is queued (a daemon thread: an exit without stop loses only cache)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[Path] | None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._queue or self._stopping)
            while not self._stopping and (quiet := time.monotonic() - self._last_submit) < QUIET_S:
                self._cond.wait(QUIET_S - quiet)  # instances still arriving: they come first
            if not self._queue:
                return None
            self._busy = True
            batch = list(self._queue)
            self._queue.clear()
            return batch

    def _run(self) -> None:
        try:  # this thread only (Linux: a thread is a task): the receiving threads come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        while (batch := self._take()) is not None:
            by_series: dict[Path, list[Path]] = {}
            for path in batch:
                by_series.setdefault(path.parent, []).append(path)
            for folder, paths in by_series.items():
                for start in range(0, len(paths), _CHUNK):  # bounded memory, one flush per chunk
                    self._stream(folder, paths[start : start + _CHUNK])

    def _stream(self, folder: Path, paths: list[Path]) -> None:
        items = []
        for path in paths:
            try:
                if path.stat().st_size > MAX_INSTANCE_BYTES:
                    self.skipped += 1
                    continue
                items.append((path, volumes.stored_values(path)))
            except volumes.NotStreamable:
                self.skipped += 1
            except OSError:  # removed meanwhile (a replaced copy, retention)
                self.skipped += 1
        try:
            store.ensure_space(folder, self._reserve, sum(values.nbytes for _, values in items))
            self.streamed += volumes.append(folder, items)
        except store.OutOfSpace:
            self.skipped += len(items)
        except OSError as err:
            self.skipped += len(items)
            log.warning("streaming pixel data into a series volume failed (%s); it is read from files", err.strerror)
