"""The job queue with a real Redis and real `ainode worker` processes: priorities, faults, time limits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from node import assembler
from node.core.clock import utcnow
from node.core.db import engine_for, session_scope
from node.jobs import reconciler
from node.jobs.table import Job, status_summary
from tests.helpers import wait_for
from tests.jobs.conftest import add_study

pytestmark = pytest.mark.slow


def _rule(name: str, analysis: str = "count-instances", priority: str = "routine", **params) -> dict:
    match = {"study_description": name.upper()}
    return {
        "name": name,
        "match": match,
        "priority": priority,
        "analyses": [{"name": analysis, "params": params} if params else analysis],
    }


def _job(settings, job_id: int) -> Job:
    with session_scope(engine_for(settings.database.url)) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _all_jobs(settings) -> list[Job]:
    with session_scope(engine_for(settings.database.url)) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        for j in jobs:
            session.expunge(j)
        return jobs


def _route(settings, uid: str, description: str) -> list[Job]:
    add_study(settings, study_uid=uid, description=description, age=timedelta(seconds=10))
    assembler.tick(settings)
    return [j for j in _all_jobs(settings) if j.study_uid == uid]


def test_routed_study_runs_on_a_worker(make_settings, redis_server, workers, node_dir):
    settings = make_settings(redis_server.url, rules=[_rule("count")])
    worker = workers(node_dir / "ainode.yaml")
    [job] = _route(settings, "1.2.4.1", "COUNT")
    assert job.published_at is not None and job.task_id == f"job-{job.id}-1"
    assert wait_for(lambda: _job(settings, job.id).state == "succeeded", 120), worker.output()[-3000:]
    done = _job(settings, job.id)
    assert done.attempts == 1 and '"instances": 3' in done.result


def test_stat_overtakes_routine(make_settings, redis_server, workers, node_dir):
    settings = make_settings(
        redis_server.url,
        rules=[_rule("slow", "sleep", seconds=0.2), _rule("urgent", "sleep", priority="stat", seconds=0.2)],
    )
    routine = [_route(settings, f"1.2.4.2{i}", "SLOW")[0] for i in range(3)]
    [stat] = _route(settings, "1.2.4.29", "URGENT")  # queued last, while no worker runs
    workers(node_dir / "ainode.yaml", concurrency=1)
    ids = [j.id for j in routine] + [stat.id]
    assert wait_for(lambda: all(_job(settings, i).state == "succeeded" for i in ids), 180)
    started = sorted(ids, key=lambda i: _job(settings, i).started_at)
    assert started[0] == stat.id


def test_worker_killed_mid_job_runs_again_and_completes_once(make_settings, redis_server, workers, node_dir):
    record = node_dir / "completions.txt"
    settings = make_settings(redis_server.url, rules=[_rule("long", "sleep", seconds=6, record=str(record))])
    first = workers(node_dir / "ainode.yaml")
    [job] = _route(settings, "1.2.4.3", "LONG")
    assert wait_for(lambda: _job(settings, job.id).state == "running", 120), first.output()[-3000:]
    first.kill9()
    assert _job(settings, job.id).state == "running"  # nobody has noticed yet
    second = workers(node_dir / "ainode.yaml")
    # The heartbeat stops; the reconciler publishes the job again and the new worker takes it over.
    assert wait_for(
        lambda: reconciler.reconcile(settings) >= 0 and _job(settings, job.id).state == "succeeded", 180, interval=1.0
    ), second.output()[-3000:]
    done = _job(settings, job.id)
    assert done.attempts == 2
    assert record.read_text().splitlines() == [f"job {job.id} attempt 2 pid {done.worker.split(':')[1]}"]


def test_broker_flushed_with_jobs_queued_every_job_completes_once(make_settings, redis_server, workers, node_dir):
    record = node_dir / "completions.txt"
    settings = make_settings(redis_server.url, rules=[_rule("flush", "sleep", seconds=0.1, record=str(record))])
    jobs = [_route(settings, f"1.2.4.4{i}", "FLUSH")[0] for i in range(4)]
    assert all(j.published_at for j in jobs)
    redis_server.flushall()  # the broker forgets every queued message
    worker = workers(node_dir / "ainode.yaml")
    assert wait_for(
        lambda: reconciler.reconcile(settings) >= 0 and all(_job(settings, j.id).state == "succeeded" for j in jobs),
        180,
        interval=1.0,
    ), str([(j.id, _job(settings, j.id).state, _job(settings, j.id).error) for j in jobs]) + worker.output()[-3000:]
    lines = record.read_text().splitlines()
    assert sorted(int(line.split()[1]) for line in lines) == sorted(j.id for j in jobs)  # each exactly once


def test_broker_restart_loses_nothing(make_settings, redis_server, workers, node_dir):
    settings = make_settings(redis_server.url, rules=[_rule("restart")])
    redis_server.stop()
    # Broker down: the job is committed, its publish fails and is left to the reconciler.
    [job] = _route(settings, "1.2.4.5", "RESTART")
    assert _job(settings, job.id).state == "queued" and _job(settings, job.id).published_at is None
    assert reconciler.reconcile(settings) == 0
    redis_server.start()
    workers(node_dir / "ainode.yaml")
    assert wait_for(
        lambda: reconciler.reconcile(settings) >= 0 and _job(settings, job.id).state == "succeeded", 180, interval=1.0
    )
    assert _job(settings, job.id).attempts == 1


def test_hanging_analysis_is_stopped_by_its_time_limit(make_settings, redis_server, workers, node_dir):
    settings = make_settings(
        redis_server.url,
        rules=[_rule("soft", "sleep", seconds=600), _rule("hang", "sleep", seconds=600, ignore_soft_limit=True)],
        analyses=[{"name": "sleep", "soft_time_limit_s": 2, "time_limit_s": 4}],
    )
    worker = workers(node_dir / "ainode.yaml")
    [soft] = _route(settings, "1.2.4.61", "SOFT")
    [hang] = _route(settings, "1.2.4.62", "HANG")
    assert wait_for(
        lambda: _job(settings, soft.id).state == "failed" and _job(settings, hang.id).state == "failed", 240
    ), worker.output()[-3000:]
    assert _job(settings, soft.id).error == "soft time limit of 2 s exceeded; the analysis was stopped"
    assert _job(settings, hang.id).error == "hard time limit of 4 s exceeded; the analysis was stopped"
    with session_scope(engine_for(settings.database.url)) as session:
        summary = status_summary(session)
    assert {f["id"] for f in summary["failed"]} == {soft.id, hang.id}


def test_failing_analysis_retries_then_is_dead(make_settings, redis_server, workers, node_dir):
    # The diagnostic analysis `fail` raises on every attempt: bounded retries, then dead.
    settings = make_settings(
        redis_server.url,
        rules=[_rule("broken", "fail")],
        jobs={"max_attempts": 2, "heartbeat_timeout_s": 3, "reconcile_interval_s": 1},
    )
    worker = workers(node_dir / "ainode.yaml")
    [job] = _route(settings, "1.2.4.7", "BROKEN")
    assert wait_for(lambda: _job(settings, job.id).state == "dead", 180), worker.output()[-3000:]
    dead = _job(settings, job.id)
    assert dead.attempts == 2 and dead.error == "TransientJobError: diagnostic analysis 'fail' always fails"
    with session_scope(engine_for(settings.database.url)) as session:
        assert status_summary(session)["dead"][0]["id"] == job.id


@pytest.mark.postgres
def test_duplicate_messages_and_two_workers_on_postgres_run_each_job_once(
    make_settings, redis_server, workers, node_dir, postgres_url
):
    from node.jobs.broker import publish_job

    record = node_dir / "completions.txt"
    settings = make_settings(
        redis_server.url, database={"url": postgres_url}, rules=[_rule("dup", "sleep", seconds=0.5, record=str(record))]
    )
    jobs = [_route(settings, f"1.2.4.8{i}", "DUP")[0] for i in range(4)]
    for job in jobs:  # a second copy of every message (as after a reconciler re-publish)
        assert publish_job(settings, job.id)
    workers(node_dir / "ainode.yaml", concurrency=2)
    workers(node_dir / "ainode.yaml", concurrency=1)
    assert wait_for(lambda: all(_job(settings, j.id).state == "succeeded" for j in jobs), 180)
    assert wait_for(lambda: not reconciler.broker_task_ids(settings), 120)  # every copy consumed
    lines = record.read_text().splitlines()
    assert sorted(int(line.split()[1]) for line in lines) == sorted(j.id for j in jobs)
    assert all(_job(settings, j.id).attempts == 1 for j in jobs)


def test_pool_process_killed_mid_job_is_redelivered_by_celery(make_settings, redis_server, workers, node_dir):
    import os
    import signal

    record = node_dir / "completions.txt"
    # A long heartbeat timeout: only Celery's reject_on_worker_lost can bring this job back quickly.
    settings = make_settings(
        redis_server.url,
        rules=[_rule("child", "sleep", seconds=4, record=str(record))],
        jobs={"max_attempts": 3, "heartbeat_timeout_s": 3600, "reconcile_interval_s": 1},
    )
    worker = workers(node_dir / "ainode.yaml")
    [job] = _route(settings, "1.2.4.9", "CHILD")
    assert wait_for(lambda: _job(settings, job.id).state == "running", 120), worker.output()[-3000:]
    first_pid = int(_job(settings, job.id).worker.split(":")[1])
    os.kill(first_pid, signal.SIGKILL)  # the pool process running the analysis dies; the worker lives
    assert wait_for(lambda: _job(settings, job.id).state == "succeeded", 180), worker.output()[-3000:]
    done = _job(settings, job.id)
    assert done.attempts == 2 and int(done.worker.split(":")[1]) != first_pid
    assert len(record.read_text().splitlines()) == 1


def test_reconciler_republishes_only_what_the_broker_lost(make_settings, redis_server):
    from datetime import timedelta as td

    from sqlalchemy import update

    settings = make_settings(
        redis_server.url, rules=[_rule("r1"), _rule("s1", priority="stat"), _rule("l1", priority="low")]
    )
    jobs = [
        _route(settings, "1.2.4.101", "R1")[0],
        _route(settings, "1.2.4.102", "S1")[0],
        _route(settings, "1.2.4.103", "L1")[0],
    ]
    with session_scope(engine_for(settings.database.url)) as session:  # as if published a minute ago
        session.execute(update(Job).values(published_at=utcnow() - td(seconds=60)))
    present = reconciler.broker_task_ids(settings)
    assert present == {j.task_id for j in jobs}  # found in every priority list (stat, routine, low)
    assert reconciler.reconcile(settings) == 0
    redis_server.flushall()
    assert reconciler.reconcile(settings) == 3
    assert reconciler.broker_task_ids(settings) == {f"job-{j.id}-2" for j in jobs}
