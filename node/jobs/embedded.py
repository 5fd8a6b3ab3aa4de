"""The embedded broker and worker: with no broker configured, the job table is the queue.

A worker thread in the node claims queued rows (STAT first) and runs each job in a child process
(``python -m workers.tasks JOB_ID``, its settings as JSON on stdin) that enforces the time limits. One workstation then needs no
Redis, and a restart loses nothing: the rows are the queue.
"""

from __future__ import annotations

import logging
import os
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
    overrides may hold the token or passwords; the child gets its settings on stdin)."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}


class EmbeddedWorker:
    """Runs queued jobs in priority order inside the node, each in a child process with time limits."""

    def __init__(self, settings: Settings, poll_s: float = 0.2):
        self.settings = settings
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="embedded-worker", daemon=True)

    def start(self) -> "EmbeddedWorker":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop taking jobs; a job in progress is stopped and will be run again after restart."""
        self._stop.set()
        if self._child and self._child.poll() is None:
            self._child.kill()
        self._thread.join(timeout=10)

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

    def _hand_settings(self, child: subprocess.Popen[bytes]) -> None:
        # On stdin, not in the environment: /proc/PID/environ is readable for the process's life
        # and inherited by all it starts, and the settings hold the secrets (API token, database
        # and STOW passwords).
        assert child.stdin is not None
        try:
            child.stdin.write(self.settings.model_dump_json().encode("utf-8"))
            child.stdin.close()
        except OSError:  # the child died before reading; its exit status says so below
            pass

    def _run(self, job_id: int) -> None:
        with database_session(self.settings.database.url) as session:
            hard = session.get(Job, job_id).time_limit_s
        cmd = [sys.executable, "-m", "workers.tasks", str(job_id)]
        self._child = subprocess.Popen(cmd, env=child_environment(), stdin=subprocess.PIPE)
        self._hand_settings(self._child)
        # The hard limit counts from the moment the child claims the job, not from its start-up
        # (importing the analysis stack can take seconds on a busy machine).
        started: float | None = None
        while self._child.poll() is None:
            if self._stop.wait(0.2):
                self._child.kill()
                self._child.wait()
                return
            if started is None and running_in(self.settings, job_id, self._child.pid):
                started = time.monotonic()
            if started is not None and time.monotonic() - started > hard:
                self._child.kill()
                self._child.wait()
                mark_time_limit_exceeded(self.settings, job_id, hard, soft=False)
                return
        if self._child.returncode != 0:
            log.warning("embedded job %s child exited with %s", job_id, self._child.returncode)
            release_crashed_job(self.settings, job_id, f"worker process exited with {self._child.returncode}")


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
