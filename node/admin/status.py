"""`ainode status`: what the node holds and where each later stage stands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node import assembler
from node.core.db import init_db, session_scope
from node.core.settings import Settings
from node.dispatch import outbox
from node.index import Instance, Series, Study
from node.ingest.quarantine import alerts
from node.jobs import table as jobs_table

# The later stages' sections of the status, each from the stage's `status_summary(session) -> dict`.
STAGE_SUMMARIES: dict[str, Callable[[Session], dict[str, Any]]] = {
    "assembler": assembler.status_summary,
    "jobs": jobs_table.status_summary,
    "dispatcher": outbox.status_summary,
}


def _disk(path: Path) -> dict[str, int]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"free_bytes": usage.free, "total_bytes": usage.total}


def collect_status(settings: Settings) -> dict[str, Any]:
    """The status as a dict: index counts, disk, and each stage's own summary."""
    engine = init_db(settings.database.url)
    report: dict[str, Any] = {}
    with session_scope(engine) as session:
        report["index"] = {
            "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
            "series": session.scalar(select(func.count()).select_from(Series)) or 0,
            "instances": session.scalar(select(func.count()).select_from(Instance)) or 0,
            "bytes": int(session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0),
        }
        disk = _disk(Path(settings.storage.path))
        disk["reserve_bytes"] = int(settings.storage.min_free_bytes)
        disk["accepting"] = disk["free_bytes"] >= disk["reserve_bytes"]
        report["storage"] = disk
        # What needs an operator: instances the index could not take, journals not in use.
        found = alerts(Path(settings.storage.path))
        report["alerts"] = {" ".join(filter(None, (a["kind"], a.get("journal")))): a["message"] for a in found}
        for section, summary in STAGE_SUMMARIES.items():
            try:
                report[section] = summary(session)
            except Exception as err:  # one stage's trouble must not hide the others
                report[section] = {"error": type(err).__name__}
    return report


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(n)


def _flat(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    # Nested summaries (jobs by state, deliveries by destination) read best as dotted rows.
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flat(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def print_status(settings: Settings, as_json: bool) -> int:
    """Print the status (a table, or JSON with --json); 0 on success."""
    report = collect_status(settings)
    if as_json:
        print(json.dumps(report, default=str, sort_keys=True))
        return 0
    console = Console()
    table = Table(title=f"ainode {settings.node.ae_title}", show_header=True)
    table.add_column("section")
    table.add_column("item")
    table.add_column("value", justify="right")
    for section, values in report.items():
        for key, value in _flat(values if isinstance(values, dict) else {"": values}):
            if key.endswith("bytes") and isinstance(value, int):
                value = _human(value)
            table.add_row(section, str(key), str(value))
            section = ""
    console.print(table)
    return 0
