"""The layering holds, and its check fails when a stage reaches where it must not (import-linter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _copy_sources(dest: Path) -> None:
    for package in ("node", "workers"):
        for src in (ROOT / package).rglob("*.py"):
            target = dest / src.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    shutil.copyfile(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _lint(folder: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(folder))
    return subprocess.run(
        [str(LINT_IMPORTS), str(folder / "pyproject.toml"), "--no-cache"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    run = _lint(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_stage_importing_the_workers_breaks_the_build(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    _append(tmp_path / "node" / "router.py", "import workers.tasks  # noqa")
    run = _lint(tmp_path)
    assert run.returncode != 0
    assert "node.router is not allowed to import workers" in run.stdout


def test_an_import_circle_between_siblings_breaks_the_build(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    # node.jobs already imports node.index; the reverse closes a circle (and breaks the layers).
    _append(tmp_path / "node" / "index.py", "import node.jobs.table  # noqa")
    run = _lint(tmp_path)
    assert run.returncode != 0
    assert "No cycles are allowed in node" in run.stdout
