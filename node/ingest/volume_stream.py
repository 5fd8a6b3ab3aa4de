"""The volume streamer: decodes each indexed instance once, in the background, into its series'
streamed volume (``node.core.volumes``), so the analysis maps one file instead of decoding them all.

Runs after the instance is durable, indexed and answered: nothing on the C-STORE path waits for
it, and what it fails to do (a full queue, a crash, a colour image) only means the analysis
reads the files, as before. Compressed transfer syntaxes are decoded here too.

The decoding runs in a child process at the lowest CPU priority (``python -m
node.ingest.volume_stream``), fed the instance paths through a pipe. In the receiver's own
process it shared the GIL with the associations: it had to wait until instances stopped
arriving (bench/ingest.py lost half its rate otherwise), so a study sent in one go was only
decoded after its last instance, when the analysis was already reading the files. A separate
process at nice 19 decodes while the study arrives and takes only the CPU the receiver leaves.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from node.core import volumes
from node.ingest import store

log = logging.getLogger("ainode.receiver")
_CHUNK = 32
# Larger instances (a long multi-frame) are left to the analysis' file loader: decoding one here
# would hold all its frames in memory at once.
MAX_INSTANCE_BYTES = 128 * 1024 * 1024
# How many paths go down the pipe in one write.
_FEED_BATCH = 256


class _Child:
    """One decoding process and how many of the paths written to it it still owes a report."""

    def __init__(self, popen: subprocess.Popen[bytes]):
        self.popen = popen
        self.owed = 0
        self.done = False  # its reports are all read (it exited): owes nothing more


class VolumeStreamer:
    """Feeds indexed instances' paths to a decoding child process and counts what it did.

    ``submit`` never blocks (a bounded queue; what does not fit is read from files later); a
    feeder thread writes the queue down the child's pipe, a reader thread per child collects its
    reports. A child that dies loses only cache: the feeder starts another.
    """

    def __init__(self, reserve: int = 0, max_queued: int = 20000):
        # Streamed volumes are a cache: they stop at twice the storage reserve, well before the
        # receiver would refuse instances (A700) for want of space.
        self._reserve = 2 * reserve
        self._queue: deque[Path] = deque()
        self._cond = threading.Condition()
        self._max_queued = max_queued
        self._children: list[_Child] = []  # started and not yet finished reporting
        self._child: _Child | None = None  # the one being fed
        self._stopping = False
        self.streamed = 0
        self.skipped = 0
        # Started now, not at the first instance: the receiver's threads and processes are the
        # same from its start on (a child that dies is replaced by the feeder).
        self._running_child()
        self._feeder = threading.Thread(target=self._feed, name="volume-stream", daemon=True)
        self._feeder.start()

    def submit(self, paths: list[Path]) -> None:
        """Queue instance files (placed and indexed) for streaming; never blocks the caller."""
        with self._cond:
            room = self._max_queued - len(self._queue)
            if room < len(paths):  # far behind: those series are read from files instead
                self.skipped += len(paths) - max(room, 0)
            self._queue.extend(paths[: max(room, 0)])
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is streamed (tests, orderly shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not any(c.owed for c in self._children), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after what is queued: the child streams what its pipe holds and exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._feeder.join(timeout)
        for child in list(self._children):
            try:
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()

    def _feed(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    break
            child = self._running_child()
            with self._cond:
                batch = [self._queue.popleft() for _ in range(min(_FEED_BATCH, len(self._queue)))]
                if child is None or child.done:
                    self.skipped += len(batch)
                    self._cond.notify_all()
                    continue
                child.owed += len(batch)
            self._send(child, batch)
        if self._child is not None and self._child.popen.stdin is not None:
            try:
                self._child.popen.stdin.close()  # end of input: it streams what it has and exits
            except OSError:
                pass

    def _send(self, child: _Child, batch: list[Path]) -> None:
        """Write paths down the pipe (blocks only the feeder when the child is behind)."""
        try:
            assert child.popen.stdin is not None
            child.popen.stdin.write(b"".join(os.fsencode(p) + b"\n" for p in batch))
            child.popen.stdin.flush()
        except OSError:
            log.warning("the volume streamer's process is gone; those instances are read from files")
            with self._cond:
                if not child.done:  # else its reader already counted the batch as owed and lost
                    child.owed -= len(batch)
                    self.skipped += len(batch)
                self._cond.notify_all()

    def _running_child(self) -> _Child | None:
        """The child being fed, started now if there is none or it died."""
        if self._child is not None and not self._child.done and self._child.popen.poll() is None:
            return self._child
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "node.ingest.volume_stream", "--reserve", str(self._reserve)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as err:
            log.warning("the volume streamer's process did not start (%s); series are read from files", err)
            self._child = None
            return None
        child = _Child(popen)
        with self._cond:
            self._children.append(child)
        self._child = child
        threading.Thread(target=self._collect, args=(child,), name="volume-stream-reports", daemon=True).start()
        return child

    def _collect(self, child: _Child) -> None:
        """Read a child's reports ("<paths done> <streamed> <skipped>" per chunk) until it exits."""
        assert child.popen.stdout is not None
        for line in child.popen.stdout:
            try:
                done, streamed, skipped = (int(n) for n in line.split())
            except ValueError:
                continue
            with self._cond:
                child.owed -= done
                self.streamed += streamed
                self.skipped += skipped
                self._cond.notify_all()
        child.popen.wait()
        with self._cond:  # what it still owed will never be reported: read from files
            self.skipped += child.owed
            child.owed = 0
            child.done = True
            self._children.remove(child)
            self._cond.notify_all()


def stream_chunk(folder: Path, paths: list[Path], reserve: int) -> tuple[int, int]:
    """Decode instances of one series and append them to its volume; (streamed, skipped)."""
    items = []
    skipped = 0
    for path in paths:
        try:
            if path.stat().st_size > MAX_INSTANCE_BYTES:
                skipped += 1
                continue
            items.append((path, volumes.stored_values(path)))
        except volumes.NotStreamable:
            skipped += 1
        except OSError:  # removed meanwhile (a replaced copy, retention)
            skipped += 1
    try:
        store.ensure_space(folder, reserve, sum(values.nbytes for _, values in items))
        return volumes.append(folder, items), skipped
    except store.OutOfSpace:
        return 0, skipped + len(items)
    except OSError as err:
        log.warning("streaming pixel data into a series volume failed (%s); it is read from files", err.strerror)
        return 0, skipped + len(items)


def _available_paths(fd: int, pending: bytes, block: bool) -> tuple[list[Path], bytes, bool]:
    """Every complete line readable now (waiting for the first when ``block``); the partial
    rest; and whether the pipe reached its end."""
    paths: list[Path] = []
    while True:
        ready, _, _ = select.select([fd], [], [], None if block and not paths else 0)
        if not ready:
            return paths, pending, False
        data = os.read(fd, 1 << 16)
        if not data:
            return paths, pending, True
        pending += data
        *lines, pending = pending.split(b"\n")
        paths.extend(Path(os.fsdecode(line)) for line in lines if line)


def serve(reserve: int) -> None:
    """The child: stream the paths read on stdin, report each chunk on stdout, exit at EOF."""
    try:  # the receivers and the analysis come first
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except OSError:
        pass
    fd = sys.stdin.fileno()
    pending = b""
    ended = False
    while not ended:
        paths, pending, ended = _available_paths(fd, pending, block=True)
        by_series: dict[Path, list[Path]] = {}
        for path in paths:
            by_series.setdefault(path.parent, []).append(path)
        for folder, members in by_series.items():
            for start in range(0, len(members), _CHUNK):  # bounded memory, one flush per chunk
                chunk = members[start : start + _CHUNK]
                streamed, skipped = stream_chunk(folder, chunk, reserve)
                sys.stdout.write(f"{len(chunk)} {streamed} {skipped}\n")
                sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the decoding child (``python -m node.ingest.volume_stream``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reserve", type=int, default=0, help="bytes to leave free on the storage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.reserve)
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
