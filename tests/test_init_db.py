"""init_db when several processes start together (the node, its workers, ``ainode status``)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text

from node.core import migrations
from node.core.db import TABLE_MODULES, Base, dispose_engines, engine_for, init_db, schema_revision, sqlite_file
from tests.helpers import REPO_ROOT, NodeProcess, free_port, port_open, wait_for

PROCESSES = 6
ROUNDS = 3
# `ainode serve` and `ainode worker` started together on a fresh database: the issue saw the node
# die in 2 of 7 such starts (bench/time_to_result.py), as compose starts them.
RACE_ROUNDS = 5

# Each process imports everything and connects first, then waits for the start file: every
# init_db begins within a few milliseconds of the others, on a database that has no tables yet.
CHILD = """
import logging, os, sys, time
from node.core import db
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
for module in db.TABLE_MODULES:
    __import__(module)
url, ready, go = sys.argv[1:4]
db.engine_for(url).connect().close()
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
db.init_db(url)
"""


def _init_together(url: str, folder: Path) -> list[str]:
    """Run init_db on ``url`` in PROCESSES processes at once; every one must succeed. Their logs."""
    folder.mkdir()
    go = folder / "go"
    ready = [folder / f"ready-{n}" for n in range(PROCESSES)]
    children = [
        # cwd: the node package comes from PYTHONPATH (the code under test), not the folder.
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(flag), str(go)],
            cwd=folder,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        # Wait for every process to be ready (or to have failed before it got there).
        while not all(flag.exists() or child.poll() is not None for flag, child in zip(ready, children)):
            try:
                children[0].wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                pass
        go.touch()
        failures, logs = [], []
        for child in children:
            _, err = child.communicate(timeout=300)  # a guard against a hang, not a time limit
            logs.append(err)
            if child.returncode != 0:
                failures.append(_error_line(err) or f"exit {child.returncode}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert not failures, f"{len(failures)} of {PROCESSES} processes failed: {failures}"
    return logs


def _error_line(stderr: str) -> str:
    """The exception a failed process ended with, as its traceback names it."""
    raised = [line for line in stderr.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Violation)\b", line)]
    return raised[-1][:200] if raised else ""


def _assert_schema_complete(url: str) -> None:
    for module in TABLE_MODULES:
        importlib.import_module(module)
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        assert set(Base.metadata.tables) <= set(inspector.get_table_names())
        for table in Base.metadata.sorted_tables:
            made = {index["name"] for index in inspector.get_indexes(table.name)}
            assert {index.name for index in table.indexes} <= made, table.name
    finally:
        engine.dispose()
    assert schema_revision(url) == migrations.head()


def _assert_one_migrated(logs: list[str]) -> None:
    # One process migrated; every other one found the schema made, having waited on the lock
    # (and said so) or come after the commit.
    assert sum("schema upgraded from an empty database" in log for log in logs) == 1, logs
    assert all("schema upgraded" in log or "waiting for the schema migration" in log or not log for log in logs), logs


@pytest.mark.postgres
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_starting_together_on_postgresql_all_create_the_schema(postgres_url, tmp_path, round_):
    logs = _init_together(postgres_url, tmp_path / "barrier")
    _assert_schema_complete(postgres_url)
    _assert_one_migrated(logs)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_starting_together_on_sqlite_all_create_the_schema(tmp_path, round_):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    logs = _init_together(url, tmp_path / "barrier")
    _assert_schema_complete(url)
    _assert_one_migrated(logs)


@pytest.mark.postgres
def test_init_db_upgrades_an_older_postgresql_database(postgres_url):
    # The missing index and the text job_id are put right by revision 0002, under the schema lock.
    init_db(postgres_url)
    with engine_for(postgres_url).begin() as conn:
        # As a release before df2dddf left it: made by create_all, so no schema revision either.
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("DROP INDEX ix_studies_ready_at"))
        conn.execute(text("ALTER TABLE deliveries ALTER COLUMN job_id TYPE text"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN series_uids"))
    dispose_engines()
    init_db(postgres_url)
    inspector = inspect(engine_for(postgres_url))
    assert "series_uids" in {c["name"] for c in inspector.get_columns("jobs")}
    assert "ix_studies_ready_at" in {index["name"] for index in inspector.get_indexes("studies")}
    assert str(next(c["type"] for c in inspector.get_columns("deliveries") if c["name"] == "job_id")) == "INTEGER"


# --- `ainode serve` and `ainode worker` started at the same instant ------------------------------


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the workers (their Celery broker)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    assert wait_for(lambda: port_open(port), 30)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait()


class DatabaseHeld:
    """Holds a fresh database so that the processes starting on it block at their first schema
    change; released once all of them wait there, they go on at the same instant.

    The two processes reach init_db seconds apart (each imports its own stages first), so started
    together they seldom meet in it; the database itself is the barrier, nothing in them is changed.
    SQLite: the write lock of a WAL database, held; readers go on, and a process blocks at its first
    write (in SQLite's busy wait: a sleep) or on the schema lock file; /proc shows the database open
    and the process asleep in the kernel. PostgreSQL: an uncommitted DROP SCHEMA public blocks every
    CREATE TABLE (and the schema lock's waiters wait on that lock); pg_stat_activity shows them.
    """

    def __init__(self, url: str):
        self.url = url
        self.path = sqlite_file(url)
        if self.path:
            self._sqlite = sqlite3.connect(self.path, isolation_level=None)
            self._sqlite.execute("PRAGMA journal_mode=WAL")  # as every ainode process sets it
            self._sqlite.execute("BEGIN IMMEDIATE")
        else:
            self._engine = create_engine(url)
            self._conn = self._engine.connect()
            self._conn.exec_driver_sql("DROP SCHEMA public CASCADE")

    def waited_on_by(self, pids: list[int]) -> bool:
        """True when every process in ``pids`` is blocked on the database."""
        if self.path:
            return all(self._has_open(pid, self.path) and self._asleep(pid) for pid in pids)
        with self._engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).scalar()
        return waiting >= len(pids)

    def release(self) -> None:
        """Let the waiting processes go (the database is as fresh as before)."""
        if self.path:
            self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
        else:
            self._conn.rollback()
            self._conn.close()
            self._engine.dispose()

    @staticmethod
    def _asleep(pid: int) -> bool:
        # In SQLite's busy wait (nanosleep) or waiting for a file lock (flock).
        try:
            where = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            return False
        return "nanosleep" in where or "lock" in where

    @staticmethod
    def _has_open(pid: int, path: str) -> bool:
        try:
            return any(os.path.realpath(fd.path) == os.path.realpath(path) for fd in os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            return False


def _serve_and_worker_together(url: str, broker: str, folder: Path, code: Path = REPO_ROOT) -> None:
    """Start `ainode serve` and `ainode worker` (the code in ``code``) on a fresh database at once,
    released together into init_db; both must come up."""
    node = NodeProcess(folder, {"database": {"url": url}, "broker": {"url": broker}})
    commands = {
        "serve": ["serve", "-c", str(node.config_path)],
        "worker": ["worker", "-c", str(node.config_path), "--concurrency", "1"],
    }
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("AINODE_CONFIG", None)
    logs = {name: folder / f"{name}.log" for name in commands}
    held = DatabaseHeld(url)
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "node.cli", *argv],
            cwd=code,
            env=env,
            stdout=logs[name].open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name, argv in commands.items()
    }
    serve, worker = started["serve"], started["worker"]
    try:
        try:
            pids = [proc.pid for proc in started.values()]
            wait_for(lambda: held.waited_on_by(pids) or any(p.poll() is not None for p in started.values()), 300)
        finally:
            held.release()
        # Up: the node's DICOM port accepts, the Celery worker says it is ready (or either died).
        wait_for(lambda: serve.poll() is not None or port_open(node.port), 300)
        wait_for(lambda: worker.poll() is not None or " ready." in logs["worker"].read_text(errors="replace"), 300)
        text_of = {name: path.read_text(errors="replace")[-3000:] for name, path in logs.items()}
        assert serve.poll() is None and port_open(node.port), text_of["serve"]
        assert worker.poll() is None and " ready." in text_of["worker"], text_of["worker"]
    finally:
        for proc in started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in started.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.parametrize("round_", range(RACE_ROUNDS))
def test_serve_and_worker_started_together_on_a_fresh_sqlite_database(tmp_path, broker_url, round_):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    _serve_and_worker_together(url, broker_url, tmp_path)
    assert schema_revision(url) == migrations.head()


@pytest.mark.postgres
@pytest.mark.parametrize("round_", range(RACE_ROUNDS))
def test_serve_and_worker_started_together_on_a_fresh_postgresql_database(postgres_url, broker_url, tmp_path, round_):
    _serve_and_worker_together(postgres_url, broker_url, tmp_path)
    assert schema_revision(postgres_url) == migrations.head()
