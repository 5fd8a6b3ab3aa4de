"""training: ``ainode train MODEL`` reproduces a reference model from generated phantoms.

Each module in ``workers.models`` that defines ``train(out, quick) -> dict`` is a trainable model,
named by its ``TRAIN_NAME`` (else the module name), e.g. ``segmentation``. The summary the train
function returns (steps, loss, seconds, weight path) is printed as JSON.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path
from typing import Callable


def trainers() -> dict[str, Callable[..., dict]]:
    """Trainable models by name: {name: train(out, quick) -> summary}."""
    import workers.models as pkg

    found: dict[str, Callable[..., dict]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        train = getattr(module, "train", None)
        if callable(train):
            found[getattr(module, "TRAIN_NAME", info.name)] = train
    return found


def train_model(name: str, out: Path | None, quick: bool) -> int:
    """Train model ``name``, writing weights to ``out`` (default: the packaged weight file).

    Returns a process exit code: 0 on success, 2 for an unknown model name.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    found = trainers()
    if name not in found:
        print(f"unknown model {name!r}; trainable models: {', '.join(sorted(found))}", file=sys.stderr)
        return 2
    summary = found[name](out=out, quick=quick)
    print(json.dumps(summary, indent=2, default=str))
    return 0
