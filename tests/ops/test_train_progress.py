"""`ainode train` progress: a Rich bar on a terminal, log lines elsewhere, JSON summary alone on stdout."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from tests.helpers import REPO_ROOT
from workers.training import TrainingProgress, reporting_kwargs

# ejection-fraction: the quickest real trainer (~10 s with --quick), reports "epoch N/M" via log=.
MODEL, EPOCHS = "ejection-fraction", 2
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "node.cli", "train", MODEL, "--quick", "--out", str(out)]


def test_train_on_a_terminal_shows_a_progress_bar_that_reaches_the_end(tmp_path: Path):
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TERM": "xterm-256color", "COLUMNS": "140"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(train_cmd(tmp_path / "ef.pt"), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    stdout = proc.communicate(timeout=60)[0]
    os.close(master)
    screen = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    assert proc.returncode == 0, screen[-3000:]
    # The bar is redrawn in place (carriage returns), fills up, and ends at M/M epochs.
    frames = [f for f in re.split(r"[\r\n]+", screen) if "━" in f and f"{MODEL}: epochs" in f]
    assert frames, screen[-3000:]
    assert f"{EPOCHS}/{EPOCHS}" in frames[-1] and "val MAE" in frames[-1]
    assert any(f"1/{EPOCHS}" in f for f in frames)
    # The summary is the only thing on stdout, so scripts can parse it.
    summary = json.loads(stdout)
    assert summary["model"] == MODEL and Path(summary["weights"]) == tmp_path / "ef.pt"


def test_train_without_a_terminal_logs_plain_progress_lines(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        train_cmd(tmp_path / "ef.pt"), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "━" not in proc.stderr and "\x1b[" not in proc.stderr
    for epoch in range(1, EPOCHS + 1):
        assert re.search(rf"workers\.training\.{MODEL} epoch {epoch}/{EPOCHS}: val MAE", proc.stderr), proc.stderr
    assert re.search(rf"{MODEL} trained in \d+ s \({EPOCHS} epochs\)", proc.stderr)
    assert json.loads(proc.stdout)["model"] == MODEL


def test_unknown_model_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "no-such-model", "--quick"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "trainable models:" in proc.stderr and MODEL in proc.stderr


# --- the three ways a trainer reports (no real training: fakes that use each door) ----------------


def live_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=140, color_system=None), buffer


def test_a_progress_callback_drives_the_bar_with_its_metrics():
    def train(out=None, quick=False, progress=None):
        for step in range(1, 6):
            progress(step, 5, loss=1.0 / step)
        return {}

    console, buffer = live_console()
    with TrainingProgress("fake", console, live=True) as reporter:
        assert set(reporting_kwargs(train, reporter)) == {"progress"}
        train(**reporting_kwargs(train, reporter))
    assert reporter.done == 5 and reporter.total == 5
    last = [line for line in buffer.getvalue().splitlines() if "fake: steps" in line][-1]
    assert "5/5" in last and "loss 0.2" in last


def test_a_progress_callback_without_a_terminal_is_throttled_to_a_few_log_lines(caplog):
    caplog.set_level(logging.INFO)
    with TrainingProgress("fake", Console(file=io.StringIO()), live=False, interval_s=3600) as reporter:
        for step in range(1, 1001):
            reporter.progress(step, 1000, loss=0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.training.fake"]
    assert lines == ["step 1/1000: loss 0.5", "step 1000/1000: loss 0.5"]


def test_step_lines_from_the_logging_module_move_the_bar_even_without_a_total():
    """A time-budgeted trainer (ct-segmentation) logs 'step N loss ...' with the logging module."""
    console, buffer = live_console()
    model_log = logging.getLogger("workers.analysis.models.fake_budgeted")
    model_log.setLevel(logging.INFO)
    with TrainingProgress("budgeted", console, live=True) as reporter:
        for step in (50, 100, 150):
            model_log.info("step %d loss %.4f (%.0f s)", step, 0.3, step / 10)
        model_log.info("generated 2 phantoms in 3 s")  # not a step line: no change
    assert reporter.done == 150 and reporter.total is None
    assert re.search(r"budgeted: steps.*150/\?", buffer.getvalue())
    # Outside the context the handler is gone: nothing moves any more.
    model_log.info("step 999 loss 0.1")
    assert reporter.done == 150


def test_log_callback_lines_are_parsed_and_kept_as_log_records(caplog):
    caplog.set_level(logging.INFO)

    def train(out=None, quick=False, seed=0, log=print):
        log("slices: train 12")
        log("step 4/40: L1 12.0 HU, validation PSNR 30.1 dB")
        return {}

    with TrainingProgress("gan", Console(file=io.StringIO()), live=False) as reporter:
        train(**reporting_kwargs(train, reporter))
    assert (reporter.done, reporter.total, reporter.unit) == (4, 40, "step")
    assert [r.getMessage() for r in caplog.records if r.name == "workers.training.gan"] == [
        "slices: train 12",
        "step 4/40: L1 12.0 HU, validation PSNR 30.1 dB",
    ]
