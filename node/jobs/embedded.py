"""The embedded broker and worker: with no broker configured, the job table is the queue.

A worker thread in the node claims queued rows (STAT first) and runs them, one at a time, in a
child process (``python -m workers.tasks --serve FD``: its settings as JSON on stdin, then job
ids, one per line; it answers ``done ID`` on a pipe). The child outlives its jobs so the models
it loaded stay loaded (a CT segmentation model is not read again for every study), and it stays
a separate process for what one was started per job: a crash, a leak or a hung model costs that
child, never the node. When it dies (segfault, out of memory) the job is released as crashed and
the next job starts a fresh child; at the hard time limit it is killed and replaced. One
workstation then needs no Redis, and a restart loses nothing: the rows are the queue.
"""

from __future__ import annotations

import logging
import os
import select as io_select
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

from sqlalchemy import or_, select

from node.core.clock import utcnow
from node.core.db import ChangeGate, database_session
from node.core.settings import ENV_PREFIX, Settings
from node.jobs.broker import embedded
from node.jobs.lifecycle import mark_time_limit_exceeded, owner_gone, release_crashed_job, running_in
from node.jobs.table import ANALYSIS_QUEUE, QUEUED, RETRYING, RUNNING, Job

log = logging.getLogger("ainode.jobs")


def child_environment() -> dict[str, str]:
    """The environment of a job's child: the node's, less the AINODE_* variables (the operator's
    overrides may hold the token or passwords; the child gets its settings on stdin), with
    numpy's transparent-huge-page advice off unless the operator chose (``workers.worker``:
    ``small_pages``)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    return env


class EmbeddedWorker:
    """Runs queued jobs in priority order inside the node, in a long-lived child process with time limits."""

    def __init__(self, settings: Settings, poll_s: float = 0.2):
        self.settings = settings
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._answers: int | None = None  # read end of the child's "done ID" pipe
        self._pending = b""
        self.children_started = 0
        self._thread = threading.Thread(target=self._loop, name="embedded-worker", daemon=True)

    def start(self) -> "EmbeddedWorker":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop taking jobs; a job in progress is stopped and will be run again after restart."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._end_child(kill=True)

    def _next_job(self) -> int | None:
        stale = utcnow() - timedelta(seconds=self.settings.jobs.heartbeat_timeout_s)
        with database_session(self.settings.database.url) as session:
            waiting = session.scalar(
                select(Job.id)
                .where(or_(Job.state.in_((QUEUED, RETRYING)), (Job.state == RUNNING) & (Job.heartbeat_at < stale)))
                .where(Job.queue == ANALYSIS_QUEUE)
                .order_by(Job.priority_rank, Job.id)
                .limit(1)
            )
            if waiting is not None:
                return waiting
            # A job whose child died with the node (kill -9, power cut) need not wait for the heartbeat
            # timeout: its process is known to be gone.
            for job_id, worker in session.execute(select(Job.id, Job.worker).where(Job.state == RUNNING)):
                if owner_gone(worker):
                    return job_id
        return None

    def _loop(self) -> None:
        gate = ChangeGate(self.settings.database.url)  # an idle queue costs one cheap read per poll
        while not self._stop.is_set():
            if not gate.due():
                self._stop.wait(self.poll_s)
                continue
            try:
                job_id = self._next_job()
            except Exception:  # noqa: BLE001 - a locked or restarting database: try again
                log.exception("embedded worker could not read the job table")
                job_id = None
            if job_id is None:
                self._stop.wait(self.poll_s)
                continue
            self._run(job_id)

    # -- the child

    def _start_child(self) -> subprocess.Popen[bytes]:
        read_end, write_end = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "workers.tasks", "--serve", str(write_end)],
                env=child_environment(),
                stdin=subprocess.PIPE,
                pass_fds=(write_end,),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._child, self._answers, self._pending = child, read_end, b""
        self.children_started += 1
        # On stdin, not in the environment: /proc/PID/environ is readable for the process's life
        # and inherited by all it starts, and the settings hold the secrets (API token, database
        # and STOW passwords).
        self._tell(self.settings.model_dump_json().encode("utf-8") + b"\n")
        return child

    def _tell(self, line: bytes) -> None:
        assert self._child is not None and self._child.stdin is not None
        try:
            self._child.stdin.write(line)
            self._child.stdin.flush()
        except OSError:  # the child died; its exit status says so in _run
            pass

    def _end_child(self, kill: bool) -> None:
        child, self._child = self._child, None
        if child is not None:
            if kill and child.poll() is None:
                child.kill()
            try:
                if child.stdin is not None:
                    child.stdin.close()
            except OSError:
                pass
            child.wait()
        if self._answers is not None:
            os.close(self._answers)
            self._answers = None

    def _answered(self, job_id: int, wait_s: float) -> bool:
        """True once the child said it finished ``job_id`` (waits up to ``wait_s``)."""
        assert self._answers is not None
        if f"done {job_id}\n".encode() in self._pending:
            return True
        readable, _, _ = io_select.select([self._answers], [], [], wait_s)
        if readable:
            chunk = os.read(self._answers, 4096)
            self._pending = (self._pending + chunk)[-4096:]
        return f"done {job_id}\n".encode() in self._pending

    def _run(self, job_id: int) -> None:
        with database_session(self.settings.database.url) as session:
            hard = session.get(Job, job_id).time_limit_s
        child = self._child if self._child is not None and self._child.poll() is None else None
        if child is None:
            self._end_child(kill=True)
            child = self._start_child()
        self._pending = b""
        self._tell(f"{job_id}\n".encode())
        # The hard limit counts from the moment the child claims the job, not from when it was
        # asked (a fresh child imports the analysis stack first, seconds on a busy machine).
        started: float | None = None
        while not self._answered(job_id, 0.2):
            if child.poll() is not None:
                log.warning("embedded job %s child exited with %s", job_id, child.returncode)
                self._end_child(kill=False)
                release_crashed_job(self.settings, job_id, f"worker process exited with {child.returncode}")
                return
            if self._stop.is_set():
                self._end_child(kill=True)
                return
            if started is None and running_in(self.settings, job_id, child.pid):
                started = time.monotonic()
            if started is not None and time.monotonic() - started > hard:
                self._end_child(kill=True)
                mark_time_limit_exceeded(self.settings, job_id, hard, soft=False)
                return


def start_services(settings: Settings) -> list[Callable[[], None]]:
    """In embedded mode (no broker URL), start the in-process worker; otherwise nothing."""
    if not embedded(settings):
        log.info(
            "jobs go to the broker at %s; run `ainode worker` on the analysis machines",
            settings.broker.url.split("@")[-1],
        )
        return []
    log.warning(
        "no broker configured: using the embedded broker (the job table) and an in-process worker; "
        "set broker.url to a redis:// URL to run analyses on separate GPU workers"
    )
    worker = EmbeddedWorker(settings).start()
    return [worker.stop]
