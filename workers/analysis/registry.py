"""registry: the catalogue of analyses: which exist, where their weights are, and how one runs.

An analysis is an ``Analysis`` record (``workers.analysis.contract``). ``run_analysis`` runs its
four steps (load, preprocess, infer, postprocess), times each, and returns ``Findings`` stamped
with the model's version and the sha256 of its weight files.

Where analyses come from:
- built-in reference models: each module of ``workers.analysis.models`` listed in
  ``MODEL_MODULES`` defines ``analyses() -> list[Analysis]``;
- a hospital's own models, configured in ``settings.analyses`` with format ``torchscript``,
  ``onnx`` (onnxruntime) or ``monai_bundle`` (``workers.analysis.external``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pydicom
import torch
from rich.console import Console
from rich.table import Table

from node.core.intended_use import BodyRegions, SeriesHeaders, series_headers
from workers.analysis.contract import Analysis, AnalysisError, NotApplicable, RunContext
from workers.analysis.external import external_analysis
from workers.analysis.findings import Findings, Volume
from workers.analysis.models import classification, denoising, detection, ejection_fraction, segmentation

log = logging.getLogger(__name__)

# The built-in reference models: each module defines ``analyses() -> list[Analysis]``.
MODEL_MODULES = (segmentation, detection, classification, denoising, ejection_fraction)

# --- discovery --------------------------------------------------------------------------------

_lock = threading.RLock()
_builtin: dict[str, Analysis] | None = None
_models: dict[tuple, Any] = {}  # (loader, weights, sha256, device) -> loaded model


def builtin_analyses() -> dict[str, Analysis]:
    """Every built-in analysis, from the ``analyses()`` of the modules in ``MODEL_MODULES``."""
    global _builtin
    with _lock:
        if _builtin is None:
            found: dict[str, Analysis] = {}
            for module in MODEL_MODULES:
                for analysis in module.analyses():
                    found[analysis.name] = analysis
            _builtin = found
        return _builtin


def available_analyses(settings=None) -> dict[str, Analysis]:
    """Built-in analyses plus those configured in ``settings.analyses`` (configured ones win)."""
    found = dict(builtin_analyses())
    for cfg in getattr(settings, "analyses", None) or []:
        if cfg.format == "builtin":
            if cfg.name not in found:
                raise AnalysisError(
                    f"analysis {cfg.name!r} is configured as builtin but no built-in model has that name"
                )
            if cfg.intended_use is not None:  # a site may narrow a reference model's use
                found[cfg.name] = dataclasses.replace(found[cfg.name], intended_use=cfg.intended_use)
            continue
        found[cfg.name] = external_analysis(cfg)
    return found


def get_analysis(name: str, settings=None) -> Analysis:
    """The analysis called ``name`` (AnalysisError listing the known ones if there is none)."""
    found = available_analyses(settings)
    if name not in found:
        raise AnalysisError(f"unknown analysis {name!r}; known: {', '.join(sorted(found)) or 'none'}")
    return found[name]


# --- running ----------------------------------------------------------------------------------


def file_sha256(path: Path | tuple[Path, ...] | None) -> str:
    """sha256 of a weight file (of every file, in name order, for a folder; of each file in turn
    for a tuple of files); '' when none."""
    if path is None:
        return ""
    digest = hashlib.sha256()
    if isinstance(path, tuple):
        files = [Path(p) for p in path]
    else:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_sha_cache: dict[tuple, str] = {}


def weight_files(analysis: Analysis) -> tuple[Path, ...]:
    """Every weight file the analysis loads: ``weights`` then ``extra_weights``."""
    return tuple(Path(p) for p in (analysis.weights, *analysis.extra_weights) if p is not None)


def weights_present(analysis: Analysis) -> bool:
    """True when the analysis names weights and every one of its weight files exists."""
    files = weight_files(analysis)
    return bool(analysis.weights) and all(p.exists() for p in files)


def analysis_sha256(analysis: Analysis) -> str:
    """The sha256 recorded with results: of ``weights`` alone (a file or folder), or of every weight
    file in turn when the analysis has ``extra_weights``; '' when a file is missing."""
    if not analysis.extra_weights:
        return _sha_of(analysis.weights)
    return _sha_of(weight_files(analysis)) if weights_present(analysis) else ""


def _sha_of(path: Path | tuple[Path, ...] | None) -> str:
    paths = path if isinstance(path, tuple) else (path,)
    if path is None or not all(Path(p).exists() for p in paths):
        return ""
    key = tuple((str(p), Path(p).stat().st_mtime) for p in paths)
    if key not in _sha_cache:
        _sha_cache[key] = file_sha256(path)
    return _sha_cache[key]


def pick_device(analysis: Analysis, params: dict | None = None) -> str:
    """'cuda' when a GPU is there with enough free memory for the model, else 'cpu'.

    ``params['device']`` forces a choice. A busy GPU falls back to the CPU instead of failing.
    """
    forced = (params or {}).get("device")
    if forced:
        return str(forced)
    if not torch.cuda.is_available():
        return "cpu"
    free, _total = torch.cuda.mem_get_info()
    if free < analysis.gpu_memory_bytes:
        log.warning(
            "analysis %s: %.1f GiB free on the GPU, %.1f GiB needed; running on the CPU",
            analysis.name,
            free / 2**30,
            analysis.gpu_memory_bytes / 2**30,
        )
        return "cpu"
    return "cuda"


def loaded_model(analysis: Analysis, device: str) -> Any:
    """The analysis's model on ``device``, loaded once per worker process and kept.

    Analyses sharing a loader and weight file (segmentation and detection) share one copy.
    """
    loader = (
        f"{analysis.source}:{getattr(analysis.load, '__module__', '')}.{getattr(analysis.load, '__qualname__', '')}"
    )
    if analysis.source != "builtin":
        loader += f":{analysis.name}"  # configured models: one loader closure per configuration
    key = (loader, str(analysis.weights), analysis_sha256(analysis), device)
    with _lock:
        if key not in _models:
            if not weights_present(analysis):
                missing = [str(p) for p in weight_files(analysis) if not p.exists()] or [str(analysis.weights)]
                raise AnalysisError(
                    f"{analysis.name}: weights not found at {', '.join(missing)}; "
                    f"run `ainode train` or fix the configured path"
                )
            started = time.monotonic()
            _models[key] = analysis.load(device)
            # One line per load: a worker that keeps its models says this once per model.
            log.info(
                "analysis %s: model loaded on %s in %.2f s (process %d)",
                analysis.name,
                device,
                time.monotonic() - started,
                os.getpid(),
            )
        return _models[key]


def volume_headers(volume: Volume) -> SeriesHeaders | None:
    """The intended-use facts of the volume's series, from its first source file's header
    (None for a volume that was not read from files)."""
    if not volume.sources:
        return None
    try:
        ds = pydicom.dcmread(volume.sources[0].path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    return series_headers(ds, frames=volume.pixels.shape[0])


def run_analysis(
    name: str,
    volume: Volume,
    params: dict | None = None,
    settings=None,
    before_inference: Callable[[Analysis, Volume], None] | None = None,
) -> Findings:
    """Run one analysis on one volume and return its findings (timings per stage included).

    ``before_inference`` runs once the volume is known to be in the analysis' intended use and
    before the model: the job runner checks there that the results can be written."""
    params = dict(params or {})
    analysis = get_analysis(name, settings)
    synonyms = settings.intended_use.synonyms if hasattr(settings, "intended_use") else {}
    reason = analysis.accepts(volume, volume_headers(volume), BodyRegions(synonyms))
    if reason:
        raise NotApplicable(reason)
    if before_inference is not None:
        before_inference(analysis, volume)
    device = pick_device(analysis, params)
    ctx = RunContext(device=device, autocast=device.startswith("cuda") and params.get("amp", True), params=params)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model = loaded_model(analysis, device)
    timings["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    inputs = analysis.preprocess(volume, params)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    raw = analysis.infer(model, inputs, ctx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    timings["inference"] = time.perf_counter() - t
    t = time.perf_counter()
    outputs = analysis.postprocess(volume, inputs, raw, params)
    timings["postprocess"] = time.perf_counter() - t
    return Findings(
        analysis=analysis.name,
        algorithm_name=analysis.algorithm_name,
        algorithm_version=analysis.version,
        model_sha256=analysis_sha256(analysis),
        volume=volume,
        kind=analysis.task,
        segments=outputs.segments,
        detections=outputs.detections,
        classifications=outputs.classifications,
        measurements=outputs.measurements,
        derived=outputs.derived,
        timings_s=timings,
    )


# --- listing ----------------------------------------------------------------------------------


def print_models(settings) -> int:
    """Print the installed analyses (name, task, inputs, version, checksum, card); 0 if all load."""
    console = Console()
    try:
        found = available_analyses(settings)
    except AnalysisError as err:
        console.print(f"[red]{err}[/red]")
        return 1
    table = Table(title="ainode analyses")
    for column in ("name", "task", "accepts", "source", "version", "sha256", "card"):
        table.add_column(column)
    missing = 0
    for name in sorted(found):
        a = found[name]
        sha = analysis_sha256(a)
        if not sha:
            missing += 1
        table.add_row(
            name,
            a.task,
            f"{'/'.join(a.modalities)} {a.dimensionality} {'/'.join(a.declared_use.body_regions) or 'any region'}",
            a.source,
            a.version,
            sha[:12] if sha else "[red]weights missing[/red]",
            str(a.card) if a.card else "-",
        )
    console.print(table)
    return 1 if missing else 0
