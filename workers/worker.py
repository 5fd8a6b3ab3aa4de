"""The ``ainode worker`` entry: a Celery worker consuming the gpu and cpu queues of the node's app.

The Celery app and its reliability settings live with the jobs (``node.jobs.broker``); this side
registers the tasks (``workers.tasks``), shares the cores among the pool processes and starts the
worker.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery.signals import setup_logging, worker_process_init

from node.core.db import dispose_engines, init_db
from node.core.logs import configure_logging
from node.core.migrations import SchemaError
from node.core.settings import Settings
from node.jobs.broker import app, configured_app

log = logging.getLogger("ainode.worker")


@setup_logging.connect
def _our_logging(loglevel: int | str | None = None, **_: Any) -> None:
    # Connected, this replaces Celery's own handlers: the worker logs in the node's format.
    configure_logging(loglevel or "INFO")


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool process must not share the parent's database connections.
    dispose_engines()
    # Celery turned on logging.captureWarnings after setting up logging; ours routes warnings the
    # same way and withholds what the DICOM libraries say in them.
    configure_logging()


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
    small_pages()
    return int(os.environ["OMP_NUM_THREADS"])


def small_pages() -> None:
    """Turn off numpy's transparent-huge-page advice for this process and its children, unless
    the operator set ``NUMPY_MADVISE_HUGEPAGE``.

    numpy asks for huge pages on every large array. Where the kernel compacts memory to find
    them on first touch (``defrag`` = ``madvise``, Debian's default) a worker's first study of a
    new size stalled there: the ct-segmentation postprocess of a 300 x 512² CT took 1.8-2.2 s
    instead of 0.6-0.8 s on the 2-core machine (docs/benchmarks.md). With 4 KiB pages it takes
    about 1 s the first time and the same 0.6-0.8 s after.
    """
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    numpy = sys.modules.get("numpy")  # read at import: one imported already is told directly
    setter = getattr(getattr(getattr(numpy, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)
    if setter is not None:
        setter(os.environ["NUMPY_MADVISE_HUGEPAGE"] != "0")


def run_worker(settings: Settings, queues: list[str], concurrency: int) -> int:
    """Run a Celery worker consuming the given queues until stopped; returns its exit code."""
    configure_logging()
    if not settings.broker.url:
        log.error(
            "broker.url is empty: `ainode serve` runs jobs itself (embedded worker); "
            "set broker.url to run separate workers"
        )
        return 2
    log.info("%d pool process(es), %d CPU thread(s) each", max(1, concurrency), share_cpu_threads(concurrency))
    # The node may be creating the same tables this instant (both start together): init_db
    # serialises the schema change, so this waits for the node's and finds the tables made.
    try:
        init_db(settings.database.url)
    except SchemaError as err:
        log.error("cannot start: %s", err)
        return 2
    configured_app(settings)
    # The tasks (and with them torch, MONAI, OpenMP) are imported only now: they read the thread
    # settings share_cpu_threads just made when first imported; imported at the top of this module
    # they came first and the settings did not apply (see docs/benchmarks.md, the layout change).
    import workers.tasks  # noqa: F401, PLC0415 - registers the tasks on the app

    queues = [q.strip() for q in queues if q.strip()] or ["gpu", "cpu"]
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(max(1, concurrency)),
        "--pool",
        "prefork",
        "--loglevel",
        "INFO",
        "--hostname",
        f"ainode-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
