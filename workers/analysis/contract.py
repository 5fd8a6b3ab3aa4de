"""contract: the data contract every analysis implements (built-in models and configured ones).

An analysis is declared by an ``Analysis`` record: its name, the task, the modalities and
dimensionality it accepts, how to load its model (once per worker process, cached by the
registry), how to turn a ``Volume`` into model inputs (``preprocess``), how to run the model
(``infer``, under a ``RunContext``), and how to turn model outputs into findings (``postprocess``
returns an ``Outputs``). ``AnalysisError`` says why an analysis cannot run (a permanent error);
``NotApplicable`` says the input is outside the analysis' intended use (a distinct job outcome).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from node.core.intended_use import BodyRegions, IntendedUse, SeriesHeaders, geometry_reason, header_reason
from workers.analysis.findings import Classification, DerivedImage, Detection, Measurement, Segment, Volume

Task = Literal["segmentation", "classification", "detection", "reconstruction", "ejection_fraction"]
Dimensionality = Literal["2d", "3d", "2d+t"]


class AnalysisError(RuntimeError):
    """The analysis cannot run on this input or with this model; the message says why.

    Permanent: the job fails once with this message and is not retried."""


class NotApplicable(AnalysisError):
    """The input is outside the analysis' intended use (modality, body region, dimensionality,
    spacing, or what the image itself shows); the job ends "not applicable" with this reason."""


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
    # What the analysis is for (node.core.intended_use); None: ``modalities`` and ``dimensionality``.
    intended_use: IntendedUse | None = None
    # What the image itself must show (workers.analysis.domain): None when it fits, else why not.
    image_check: Callable[[Volume], str | None] | None = None

    @property
    def declared_use(self) -> IntendedUse:
        """The intended use, or one made of ``modalities`` and ``dimensionality`` when none is declared."""
        if self.intended_use is not None:
            return self.intended_use
        return IntendedUse(modalities=self.modalities, dimensionality=self.dimensionality, min_slices=2)

    def accepts(
        self, volume: Volume, headers: SeriesHeaders | None = None, regions: BodyRegions | None = None
    ) -> str | None:
        """None when the volume suits this analysis, else the reason it does not: its headers
        (when given), its geometry, then what the image shows (``image_check``)."""
        use = self.declared_use
        if use.modalities and volume.modality not in use.modalities:
            return f"{self.name} accepts {', '.join(use.modalities)} images, not {volume.modality or 'unknown'}"
        # Dimensionality from what the images are (imaging.load_groups), not from how many.
        frames = volume.pixels.shape[0]
        if use.dimensionality == "3d" and (volume.kind != "volume" or frames < 2):
            return f"{self.name} needs a 3D volume; {_where(volume)} is {volume.describe()}"
        if use.dimensionality == "2d+t" and (volume.kind != "cine" or frames < 2):
            return f"{self.name} needs a cine loop; {_where(volume)} is {volume.describe()}"
        reason = header_reason(use, headers, regions or BodyRegions()) if headers is not None else None
        reason = reason or geometry_reason(
            use, volume.modality, volume.pixels.shape, volume.spacing, volume.frame_time_s
        )
        if reason is None and self.image_check is not None:
            reason = self.image_check(volume)
        return f"{self.name}: {reason}" if reason else None


def _where(volume: Volume) -> str:
    return f"the series ({volume.label})" if volume.label else "the series"
