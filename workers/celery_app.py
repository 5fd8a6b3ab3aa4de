"""The Celery application, configured from the node's settings, and the ``ainode worker`` entry.

Reliability settings for long GPU tasks that must be neither lost nor run twice:
- acks_late + reject_on_worker_lost: a message is acknowledged only after the task ends, and a
  worker killed mid-task puts it back on the queue;
- prefetch multiplier 1: a worker holds no more messages than it is running;
- broker visibility timeout longer than the longest hard time limit: Redis does not hand a slow
  job to a second worker while the first still runs it;
- gpu (analyses) and cpu (result delivery) queues; Redis priority steps so STAT comes first.
The job row in the database stays the truth; messages carry the job id only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from node.core.settings import Settings

log = logging.getLogger("ainode.worker")

app = Celery("ainode")
app.conf.update(include=["workers.tasks"])

# The settings this process runs with (set by configured_app / run_worker; inherited by forks).
SETTINGS: Settings | None = None
_configured_for: dict[str, Any] | None = None


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration derived from the node settings."""
    from node.jobs.table import ANALYSIS_QUEUE, DELIVERY_QUEUE, PRIORITY_STEPS

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
        "task_queues": [Queue(ANALYSIS_QUEUE, routing_key=ANALYSIS_QUEUE),
                        Queue(DELIVERY_QUEUE, routing_key=DELIVERY_QUEUE)],
        "task_default_queue": ANALYSIS_QUEUE,
        "task_default_priority": 3,
        "task_routes": {"ainode.deliver": {"queue": DELIVERY_QUEUE}, "ainode.run_analysis": {"queue": ANALYSIS_QUEUE}},
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
    global SETTINGS, _configured_for
    config = celery_config(settings)
    # Compare the configuration itself, not id(settings): ids are reused after garbage collection.
    if _configured_for != config:
        # Pooled broker connections were opened for the previous broker: close them, or a
        # publisher in a long-lived process keeps talking to the old (maybe dead) broker.
        _drop_broker_connections()
        app.conf.update(config)
        _configured_for = config
    SETTINGS = settings
    return app


def current_settings() -> Settings:
    """The settings of this worker process (from run_worker, or $AINODE_CONFIG when started by celery)."""
    global SETTINGS
    if SETTINGS is None:
        from pathlib import Path

        from node.core.settings import load_settings, resolve_paths

        path = os.environ.get("AINODE_CONFIG")
        loaded = load_settings(path)
        SETTINGS = resolve_paths(loaded, Path(path).resolve().parent if path else Path.cwd())
    return SETTINGS


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool process must not share the parent's database connections.
    from node.core.db import dispose_engines

    dispose_engines()


def _init_db_beside_node(url: str) -> None:
    # The node may be creating the same tables this instant (both start together); SQLite then
    # reports "table already exists" to the slower one: trying again sees the finished schema.
    import time

    from sqlalchemy.exc import OperationalError

    from node.core.db import init_db

    for attempt in range(5):
        try:
            init_db(url)
            return
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.5)


def threads_per_process(concurrency: int) -> int:
    """CPU threads for each pool process's math libraries (torch, OpenMP, BLAS): the cores this
    process may use shared among the pool processes, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, concurrency))


def share_cpu_threads(concurrency: int) -> int:
    """Give each pool process its share of the cores, unless the operator set the variables.

    torch, OpenMP and BLAS each default to one thread per core in every process, so N pool
    processes on a small CPU would run N x cores threads that wait on each other. OpenMP threads
    that wait also spin by default, taking the cores from the threads that have work whenever
    anything else runs on the machine (the node, the PACS, other workers): with PASSIVE they
    sleep. On the shared 2-core machine at load 4 that made the segmentation's sliding-window
    inference 1.4-2.8 s instead of 4.1-4.8 s. The pool processes read these variables when they
    first import torch (after the fork).
    """
    threads = threads_per_process(concurrency)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return int(os.environ["OMP_NUM_THREADS"])


def run_worker(settings: Settings, queues: list[str], concurrency: int) -> int:
    """Run a Celery worker consuming the given queues until stopped; returns its exit code."""
    if not settings.broker.url:
        log.error("broker.url is empty: `ainode serve` runs jobs itself (embedded worker); "
                  "set broker.url to run separate workers")
        return 2
    log.info("%d pool process(es), %d CPU thread(s) each", max(1, concurrency), share_cpu_threads(concurrency))
    _init_db_beside_node(settings.database.url)
    configured_app(settings)
    import workers.tasks  # noqa: F401 - registers the tasks

    queues = [q.strip() for q in queues if q.strip()] or ["gpu", "cpu"]
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(max(1, concurrency)),
            "--pool", "prefork", "--loglevel", "INFO", "--hostname", f"ainode-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    try:
        app.worker_main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
