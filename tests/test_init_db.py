"""init_db when several processes start together (the node, its workers, ``ainode status``)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from node.core.db import TABLE_MODULES, Base, dispose_engines, engine_for, init_db

PROCESSES = 6
ROUNDS = 3

# Each process imports everything and connects first, then waits for the start file: every
# init_db begins within a few milliseconds of the others, on a database that has no tables yet.
CHILD = """
import os, sys, time
from node.core import db
for module in db.TABLE_MODULES:
    __import__(module)
url, ready, go = sys.argv[1:4]
db.engine_for(url).connect().close()
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
db.init_db(url)
"""


def _init_together(url: str, folder: Path) -> None:
    """Run init_db on ``url`` in PROCESSES processes at once; every one must succeed."""
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
        failures = []
        for child in children:
            _, err = child.communicate(timeout=300)  # a guard against a hang, not a time limit
            if child.returncode != 0:
                failures.append(_error_line(err) or f"exit {child.returncode}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert not failures, f"{len(failures)} of {PROCESSES} processes failed: {failures}"


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


@pytest.mark.postgres
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_starting_together_on_postgresql_all_create_the_schema(postgres_url, tmp_path, round_):
    _init_together(postgres_url, tmp_path / "barrier")
    _assert_schema_complete(postgres_url)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_starting_together_on_sqlite_all_create_the_schema(tmp_path, round_):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    _init_together(url, tmp_path / "barrier")
    _assert_schema_complete(url)


@pytest.mark.postgres
def test_init_db_upgrades_an_older_postgresql_database(postgres_url):
    # The missing index and the text job_id are put right by revision 0002, under the schema lock.
    init_db(postgres_url)
    with engine_for(postgres_url).begin() as conn:
        # As a release before df2dddf left it: made by create_all, so no schema revision either.
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("DROP INDEX ix_studies_ready_at"))
        conn.execute(text("ALTER TABLE deliveries ALTER COLUMN job_id TYPE text"))
    dispose_engines()
    init_db(postgres_url)
    inspector = inspect(engine_for(postgres_url))
    assert "ix_studies_ready_at" in {index["name"] for index in inspector.get_indexes("studies")}
    assert str(next(c["type"] for c in inspector.get_columns("deliveries") if c["name"] == "job_id")) == "INTEGER"
