"""Schema migrations: the revisions agree with the models, a database of the previous release
upgrades with every row kept, and a database from a newer release stops the start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from node.core import migrations
from node.core.db import Base, dispose_engines, engine_for, init_db, load_tables, schema_revision

REPO_ROOT = Path(__file__).resolve().parent.parent
# The last release made its tables with create_all; revision 0001 is its schema.
PREVIOUS_RELEASE = "df2dddf"

# Run with the previous release's code on PYTHONPATH: its init_db makes the database, then two
# rows go into every table (each column given a value of its type; ids 1 and 2, so every
# foreign key finds its row), and every table's rows are printed as JSON.
FILL = """
import datetime, json, sys
from sqlalchemy import Boolean, DateTime, Float, Integer, insert, select
from node.core import db

def value(column, n):
    kind = column.type
    if isinstance(kind, Boolean):
        return n % 2 == 0
    if isinstance(kind, DateTime):
        return datetime.datetime(2026, 1, n, 12, 30, tzinfo=datetime.timezone.utc)
    if isinstance(kind, Integer):
        return n
    if isinstance(kind, Float):
        return n + 0.5
    return f"{n}-{column.name}"[: getattr(kind, "length", None) or 200]

engine = db.init_db(sys.argv[1])
with engine.begin() as conn:
    for table in db.Base.metadata.sorted_tables:
        for n in (1, 2):
            conn.execute(insert(table).values({c.name: value(c, n) for c in table.columns}))
with engine.connect() as conn:
    rows = {
        table.name: {"columns": [c.name for c in table.columns],
                     "rows": [[str(v) for v in row] for row in conn.execute(select(table).order_by(*table.primary_key))]}
        for table in db.Base.metadata.sorted_tables
    }
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's ``node`` package, exported from git into a folder of its own."""
    folder = tmp_path_factory.mktemp("previous-release")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous release cannot be exported")
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", PREVIOUS_RELEASE, "node"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} (the previous release) is not in this clone (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def _made_by_previous_release(url: str, code: Path) -> dict:
    """Run the previous release's init_db on ``url`` and fill every table; the rows it wrote."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    run = subprocess.run(
        [sys.executable, "-c", FILL, url], cwd=code, env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def _rows_now(url: str, columns_of: dict[str, list[str]]) -> dict:
    load_tables()
    with engine_for(url).connect() as conn:
        return {
            name: {
                "columns": columns,
                "rows": [
                    [str(v) for v in row]
                    for row in conn.execute(
                        select(*(Base.metadata.tables[name].c[c] for c in columns)).order_by(
                            *Base.metadata.tables[name].primary_key
                        )
                    )
                ],
            }
            for name, columns in columns_of.items()
        }


def _assert_upgrades_keeping_every_row(url: str, code: Path) -> None:
    before = _made_by_previous_release(url, code)
    assert schema_revision(url) is None  # create_all made it: no revision yet
    assert set(before) == set(migrations._scripts().get_revision("0001").module.TABLES)
    assert all(len(table["rows"]) == 2 for table in before.values())

    init_db(url)

    assert schema_revision(url) == migrations.head()
    assert _rows_now(url, {name: table["columns"] for name, table in before.items()}) == before
    with engine_for(url).connect() as conn:
        assert migrations.differences(conn, Base.metadata) == []


def test_a_previous_release_sqlite_database_upgrades_and_keeps_every_row(tmp_path, previous_release):
    _assert_upgrades_keeping_every_row(f"sqlite:///{tmp_path / 'index.db'}", previous_release)


@pytest.mark.postgres
def test_a_previous_release_postgresql_database_upgrades_and_keeps_every_row(postgres_url, previous_release):
    _assert_upgrades_keeping_every_row(postgres_url, previous_release)


def test_the_models_and_the_migrations_agree_on_sqlite(tmp_path):
    # A model changed without a revision fails here: `ainode db revision "what changed"` writes one.
    url = f"sqlite:///{tmp_path / 'index.db'}"
    init_db(url)
    with engine_for(url).connect() as conn:
        assert migrations.differences(conn, Base.metadata) == []


@pytest.mark.postgres
def test_the_models_and_the_migrations_agree_on_postgresql(postgres_url):
    init_db(postgres_url)
    with engine_for(postgres_url).connect() as conn:
        assert migrations.differences(conn, Base.metadata) == []


def test_the_revisions_form_one_line():
    # Two branches that each added a revision after the same one leave two heads: renumber one.
    scripts = migrations._scripts()
    assert len(scripts.get_heads()) == 1
    assert [r.revision for r in scripts.walk_revisions()][-1] == migrations.CREATE_ALL_REVISION


def test_a_database_from_a_newer_release_stops_the_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    init_db(url)
    with engine_for(url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    dispose_engines()
    with pytest.raises(migrations.SchemaError, match="revision 9999.*newer release"):
        init_db(url)
    config = tmp_path / "ainode.yaml"
    config.write_text(f"database:\n  url: {url}\n")
    for command in (["db", "current"], ["db", "upgrade"]):
        run = subprocess.run(
            [sys.executable, "-m", "node.cli", *command, "-c", str(config)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 1 and "newer release" in run.stderr, (command, run.stdout, run.stderr)


def test_db_upgrade_and_current_commands(tmp_path):
    config = tmp_path / "ainode.yaml"
    url = f"sqlite:///{tmp_path / 'index.db'}"
    config.write_text(f"database:\n  url: {url}\n")

    def ainode(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "db", *args, "-c", str(config)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            check=False,
        )

    before = ainode("current")
    assert before.returncode == 1 and "no schema revision" in before.stdout
    upgraded = ainode("upgrade")
    assert upgraded.returncode == 0 and f"schema at revision {migrations.head()} (was empty)" in upgraded.stdout
    after = ainode("current")
    assert after.returncode == 0 and "up to date" in after.stdout
    assert set(Base.metadata.tables) <= set(inspect(engine_for(url)).get_table_names())


def test_an_older_database_missing_indexes_gets_them(tmp_path):
    # Made by a release before df2dddf: create_all left out indexes added to a table later.
    url = f"sqlite:///{tmp_path / 'index.db'}"
    init_db(url)
    with engine_for(url).begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("DROP INDEX ix_studies_ready_at"))
    dispose_engines()
    init_db(url)
    assert "ix_studies_ready_at" in {i["name"] for i in inspect(engine_for(url)).get_indexes("studies")}
    assert schema_revision(url) == migrations.head()


def test_a_database_with_only_some_tables_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    with engine_for(url).begin() as conn:
        conn.execute(text("CREATE TABLE studies (id INTEGER PRIMARY KEY)"))
    with pytest.raises(migrations.SchemaError, match="not deliveries"):
        init_db(url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_database_is_migrated_too(url):
    engine = init_db(url)
    with engine.connect() as conn:
        assert migrations.current_revision(conn) == migrations.head()
    dispose_engines()
