"""The change gate that lets idle background stages skip their database passes."""

from __future__ import annotations

import subprocess
import sys
import time

from sqlalchemy import text

from node import assembler
from node.core.db import ChangeGate, engine_for, init_db
from tests.jobs.conftest import add_study

CT_RULE = {"name": "ct-count", "match": {"modality": "CT"}, "analyses": ["count-instances"], "priority": "stat"}


def _commit_elsewhere(url: str) -> None:
    """A commit from another process, as a receiver's index batch would be."""
    code = (
        "import sys; from sqlalchemy import create_engine, text; e = create_engine(sys.argv[1]);\n"
        "with e.begin() as c: c.execute(text(\"UPDATE studies SET description = 'x' WHERE 1 = 0\"));"
        " c.execute(text('CREATE TABLE IF NOT EXISTS gate_probe (n INTEGER)'));"
        " c.execute(text('INSERT INTO gate_probe VALUES (1)'))"
    )
    subprocess.run([sys.executable, "-c", code, url], check=True)


def _gate_follows_commits(url: str) -> None:
    init_db(url)
    gate = ChangeGate(url, max_quiet_s=3600)
    assert gate.due()  # the first pass always runs
    assert not gate.due() and not gate.due()  # nothing committed since
    _commit_elsewhere(url)
    assert gate.due()
    assert not gate.due()
    with engine_for(url).begin() as conn:  # a commit from this process's own pool counts too
        conn.execute(text("INSERT INTO gate_probe VALUES (2)"))
    assert gate.due()


def test_sqlite_gate_opens_on_commits_from_other_processes(tmp_path):
    _gate_follows_commits(f"sqlite:///{tmp_path / 'index.db'}")


def test_postgresql_gate_opens_on_commits(postgres_url):
    _gate_follows_commits(postgres_url)


def test_gate_opens_after_max_quiet_without_commits(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    init_db(url)
    gate = ChangeGate(url, max_quiet_s=0.2)
    assert gate.due() and not gate.due()
    time.sleep(0.3)
    assert gate.due()


def test_in_memory_database_makes_every_pass_due():
    gate = ChangeGate("sqlite:///:memory:")
    assert gate.due() and gate.due()


def test_completion_ticker_skips_idle_passes_and_wakes_on_a_new_study(make_settings, monkeypatch):
    quiet = 3.0
    settings = make_settings(
        rules=[CT_RULE], timers={"series_quiet_s": quiet, "study_quiet_s": quiet, "force_complete_s": 600}
    )
    ticker = assembler.CompletionTicker(settings)
    passes = []
    real_tick = assembler.tick
    monkeypatch.setattr(assembler, "tick", lambda s: (passes.append(1), real_tick(s)))
    ticker()
    assert len(passes) == 1 and not ticker.in_progress  # empty index: idle from now on
    ticker()
    ticker()
    assert len(passes) == 1  # idle: skipped
    added = time.monotonic()
    add_study(settings, study_uid="1.2.3.900")  # waits for its quiet timer
    ticker()
    assert len(passes) == 2
    ticker()  # every tick runs while a study is in progress, commits or not, so its timers fire
    assert len(passes) == 3
    if time.monotonic() - added < quiet:  # (a very slow machine may already have completed it)
        assert ticker.in_progress and _state(settings, "1.2.3.900") == "received"
    time.sleep(max(0.0, quiet + 0.2 - (time.monotonic() - added)))
    ticker()
    ticker()
    assert not ticker.in_progress and _state(settings, "1.2.3.900") == "routed"
    done = len(passes)
    ticker()
    ticker()
    ticker()
    assert len(passes) <= done + 1  # idle again (at most one pass for the last pass's own commit)


def _state(settings, uid):
    with engine_for(settings.database.url).connect() as conn:
        return conn.execute(text("SELECT state FROM studies WHERE study_uid = :u"), {"u": uid}).scalar()
