"""Progress of a training run: a Rich progress bar on a terminal, throttled log lines elsewhere.

A trainer reports progress through whichever of these it uses, with no change needed to the
others (see docs/training.md):

- a ``progress`` keyword argument: ``progress(done, total=None, **metrics)`` after each step;
- a ``log`` keyword argument: ``log(message)``; a message starting ``step N/M`` or ``epoch N/M``
  (or ``step N`` when the total is unknown, e.g. a time-budgeted run) moves the bar;
- the standard ``logging`` module under the ``workers`` logger, with the same message shapes.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import time
from typing import Any, Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# "step 40/1200: loss ...", "epoch 2/16: val MAE ...", "step 50 loss ..." (no total: a time budget).
STEP_LINE = re.compile(
    r"\s*(?P<unit>step|epoch|iteration)\s+(?P<done>\d+)(?:\s*/\s*(?P<total>\d+))?\b[\s:,;-]*(?P<rest>.*)", re.IGNORECASE
)


class TrainingProgress:
    """The progress of one training run: a Rich bar on a terminal, throttled log lines elsewhere.

    Use as a context manager. ``progress`` and ``log`` are the callables handed to trainers that
    accept them; while the context is open, ``workers.*`` log records shaped like step lines also
    move the bar.
    """

    def __init__(self, name: str, console: Console | None = None, live: bool | None = None, interval_s: float = 10.0):
        self.name = name
        self.console = console or Console(stderr=True)
        self.live = (self.console.is_terminal and not self.console.is_dumb_terminal) if live is None else live
        self.interval_s = interval_s
        self.done, self.total, self.unit = 0, None, "step"
        self._logger = logging.getLogger(f"workers.training.{name}")
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._handler = _StepLines(self)
        self._last_line: float | None = None

    def __enter__(self) -> "TrainingProgress":
        if self.live:
            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task(f"{self.name}: preparing", total=None, info="")
            self._bar.start()
        logging.getLogger("workers").addHandler(self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("workers").removeHandler(self._handler)
        if self._bar is not None:
            if exc[0] is None and self.total is not None:
                self._bar.update(self._task, completed=self.total)
            self._bar.stop()

    def progress(self, done: int, total: int | None = None, unit: str = "step", **metrics: Any) -> None:
        """A trainer's report after a step (or epoch): how many are done, of how many, with metrics."""
        info = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self._advance(unit, done, total, info)
        if self._bar is None:
            now = time.monotonic()
            if (
                self._last_line is None
                or now - self._last_line >= self.interval_s
                or (total is not None and done >= total)
            ):
                self._last_line = now
                self._logger.info("%s %d%s%s", unit, done, f"/{total}" if total else "", f": {info}" if info else "")

    def log(self, message: str) -> None:
        """A trainer's log line: printed (above the bar on a terminal); step lines move the bar."""
        self._logger.info("%s", message)

    def _advance(self, unit: str, done: int, total: int | None, info: str) -> None:
        self.unit, self.done = unit.lower(), done
        self.total = total if total is not None else self.total
        if self._bar is not None:
            self._bar.update(
                self._task, description=f"{self.name}: {self.unit}s", completed=done, total=self.total, info=info
            )

    def _from_line(self, message: str) -> None:
        found = STEP_LINE.match(message)
        if found:
            total = found["total"]
            self._advance(found["unit"], int(found["done"]), int(total) if total else None, found["rest"][:60])


class _StepLines(logging.Handler):
    """Turns ``workers.*`` log records shaped like step lines into bar updates (prints nothing)."""

    def __init__(self, target: TrainingProgress):
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target._from_line(record.getMessage())
        except Exception:  # noqa: BLE001 - progress display must never break training
            self.handleError(record)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def reporting_kwargs(train: Callable[..., dict], reporter: TrainingProgress) -> dict[str, Callable[..., None]]:
    """The progress hooks ``train`` accepts by name (``progress``, ``log``), bound to ``reporter``."""
    params = inspect.signature(train).parameters
    hooks = {"progress": reporter.progress, "log": reporter.log}
    return {name: hook for name, hook in hooks.items() if name in params}


def configure_logging(console: Console, live: bool) -> None:
    """Log lines on stderr: through Rich (above the bar) on a terminal, plain text otherwise."""
    root = logging.getLogger()
    if root.handlers:
        return
    if live:
        root.addHandler(RichHandler(console=console, show_path=False, markup=False))
        root.setLevel(logging.INFO)
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
