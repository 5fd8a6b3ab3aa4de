"""The job lifecycle: every transition, and the study's state that follows from them."""

from __future__ import annotations

from typing import Callable

import pytest

from node.core.db import database_session
from node.core.settings import Settings
from node.index import Study
from node.jobs import lifecycle
from node.jobs.table import DEAD, FAILED, QUEUED, RETRYING, RUNNING, SUCCEEDED, Job
from tests.jobs.conftest import add_study


def _routed_study_with_jobs(
    settings: Settings, uid: str, jobs: int = 1, max_attempts: int = 2
) -> tuple[int, list[int]]:
    study_pk = add_study(settings, study_uid=uid, state="routed")
    ids = []
    with database_session(settings.database.url) as session:
        for n in range(jobs):
            job = lifecycle.queue_job(
                session,
                settings,
                key=f"{uid}/{n}",
                analysis="count-instances",
                params={},
                study_pk=study_pk,
                study_uid=uid,
            )
            job.max_attempts = max_attempts
            session.flush()
            ids.append(job.id)
    return study_pk, ids


def _state(settings: Settings, model: type, pk: int) -> str:
    with database_session(settings.database.url) as session:
        return session.get(model, pk).state


def test_an_error_retries_while_attempts_remain_and_the_study_waits(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    study_pk, (job_id,) = _routed_study_with_jobs(settings, "1.2.3.10", max_attempts=2)
    claim = lifecycle.claim_job(settings, job_id)
    assert claim is not None and claim.attempt == 1 and _state(settings, Job, job_id) == RUNNING
    assert lifecycle.retry_or_bury(settings, claim, "ValueError: x", max_attempts=2) == RETRYING
    # The job will run again: its study is not done.
    assert _state(settings, Study, study_pk) == "routed"
    claim = lifecycle.claim_job(settings, job_id)
    assert claim is not None and claim.attempt == 2
    assert lifecycle.retry_or_bury(settings, claim, "ValueError: x", max_attempts=2) == DEAD
    assert _state(settings, Job, job_id) == DEAD and _state(settings, Study, study_pk) == "done"


def test_a_lost_claim_changes_nothing(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    _, (job_id,) = _routed_study_with_jobs(settings, "1.2.3.11")
    claim = lifecycle.claim_job(settings, job_id)
    stale = lifecycle.Claim(claim.job_id, claim.attempt, "elsewhere:1")
    assert not lifecycle.fail_job(settings, stale, "not mine")
    with database_session(settings.database.url) as session:
        assert not lifecycle.succeed_job(session, stale, {})
    assert _state(settings, Job, job_id) == RUNNING
    assert lifecycle.fail_job(settings, claim, "bad input")
    assert _state(settings, Job, job_id) == FAILED


def test_the_study_is_done_only_when_its_last_job_ends(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    study_pk, (first, second) = _routed_study_with_jobs(settings, "1.2.3.12", jobs=2)
    claim = lifecycle.claim_job(settings, first)
    with database_session(settings.database.url) as session:
        assert lifecycle.succeed_job(session, claim, {"instances": 3})
    assert _state(settings, Job, first) == SUCCEEDED and _state(settings, Study, study_pk) == "routed"
    lifecycle.claim_job(settings, second)
    # A worker process that died with its last attempt: dead, and the study is done.
    with database_session(settings.database.url) as session:
        session.get(Job, second).attempts = session.get(Job, second).max_attempts
    lifecycle.release_crashed_job(settings, second, "worker process exited with -9")
    assert _state(settings, Job, second) == DEAD and _state(settings, Study, study_pk) == "done"


def test_retry_and_rerun_are_refused_in_the_wrong_state(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    _, (job_id,) = _routed_study_with_jobs(settings, "1.2.3.13")
    with database_session(settings.database.url) as session:
        with pytest.raises(lifecycle.JobStateConflict):
            lifecycle.retry_job(session, job_id)
        with pytest.raises(lifecycle.JobStateConflict):
            lifecycle.rerun_job(session, settings, job_id)
        with pytest.raises(lifecycle.JobNotFound):
            lifecycle.retry_job(session, 999)
    claim = lifecycle.claim_job(settings, job_id)
    lifecycle.fail_job(settings, claim, "bad input")
    with database_session(settings.database.url) as session:
        job = lifecycle.retry_job(session, job_id)
        assert (job.state, job.attempts, job.error) == (QUEUED, 0, "")
    with database_session(settings.database.url) as session:
        with pytest.raises(lifecycle.JobStateConflict):  # queued again: nothing to re-run yet
            lifecycle.rerun_job(session, settings, job_id)
    lifecycle.fail_job(settings, lifecycle.claim_job(settings, job_id), "bad input")
    with database_session(settings.database.url) as session:
        new = lifecycle.rerun_job(session, settings, job_id)
        assert (new.state, new.supersedes_job_id, new.analysis) == (QUEUED, job_id, "count-instances")


def test_a_job_held_by_an_earlier_process_with_this_pid_is_taken_over(make_settings: Callable[..., Settings]) -> None:
    """A restarted container gives its new worker the host name and pid of the one killed: the
    job that one held is not this process's own, and is taken over (found in the compose test)."""
    settings = make_settings()
    _, (job_id,) = _routed_study_with_jobs(settings, "1.2.3.12", max_attempts=3)
    me = lifecycle.worker_identity()
    host, pid, started = me.split(":")
    assert started, "the start time tells processes with the same pid apart"
    earlier = f"{host}:{pid}:{int(started) - 1}"
    with database_session(settings.database.url) as session:
        job = session.get(Job, job_id)
        job.state, job.attempts, job.worker, job.heartbeat_at = RUNNING, 1, earlier, None
    assert lifecycle.owner_gone(earlier) and not lifecycle.owner_gone(me)
    claim = lifecycle.claim_job(settings, job_id)
    assert claim is not None and claim.attempt == 2 and claim.worker == me
    # While this process holds it, a duplicate message in this process is ignored.
    assert lifecycle.claim_job(settings, job_id) is None
