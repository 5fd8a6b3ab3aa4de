"""The broker side of jobs: the Celery application, configured from the node's settings, and publishing.

Reliability settings for long GPU tasks that must be neither lost nor run twice:
- acks_late + reject_on_worker_lost: a message is acknowledged only after the task ends, and a
  worker killed mid-task puts it back on the queue;
- prefetch multiplier 1: a worker holds no more messages than it is running;
- broker visibility timeout longer than the longest hard time limit: Redis does not hand a slow
  job to a second worker while the first still runs it;
- gpu (analyses) and cpu (result delivery) queues; Redis priority steps so STAT comes first.
The job row in the database stays the truth; messages carry the job id only. The node publishes
by task name, so it never imports the worker's code; ``workers.tasks`` registers the tasks on
this app.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Queue
from sqlalchemy import update

from node.core.clock import utcnow
from node.core.db import engine_for, session_scope
from node.core.errors import describe_error
from node.core.settings import Settings, use_settings
from node.jobs.table import (
    ANALYSIS_QUEUE,
    DELIVER_TASK,
    DELIVERY_QUEUE,
    PRIORITY_RANK,
    PRIORITY_STEPS,
    QUEUED,
    RETRYING,
    RUN_ANALYSIS_TASK,
    RUNNING,
    Job,
)

log = logging.getLogger("ainode.jobs")

app = Celery("ainode")
app.conf.update(include=["workers.tasks"])

_configured_for: dict[str, Any] | None = None


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from the node settings."""
    longest_hard = max([a.time_limit_s for a in settings.analyses] + [900])
    visibility = max(settings.broker.visibility_timeout_s, longest_hard + 60)
    return {
        "broker_url": settings.broker.url or "memory://",
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
            "sep": ":",
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_queues": [
            Queue(ANALYSIS_QUEUE, routing_key=ANALYSIS_QUEUE),
            Queue(DELIVERY_QUEUE, routing_key=DELIVERY_QUEUE),
        ],
        "task_default_queue": ANALYSIS_QUEUE,
        "task_default_priority": 3,
        "task_routes": {DELIVER_TASK: {"queue": DELIVERY_QUEUE}, RUN_ANALYSIS_TASK: {"queue": ANALYSIS_QUEUE}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def _drop_broker_connections() -> None:
    # Celery caches a connection pool on the app and a producer pool on app.amqp; both are bound
    # to the broker URL they were first made for. Detach them (the reset Celery itself does after
    # a fork) without closing: kombu shares pools per URL, and a closed one would be handed out again.
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


def configured_app(settings: Settings) -> Celery:
    """The Celery app configured for these settings (publisher side and worker side)."""
    global _configured_for
    config = celery_config(settings)
    # Compare the configuration itself, not id(settings): ids are reused after garbage collection.
    if _configured_for != config:
        # Pooled broker connections were opened for the previous broker: close them, or a
        # publisher in a long-lived process keeps talking to the old (maybe dead) broker.
        _drop_broker_connections()
        app.conf.update(config)
        _configured_for = config
    use_settings(settings)
    return app


def embedded(settings: Settings) -> bool:
    """True when no broker is configured: the node runs jobs itself."""
    return not settings.broker.url


def publish_job(settings: Settings, job_id: int, countdown: float | None = None) -> bool:
    """Send the job's message (its id only) to the broker; False when the broker is unreachable.

    The row must already be committed. In embedded mode the table is the queue and nothing is sent.
    """
    engine = engine_for(settings.database.url)
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in (QUEUED, RETRYING, RUNNING):
            return False
        job.publish_count += 1
        task_id = f"job-{job.id}-{job.publish_count}"
        queue, rank, soft, hard = job.queue, job.priority_rank, job.soft_time_limit_s, job.time_limit_s
        if embedded(settings):
            job.task_id, job.published_at = task_id, utcnow()
            return True
    try:
        configured_app(settings).send_task(
            RUN_ANALYSIS_TASK,
            args=[job_id],
            task_id=task_id,
            queue=queue,
            routing_key=queue,
            priority=rank,
            soft_time_limit=soft,
            time_limit=hard,
            countdown=countdown,
        )
    except Exception as err:  # noqa: BLE001 - the reconciler publishes it when the broker is back
        log.warning(
            "job %s not published (broker unreachable: %s); the reconciler will retry", job_id, type(err).__name__
        )
        return False
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(task_id=task_id, published_at=utcnow()))
    log.info("job %s published to %s (priority %s, task %s)", job_id, queue, rank, task_id)
    return True


def publish_delivery(settings: Settings, delivery_id: int) -> bool:
    """Queue a result delivery on the cpu queue (the dispatcher's outbox row is the truth)."""
    if embedded(settings):
        return False  # the dispatcher's own loop delivers in embedded mode
    try:
        configured_app(settings).send_task(
            DELIVER_TASK,
            args=[delivery_id],
            queue=DELIVERY_QUEUE,
            routing_key=DELIVERY_QUEUE,
            priority=PRIORITY_RANK["routine"],
        )
    except Exception as err:  # noqa: BLE001
        log.warning("delivery %s not published (%s)", delivery_id, describe_error(err))
        return False
    return True
