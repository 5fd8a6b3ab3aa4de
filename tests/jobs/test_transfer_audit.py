"""Instances Transferred audit messages from the node's periodic pass: each once, from a bounded window."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import inspect, text, update

from node.admin import api
from node.core import audit
from node.core.db import dispose_engines, engine_for, init_db, session_scope
from node.core.settings import AuditSettings
from node.dispatch.outbox import Delivery
from node.index import Study
from tests.jobs.conftest import add_study


def _messages(log: Path) -> list[str]:
    audit.trail().close()  # flush the queue to the file
    lines = log.read_text().splitlines() if log.exists() else []
    audit.configure(AuditSettings(sink="file", path=log), "AINODE")  # appends from here
    return lines


def _ready(settings, uid: str) -> None:
    with session_scope(engine_for(settings.database.url)) as s:
        s.execute(
            update(Study).where(Study.study_uid == uid).values(state="routed", ready_at=datetime.now(timezone.utc))
        )


def _delivery(settings, n: int, state: str) -> None:
    with session_scope(engine_for(settings.database.url)) as s:
        s.add(
            Delivery(
                job_id="7",
                destination="PACS",
                path=f"r/{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                sop_instance_uid=f"1.2.3.77.{n}",
                study_instance_uid="1.2.3.501",
                state=state,
                delivered_at=datetime.now(timezone.utc) if state == "delivered" else None,
            )
        )


def test_each_completed_study_and_delivered_group_is_reported_once(make_settings, tmp_path, monkeypatch):
    _reported_once(make_settings(), tmp_path, monkeypatch)


def test_reported_once_on_postgresql(make_settings, postgres_url, tmp_path, monkeypatch):
    _reported_once(make_settings(database={"url": postgres_url}), tmp_path, monkeypatch)


def _reported_once(settings, tmp_path, monkeypatch) -> None:
    log = tmp_path / "audit.log"
    monkeypatch.setattr(audit, "_trail", None)
    audit.configure(AuditSettings(sink="file", path=log), "AINODE")
    try:
        add_study(settings, study_uid="1.2.3.500")
        _ready(settings, "1.2.3.500")
        auditor = api.TransferAuditor(settings)
        auditor()
        assert _messages(log) == []  # completed before this start: the previous run's to report

        add_study(settings, study_uid="1.2.3.501")
        _ready(settings, "1.2.3.501")
        auditor()
        imports = _messages(log)
        assert len(imports) == 1 and "1.2.3.501" in imports[0] and 'EventActionCode="C"' in imports[0]

        add_study(settings, study_uid="1.2.3.502")  # a commit, nothing completed
        auditor()
        assert _messages(log) == imports  # not reported twice

        monkeypatch.setattr(api.TransferAuditor, "WINDOW_S", 0.3)
        auditor()
        time.sleep(0.5)
        add_study(settings, study_uid="1.2.3.503")
        auditor()  # 501 is older than the window now: neither read nor remembered any more
        assert _messages(log) == imports
        assert auditor.reported == {}  # memory bounded by the window, not by the years of history

        _delivery(settings, 1, "delivered")
        _delivery(settings, 2, "pending")
        auditor()
        assert _messages(log) == imports  # the group is not complete yet
        with session_scope(engine_for(settings.database.url)) as s:
            s.execute(
                update(Delivery)
                .where(Delivery.path == "r/2")
                .values(state="delivered", delivered_at=datetime.now(timezone.utc))
            )
        auditor()
        exports = _messages(log)[len(imports) :]
        assert len(exports) == 1 and 'EventActionCode="R"' in exports[0] and "1.2.3.501" in exports[0]
        _ready(settings, "1.2.3.502")
        auditor()
        after = _messages(log)
        assert len(after) == len(imports) + 2 and "1.2.3.502" in after[-1]  # the export was not repeated
    finally:
        audit.trail().close()
        audit._trail = None


def test_init_db_adds_indexes_missing_from_an_older_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}"
    init_db(url)
    with engine_for(url).begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))  # made by create_all, before migrations
        conn.execute(text("DROP INDEX ix_studies_ready_at"))
        conn.execute(text("DROP INDEX ix_deliveries_delivered_at"))
    dispose_engines()
    init_db(url)
    inspector = inspect(engine_for(url))
    assert "ix_studies_ready_at" in {i["name"] for i in inspector.get_indexes("studies")}
    assert "ix_deliveries_delivered_at" in {i["name"] for i in inspector.get_indexes("deliveries")}
