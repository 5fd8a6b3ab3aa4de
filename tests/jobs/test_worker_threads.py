"""Each Celery pool process gets its share of the CPU cores for torch / OpenMP / BLAS threads."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy

from node.jobs import embedded
from workers import tasks
from workers import worker as celery_app


def test_threads_are_shared_among_pool_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [celery_app.threads_per_process(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_pool_processes_import_torch_with_their_share(monkeypatch):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    assert celery_app.share_cpu_threads(2) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # waiting threads sleep, not spin
    # A process started now (as a pool process importing torch after the fork) uses 2 threads.
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "2"
    # The operator's own setting wins.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert celery_app.share_cpu_threads(1) == 3


def test_the_worker_entry_leaves_torch_unimported_until_the_threads_are_set():
    # torch, OpenMP and BLAS read their thread settings when first imported: `ainode worker` must
    # not import them before share_cpu_threads has run.
    probe = "import sys, workers.worker; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_workers_do_not_ask_for_huge_pages_unless_the_operator_does(monkeypatch):
    """numpy's huge-page advice stalled a worker's first large study in memory compaction: the
    pool processes, the embedded child and this process turn it off; the operator may keep it."""
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    probe = "import numpy; print(numpy._core.multiarray._set_madvise_hugepage(True))"
    celery_app.small_pages()
    assert os.environ["NUMPY_MADVISE_HUGEPAGE"] == "0"
    assert numpy._core.multiarray._set_madvise_hugepage(False) is False  # already imported: told
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
    assert embedded.child_environment()["NUMPY_MADVISE_HUGEPAGE"] == "0"
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    celery_app.small_pages()
    assert numpy._core.multiarray._set_madvise_hugepage(False) is True
    assert embedded.child_environment()["NUMPY_MADVISE_HUGEPAGE"] == "1"


def test_cyclic_garbage_is_collected_after_the_job_not_during_it():
    import gc
    import weakref

    class Node:
        pass

    collected = []
    assert gc.isenabled()
    collections = tasks.JobCollections(full_every=2)
    with collections.after_job():
        assert not gc.isenabled()  # no full collection can start inside the job
        cycle = Node()
        cycle.self = cycle
        weakref.finalize(cycle, collected.append, "cycle")
        del cycle
        for _ in range(100_000):  # allocations that would start collections if they were on
            Node()
        assert collected == []  # a cycle: only the collector frees it, and it waits
        with collections.after_job():  # nested: leaves the outer pause alone
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    assert collected == ["cycle"]  # collected when the job ended
    # What survived the job is out of the collector's view; a cycle of those objects that became
    # garbage later is freed at the next full collection (every full_every jobs).
    assert gc.get_freeze_count() > 0
    survivor = Node()
    survivor.self = survivor
    weakref.finalize(survivor, collected.append, "survivor")
    with collections.after_job():
        pass
    del survivor  # frozen now: a later ordinary collection does not see it
    with collections.after_job():  # an ordinary collection: the frozen cycle stays
        pass
    assert collected == ["cycle"]
    with collections.after_job():  # the full one, full_every jobs after the last
        pass
    assert collected == ["cycle", "survivor"]
    assert collections.until_full == collections.full_every
    gc.unfreeze()
