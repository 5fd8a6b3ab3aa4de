"""registry: which analyses exist, what they accept, and how each one runs.

An analysis is declared by an ``Analysis`` record: its name, the task, the modalities and
dimensionality it accepts, how to load its model (once per worker process, cached), how to
turn a ``Volume`` into model inputs (``preprocess``), how to run the model (``infer``), and how to
turn model outputs into findings (``postprocess`` returns an ``Outputs``). ``run_analysis`` runs
the four steps, times each, and returns ``Findings`` stamped with the model's version and the
sha256 of its weight file.

Where analyses come from:
- built-in reference models: every module in ``workers.analysis.models`` that defines
  ``analyses() -> list[Analysis]`` (discovered automatically, so model modules add themselves);
- a hospital's own models, configured in ``settings.analyses`` with format ``torchscript``,
  ``onnx`` (onnxruntime) or ``monai_bundle``; generic pre/postprocessing per task is built from
  ``task``, ``labels`` and ``params`` (see ``external_analysis``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import pkgutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from workers.analysis.findings import (Classification, Code, DerivedImage, Detection, Findings, Measurement, Segment, Volume)

log = logging.getLogger(__name__)

Task = Literal["segmentation", "classification", "detection", "reconstruction", "ejection_fraction"]
Dimensionality = Literal["2d", "3d", "2d+t"]


class AnalysisError(RuntimeError):
    """The analysis cannot run on this input or with this model; the message says why."""


@dataclass
class Outputs:
    """What postprocessing produced; ``run_analysis`` wraps it into ``Findings``."""

    segments: list[Segment] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    classifications: list[Classification] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    derived: list[DerivedImage] = field(default_factory=list)


@dataclass
class RunContext:
    """Where inference runs: the torch device and whether mixed precision (CUDA autocast) is on."""

    device: str = "cpu"
    autocast: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def inference(self):
        """Context for a forward pass: torch.inference_mode, plus autocast on CUDA."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast and self.device.startswith("cuda"):
            stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        return stack


@dataclass
class Analysis:
    """One analysis: what it accepts, its model, and its pre/inference/postprocessing steps.

    ``load(device)`` returns the model object; ``preprocess(volume, params)`` returns model inputs;
    ``infer(model, inputs, ctx)`` returns raw outputs; ``postprocess(volume, inputs, raw, params)``
    returns ``Outputs``. ``weights`` is the file whose sha256 is recorded with every result;
    ``extra_weights`` are further files the model loads (a second-stage network), covered by the
    same sha256.
    """

    name: str
    task: Task
    modalities: tuple[str, ...]
    dimensionality: Dimensionality
    algorithm_name: str
    version: str
    load: Callable[[str], Any]
    preprocess: Callable[[Volume, dict], Any]
    infer: Callable[[Any, Any, RunContext], Any]
    postprocess: Callable[[Volume, Any, Any, dict], Outputs]
    weights: Path | None = None
    extra_weights: tuple[Path, ...] = ()
    card: Path | None = None
    description: str = ""
    # Estimated GPU memory needed to load and run the model (checked before using CUDA).
    gpu_memory_bytes: int = 1 << 30
    source: str = "builtin"
    # Writes one example input series (DICOM files) into a folder; used by bench/analysis.py.
    example: Callable[[Path], list[Path]] | None = None

    def accepts(self, volume: Volume) -> str | None:
        """None when the volume suits this analysis, else the reason it does not."""
        if self.modalities and volume.modality not in self.modalities:
            return f"{self.name} accepts {', '.join(self.modalities)} images, not {volume.modality}"
        frames = volume.pixels.shape[0]
        if self.dimensionality == "3d" and frames < 2:
            return f"{self.name} needs a 3D volume; the series has a single image"
        if self.dimensionality == "2d+t" and frames < 2:
            return f"{self.name} needs a cine loop of several frames"
        return None


# --- discovery --------------------------------------------------------------------------------

_lock = threading.RLock()
_builtin: dict[str, Analysis] | None = None
_models: dict[tuple, Any] = {}  # (loader, weights, sha256, device) -> loaded model


def builtin_analyses() -> dict[str, Analysis]:
    """Every built-in analysis, from the modules of ``workers.analysis.models`` that define ``analyses()``."""
    global _builtin
    with _lock:
        if _builtin is None:
            import workers.analysis.models as pkg

            found: dict[str, Analysis] = {}
            for info in pkgutil.iter_modules(pkg.__path__):
                module = importlib.import_module(f"{pkg.__name__}.{info.name}")
                for analysis in getattr(module, "analyses", lambda: [])():
                    found[analysis.name] = analysis
            _builtin = found
        return _builtin


def available_analyses(settings=None) -> dict[str, Analysis]:
    """Built-in analyses plus those configured in ``settings.analyses`` (configured ones win)."""
    found = dict(builtin_analyses())
    for cfg in getattr(settings, "analyses", None) or []:
        if cfg.format == "builtin":
            if cfg.name not in found:
                raise AnalysisError(f"analysis {cfg.name!r} is configured as builtin but no built-in model has that name")
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
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    free, _total = torch.cuda.mem_get_info()
    if free < analysis.gpu_memory_bytes:
        log.warning("analysis %s: %.1f GiB free on the GPU, %.1f GiB needed; running on the CPU",
                    analysis.name, free / 2**30, analysis.gpu_memory_bytes / 2**30)
        return "cpu"
    return "cuda"


def loaded_model(analysis: Analysis, device: str) -> Any:
    """The analysis's model on ``device``, loaded once per worker process and kept.

    Analyses sharing a loader and weight file (segmentation and detection) share one copy.
    """
    loader = f"{analysis.source}:{getattr(analysis.load, '__module__', '')}.{getattr(analysis.load, '__qualname__', '')}"
    if analysis.source != "builtin":
        loader += f":{analysis.name}"  # configured models: one loader closure per configuration
    key = (loader, str(analysis.weights), analysis_sha256(analysis), device)
    with _lock:
        if key not in _models:
            if not weights_present(analysis):
                missing = [str(p) for p in weight_files(analysis) if not p.exists()] or [str(analysis.weights)]
                raise AnalysisError(f"{analysis.name}: weights not found at {', '.join(missing)}; "
                                    f"run `ainode train` or fix the configured path")
            _models[key] = analysis.load(device)
        return _models[key]


def run_analysis(name: str, volume: Volume, params: dict | None = None, settings=None) -> Findings:
    """Run one analysis on one volume and return its findings (timings per stage included)."""
    params = dict(params or {})
    analysis = get_analysis(name, settings)
    reason = analysis.accepts(volume)
    if reason:
        raise AnalysisError(reason)
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
        import torch

        torch.cuda.synchronize()
    timings["inference"] = time.perf_counter() - t
    t = time.perf_counter()
    outputs = analysis.postprocess(volume, inputs, raw, params)
    timings["postprocess"] = time.perf_counter() - t
    return Findings(
        analysis=analysis.name, algorithm_name=analysis.algorithm_name, algorithm_version=analysis.version,
        model_sha256=analysis_sha256(analysis), volume=volume, kind=analysis.task,
        segments=outputs.segments, detections=outputs.detections, classifications=outputs.classifications,
        measurements=outputs.measurements, derived=outputs.derived, timings_s=timings,
    )


# --- external models (TorchScript, ONNX, MONAI bundle) ----------------------------------------

# Codes for label names a configured model may use; others get a local code (99AINODE).
KNOWN_CODES: dict[str, tuple[Code, Code]] = {  # name -> (category, type)
    "lung": (("91723000", "SCT", "Anatomical structure"), ("39607008", "SCT", "Lung")),
    "liver": (("91723000", "SCT", "Anatomical structure"), ("10200004", "SCT", "Liver")),
    "spleen": (("91723000", "SCT", "Anatomical structure"), ("78961009", "SCT", "Spleen")),
    "kidney": (("91723000", "SCT", "Anatomical structure"), ("64033007", "SCT", "Kidney")),
    "spine": (("91723000", "SCT", "Anatomical structure"), ("421060004", "SCT", "Spinal column")),
    "liver_lesion": (("49755003", "SCT", "Morphologically abnormal structure"), ("300331000", "SCT", "Lesion of liver")),
    "lung_nodule": (("49755003", "SCT", "Morphologically abnormal structure"), ("786838002", "SCT", "Pulmonary nodule")),
}


def codes_for(label: str) -> tuple[Code, Code]:
    """(category, type) codes for a label name."""
    if label in KNOWN_CODES:
        return KNOWN_CODES[label]
    return (("91723000", "SCT", "Anatomical structure"), (label.upper()[:16], "99AINODE", label.replace("_", " ")))


class _Predictor:
    """A uniform callable over TorchScript, ONNX and MONAI-bundle models: numpy in, numpy out."""

    def __init__(self, fmt: str, path: Path, device: str):
        self.fmt, self.device = fmt, device
        if fmt == "onnx":
            import onnxruntime as ort

            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") \
                else ["CPUExecutionProvider"]
            providers = [p for p in providers if p in ort.get_available_providers()]
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.input_name = self.session.get_inputs()[0].name
        elif fmt == "torchscript":
            import torch

            self.module = torch.jit.load(str(path), map_location=device).eval()
        elif fmt == "monai_bundle":
            self.module = _load_monai_bundle(path, device)
        else:
            raise AnalysisError(f"unknown model format {fmt!r}")

    def torch_module(self):
        """The model as a torch callable (ONNX wrapped), for MONAI sliding-window inference."""
        if self.fmt != "onnx":
            return self.module
        import torch

        def call(x: "torch.Tensor") -> "torch.Tensor":
            out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(out).to(x.device)

        return call


def _load_monai_bundle(path: Path, device: str):
    """A MONAI bundle folder: models/model.ts (TorchScript), or configs' network_def + models/model.pt."""
    import torch

    path = Path(path)
    ts = path / "models" / "model.ts"
    if ts.exists():
        return torch.jit.load(str(ts), map_location=device).eval()
    from monai.bundle import ConfigParser

    config = next((path / "configs" / n for n in ("inference.json", "inference.yaml") if (path / "configs" / n).exists()), None)
    if config is None:
        raise AnalysisError(f"{path}: a MONAI bundle needs configs/inference.json or models/model.ts")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(path)
    network = parser.get_parsed_content("network_def")
    weights = path / "models" / "model.pt"
    state = torch.load(str(weights), map_location=device, weights_only=True)
    network.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    return network.to(device).eval()


def _bundle_version(path: Path) -> str:
    meta = Path(path) / "configs" / "metadata.json"
    if meta.exists():
        return str(json.loads(meta.read_text()).get("version", "unknown"))
    return "unknown"


def _weights_file(fmt: str, path: Path) -> Path:
    if fmt != "monai_bundle":
        return path
    for candidate in ("models/model.ts", "models/model.pt"):
        if (path / candidate).exists():
            return path / candidate
    return path


def external_analysis(cfg) -> Analysis:
    """An ``Analysis`` for a configured TorchScript/ONNX/MONAI-bundle model.

    ``cfg.params`` (all optional): ``spacing`` [k, j, i] mm working grid; ``window`` [lo, hi]
    intensities scaled to 0..1 (default: z-score); ``roi_size`` for sliding windows (3D);
    ``size`` [h, w] for 2D models; ``threshold``; ``version``; ``output`` ('softmax', 'sigmoid'
    or 'raw').
    """
    from workers.analysis.models import generic

    path = Path(cfg.path)
    version = str(cfg.params.get("version") or (_bundle_version(path) if cfg.format == "monai_bundle" else "1"))
    weights = _weights_file(cfg.format, path)
    steps = generic.steps_for(cfg.task, list(cfg.labels), dict(cfg.params))
    return Analysis(
        name=cfg.name, task=cfg.task, modalities=tuple(cfg.modalities), dimensionality=steps.dimensionality,
        algorithm_name=cfg.params.get("algorithm_name", cfg.name), version=version,
        load=lambda device: _Predictor(cfg.format, path, device),
        preprocess=steps.preprocess, infer=steps.infer, postprocess=steps.postprocess,
        weights=weights, card=Path(cfg.params["card"]) if cfg.params.get("card") else None,
        description=f"{cfg.format} model at {path}", gpu_memory_bytes=int(cfg.params.get("gpu_memory_bytes", 1 << 30)),
        source=cfg.format,
    )


# --- listing ----------------------------------------------------------------------------------


def print_models(settings) -> int:
    """Print the installed analyses (name, task, inputs, version, checksum, card); 0 if all load."""
    from rich.console import Console
    from rich.table import Table

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
        table.add_row(name, a.task, f"{'/'.join(a.modalities)} {a.dimensionality}", a.source, a.version,
                      sha[:12] if sha else "[red]weights missing[/red]", str(a.card) if a.card else "-")
    console.print(table)
    return 1 if missing else 0
