"""training: ``ainode train MODEL`` reproduces a reference model from generated phantoms.

The training half of each reference model lives here, one module per model (the inference half
is in ``workers.analysis.models``); ``TRAINERS`` names them: each module defines
``train(out, quick) -> dict`` and its ``TRAIN_NAME``. The summary the train function returns
(steps, loss, seconds, weight path) is printed as JSON on stdout; everything else goes to stderr.

Progress: on a terminal a Rich progress bar follows the run; elsewhere (CI, a log file) the same
progress comes as log lines (``workers.training.progress``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console

from workers.training import classification, denoising, ejection_fraction, lesion_refinement, segmentation
from workers.training.progress import STEP_LINE, TrainingProgress, configure_logging, reporting_kwargs

__all__ = [
    "STEP_LINE",
    "TRAINER_MODULES",
    "TrainingProgress",
    "configure_logging",
    "reporting_kwargs",
    "new_output",
    "train_model",
    "trainers",
]

log = logging.getLogger("workers.training")

# The trainable reference models: each module defines ``train(out, quick) -> dict`` and ``TRAIN_NAME``.
TRAINER_MODULES = (segmentation, lesion_refinement, classification, denoising, ejection_fraction)


def trainers() -> dict[str, Callable[..., dict]]:
    """Trainable models by name: {name: train(out, quick) -> summary}."""
    return {module.TRAIN_NAME: module.train for module in TRAINER_MODULES}


def train_model(
    name: str, out: Path | None, quick: bool, live: bool | None = None, replace_shipped: bool = False
) -> int:
    """Train model ``name``, writing weights to ``out``; by default to a new folder (``new_output``).

    Only ``replace_shipped`` writes over the packaged weight file (and its metadata).
    ``live`` forces the progress bar on or off (default: on when stderr is a terminal).
    Returns a process exit code: 0 on success, 2 for an unknown model name or conflicting options.
    """
    console = Console(stderr=True)
    reporter = TrainingProgress(name, console, live)
    configure_logging(console, reporter.live)
    found = trainers()
    if name not in found:
        print(f"unknown model {name!r}; trainable models: {', '.join(sorted(found))}", file=sys.stderr)
        return 2
    if out is not None and replace_shipped:
        print("--out and --replace-shipped exclude each other", file=sys.stderr)
        return 2
    if out is None and not replace_shipped:
        out = new_output(name)
    train = found[name]
    started = time.monotonic()
    with reporter:
        summary = train(out=out, quick=quick, **reporting_kwargs(train, reporter))
    log.info("%s trained in %.0f s (%d %ss)", name, time.monotonic() - started, reporter.done, reporter.unit)
    where = "the shipped weights were replaced" if replace_shipped else "the shipped weights are unchanged"
    log.info("weights written to %s (%s)", summary.get("weights", out), where)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def new_output(name: str) -> Path:
    """A fresh folder for a training run in the working directory, with the shipped file's name."""
    module = next(m for m in TRAINER_MODULES if m.TRAIN_NAME == name)
    folder = Path.cwd() / "trained" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while folder.exists():  # two runs in one second
        suffix += 1
        folder = folder.with_name(f"{folder.name.split('~')[0]}~{suffix}")
    return folder / Path(module.WEIGHTS).name
