"""Reconciler: re-publishes jobs the broker lost, from the job table (the truth).

Redis can restart without persistence or be flushed; a worker machine can die with a job in hand.
Every reconcile_interval_s the reconciler compares the job table with the broker:
- a queued or retrying job whose current message is in no queue and not held by any worker is
  published again;
- a running job whose heartbeat is older than heartbeat_timeout_s is published again; the worker
  that gets it takes the job over (or marks it dead when its attempts are used up).
Duplicates are harmless: a task claims its row atomically, so a second copy finds it taken or done.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Callable

import redis
from sqlalchemy import select

from node.core.clock import aware, utcnow
from node.core.db import database_session
from node.core.errors import describe_error
from node.core.settings import Settings
from node.jobs.broker import embedded, publish_job
from node.jobs.table import ANALYSIS_QUEUE, DELIVERY_QUEUE, PRIORITY_STEPS, QUEUED, RETRYING, RUNNING, Job

log = logging.getLogger("ainode.reconciler")

# A message just published may not be visible yet in a queue list; give it this long.
PUBLISH_GRACE_S = 5.0


def broker_task_ids(settings: Settings) -> set[str] | None:
    """Ids of every task message in the Redis queues or held unacknowledged by a worker; None if unreachable."""
    try:
        client = redis.Redis.from_url(settings.broker.url, socket_timeout=3, socket_connect_timeout=3)
        ids: set[str] = set()
        for queue in (ANALYSIS_QUEUE, DELIVERY_QUEUE):
            for step in PRIORITY_STEPS:
                key = queue if step == 0 else f"{queue}:{step}"
                for raw in client.lrange(key, 0, -1):
                    ids.add(_task_id(raw))
        for raw in client.hvals("unacked"):
            try:
                ids.add(_task_id(json.dumps(json.loads(raw)[0])))
            except (ValueError, IndexError, TypeError):
                continue
        client.close()
        return ids
    except redis.RedisError as err:
        log.warning("broker not reachable for reconciliation (%s); trying again later", describe_error(err))
        return None


def _task_id(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def jobs_to_republish(settings: Settings, present: set[str]) -> list[int]:
    """Jobs whose message is missing from the broker, or whose runner stopped beating."""
    now = utcnow()
    grace = now - timedelta(seconds=PUBLISH_GRACE_S)
    stale = now - timedelta(seconds=settings.jobs.heartbeat_timeout_s)
    out = []
    with database_session(settings.database.url) as session:
        for job in session.scalars(select(Job).where(Job.state.in_((QUEUED, RETRYING, RUNNING)))):
            if job.state == RUNNING:
                beat = aware(job.heartbeat_at)
                if beat is None or beat < stale:
                    out.append(job.id)
            elif job.task_id not in present and (job.published_at is None or aware(job.published_at) < grace):
                out.append(job.id)
    return out


def reconcile(settings: Settings) -> int:
    """One pass; returns how many jobs were published again."""
    if embedded(settings):
        return 0  # the embedded worker reads the job table itself; nothing can be lost in between
    present = broker_task_ids(settings)
    if present is None:
        return 0
    republished = 0
    for job_id in jobs_to_republish(settings, present):
        if publish_job(settings, job_id):
            republished += 1
    if republished:
        log.warning("re-published %d job(s) the broker had lost or whose worker stopped", republished)
    return republished


def periodic_tasks(settings: Settings) -> list[tuple[str, float, Callable[[], None]]]:
    """The reconciliation pass every jobs.reconcile_interval_s."""
    return [("reconciler", float(settings.jobs.reconcile_interval_s), lambda: reconcile(settings))]
