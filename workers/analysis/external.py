"""external: a hospital's own models (TorchScript, ONNX, MONAI bundle) as analyses.

A hospital describes its model in ``settings.analyses`` (format, path, task, labels, params);
``external_analysis`` turns that description into an ``Analysis``: ``_Predictor`` loads the model
(a uniform numpy-in, numpy-out callable over the three formats) and ``steps_for`` builds generic
preprocess / infer / postprocess steps for the task:

- segmentation / detection (3D): optional resampling to ``params.spacing`` (k, j, i mm) on the
  series' own axes, intensity ``window`` [lo, hi] to 0..1 (else z-score), MONAI sliding-window
  inference over ``roi_size`` (default 96³), softmax (or sigmoid) class maps sampled back onto
  the source grid. Labels name the output channels after background.
- classification (2D): each image resized to ``size`` [h, w] (default 224²); one probability per
  label (sigmoid, or softmax with ``output: softmax``); the series' maximum is reported.
- reconstruction: the image in, an image of the same size out (a derived series).
- ejection_fraction: the cine loop in (1, T, H, W), one number out (percent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from scipy import ndimage

from workers.analysis import imaging
from workers.analysis.codes import codes_for
from workers.analysis.contract import Analysis, AnalysisError, Outputs, RunContext
from workers.analysis.findings import Classification, DerivedImage, Detection, Measurement, Segment, Volume

# --- generic steps per task -------------------------------------------------------------------


@dataclass
class Steps:
    dimensionality: str
    preprocess: Callable[[Volume, dict], Any]
    infer: Callable[[Any, Any, RunContext], Any]
    postprocess: Callable[[Volume, Any, Any, dict], Outputs]


def _normalise(x: np.ndarray, params: dict) -> np.ndarray:
    window = params.get("window")
    if window:
        lo, hi = float(window[0]), float(window[1])
        return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)
    return ((x - x.mean()) / (x.std() + 1e-6)).astype(np.float32)


def _activate(logits, output: str, dim: int = 1):
    if output == "sigmoid":
        return torch.sigmoid(logits.float())
    if output == "raw":
        return logits.float()
    return torch.softmax(logits.float(), dim=dim)


def source_labels(
    volume: Volume, work_affine: np.ndarray, probs: np.ndarray, output: str, threshold: float = 0.5
) -> np.ndarray:
    """Label per source voxel from class maps (C, k, j, i) on the model's grid (``work_affine``).

    ``softmax``: channel 0 is background, the arg-max wins. Otherwise (sigmoid, multi-label): the
    most probable channel at or above ``threshold``, numbered from 1. Off the source grid both go
    through ``imaging.argmax_on_source``, which interpolates only near boundaries (a 300-slice CT:
    ~1 s instead of ~20 s for sampling every class map at every voxel); for sigmoid a constant
    background channel just under the threshold turns "at or above the threshold" into an arg-max
    (interpolating a constant gives the constant, so the two agree voxel for voxel).
    """
    if output != "softmax":
        floor = np.nextafter(np.asarray(threshold, dtype=probs.dtype), np.asarray(-np.inf, dtype=probs.dtype))
        probs = np.concatenate([np.full((1, *probs.shape[1:]), floor, dtype=probs.dtype), probs])
    if work_affine is volume.affine:
        return probs.argmax(axis=0)
    return imaging.argmax_on_source(volume, work_affine, probs)


def steps_for(task: str, labels: list[str], params: dict) -> Steps:
    """The processing steps for a configured model of this task."""
    output = str(params.get("output", "sigmoid" if task == "classification" else "softmax"))

    def prep_3d(volume: Volume, run_params: dict) -> dict:
        spacing = params.get("spacing")
        if spacing:
            pixels, affine = imaging.resample_to_spacing(volume, [float(s) for s in spacing])
        else:
            pixels, affine = volume.pixels, volume.affine
        return {"image": _normalise(pixels, params)[None], "affine": affine}

    def infer_3d(predictor, inputs: dict, ctx: RunContext) -> np.ndarray:
        roi = tuple(int(r) for r in params.get("roi_size", (96, 96, 96)))
        x = torch.from_numpy(inputs["image"][None]).to(ctx.device)
        with ctx.inference():
            logits = sliding_window_inference(x, roi, 1, predictor.torch_module(), overlap=0.25)
            return _activate(logits, output)[0].cpu().numpy()

    def post_segmentation(volume: Volume, inputs: dict, probs: np.ndarray, run_params: dict) -> Outputs:
        label_map = source_labels(volume, inputs["affine"], probs, output, float(params.get("threshold", 0.5)))
        out = Outputs()
        for idx, name in enumerate(labels, start=1):
            mask = label_map == idx
            if mask.any():
                category, ptype = codes_for(name)
                out.segments.append(
                    Segment(label=name, mask=mask, property_type=ptype, property_category=category, tracking_id=name)
                )
        return out

    def post_detection(volume: Volume, inputs: dict, probs: np.ndarray, run_params: dict) -> Outputs:
        seg = post_segmentation(volume, inputs, probs, run_params)
        out = Outputs()
        spacing = np.asarray(volume.spacing)
        for s in seg.segments:
            components, n = ndimage.label(s.full_mask())
            for c in range(1, n + 1):
                voxels = np.argwhere(components == c)
                lo, hi = voxels.min(axis=0), voxels.max(axis=0)
                diameter = float(2 * (len(voxels) * np.prod(spacing) * 3 / (4 * np.pi)) ** (1 / 3))
                out.detections.append(
                    Detection(
                        label=s.label,
                        finding_type=s.property_type,
                        center_kji=tuple(voxels.mean(axis=0).tolist()),
                        box_kji=(tuple(lo.astype(float).tolist()), tuple(hi.astype(float).tolist())),
                        score=1.0,
                        diameter_mm=round(diameter, 1),
                        tracking_id=f"{s.tracking_id}-{c}",
                    )
                )
        return out

    def prep_2d(volume: Volume, run_params: dict) -> np.ndarray:
        size = tuple(int(s) for s in params.get("size", (224, 224)))
        x = torch.from_numpy(np.stack([_normalise(f, params) for f in volume.pixels])[:, None])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).numpy()

    def infer_2d(predictor, images: np.ndarray, ctx: RunContext) -> np.ndarray:
        with ctx.inference():
            logits = predictor.torch_module()(torch.from_numpy(images).to(ctx.device))
            return _activate(logits, output)[:, :].cpu().numpy()

    def post_classification(volume: Volume, images, probs: np.ndarray, run_params: dict) -> Outputs:
        probs = probs.reshape(len(images), -1).max(axis=0)
        threshold = float(params.get("threshold", 0.5))
        out = Outputs()
        for name, p in zip(labels or ["finding"], probs[-max(1, len(labels)) :]):
            _, ptype = codes_for(name)
            out.classifications.append(
                Classification(label=name, finding=ptype, probability=float(p), threshold=threshold)
            )
        return out

    def prep_image(volume: Volume, run_params: dict) -> dict:
        return {
            "image": _normalise(volume.pixels, params)[None],
            "mean": float(volume.pixels.mean()),
            "std": float(volume.pixels.std()),
        }

    def infer_image(predictor, inputs: dict, ctx: RunContext) -> np.ndarray:
        with ctx.inference():
            return (
                predictor.torch_module()(torch.from_numpy(inputs["image"][None]).to(ctx.device)).float().cpu().numpy()
            )

    def post_reconstruction(volume: Volume, inputs: dict, raw: np.ndarray, run_params: dict) -> Outputs:
        img = raw.reshape(volume.pixels.shape)
        window = params.get("window")
        img = (
            img * (float(window[1]) - float(window[0])) + float(window[0])
            if window
            else img * inputs["std"] + inputs["mean"]
        )
        return Outputs(
            derived=[
                DerivedImage(
                    pixels=img.astype(np.float32),
                    series_description=str(params.get("series_description", "Processed")),
                    derivation_description=str(params.get("derivation_description", "model output")),
                )
            ]
        )

    def post_ef(volume: Volume, inputs: dict, raw: np.ndarray, run_params: dict) -> Outputs:
        value = float(np.asarray(raw).ravel()[0])
        return Outputs(
            measurements=[
                Measurement(
                    name=("10230-1", "LN", "Left ventricular Ejection fraction"),
                    value=round(value, 1),
                    unit=("%", "UCUM", "percent"),
                )
            ]
        )

    if task == "segmentation":
        return Steps("3d", prep_3d, infer_3d, post_segmentation)
    if task == "detection":
        return Steps("3d", prep_3d, infer_3d, post_detection)
    if task == "classification":
        return Steps("2d", prep_2d, infer_2d, post_classification)
    if task == "reconstruction":
        return Steps("3d", prep_image, infer_image, post_reconstruction)
    return Steps("2d+t", prep_image, infer_image, post_ef)


# --- loading configured models ---------------------------------------------------------------


class _Predictor:
    """A uniform callable over TorchScript, ONNX and MONAI-bundle models: numpy in, numpy out."""

    def __init__(self, fmt: str, path: Path, device: str):
        self.fmt, self.device = fmt, device
        if fmt == "onnx":
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"]
                if device.startswith("cuda")
                else ["CPUExecutionProvider"]
            )
            providers = [p for p in providers if p in ort.get_available_providers()]
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.input_name = self.session.get_inputs()[0].name
        elif fmt == "torchscript":
            self.module = torch.jit.load(str(path), map_location=device).eval()
        elif fmt == "monai_bundle":
            self.module = _load_monai_bundle(path, device)
        else:
            raise AnalysisError(f"unknown model format {fmt!r}")

    def torch_module(self):
        """The model as a torch callable (ONNX wrapped), for MONAI sliding-window inference."""
        if self.fmt != "onnx":
            return self.module

        def call(x: torch.Tensor) -> torch.Tensor:
            out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(out).to(x.device)

        return call


def _load_monai_bundle(path: Path, device: str):
    """A MONAI bundle folder: models/model.ts (TorchScript), or configs' network_def + models/model.pt."""
    path = Path(path)
    ts = path / "models" / "model.ts"
    if ts.exists():
        return torch.jit.load(str(ts), map_location=device).eval()
    config = next(
        (path / "configs" / n for n in ("inference.json", "inference.yaml") if (path / "configs" / n).exists()), None
    )
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
    path = Path(cfg.path)
    version = str(cfg.params.get("version") or (_bundle_version(path) if cfg.format == "monai_bundle" else "1"))
    weights = _weights_file(cfg.format, path)
    steps = steps_for(cfg.task, list(cfg.labels), dict(cfg.params))
    return Analysis(
        name=cfg.name,
        task=cfg.task,
        modalities=tuple(cfg.modalities),
        dimensionality=steps.dimensionality,
        algorithm_name=cfg.params.get("algorithm_name", cfg.name),
        version=version,
        load=lambda device: _Predictor(cfg.format, path, device),
        preprocess=steps.preprocess,
        infer=steps.infer,
        postprocess=steps.postprocess,
        weights=weights,
        card=Path(cfg.params["card"]) if cfg.params.get("card") else None,
        description=f"{cfg.format} model at {path}",
        gpu_memory_bytes=int(cfg.params.get("gpu_memory_bytes", 1 << 30)),
        source=cfg.format,
        intended_use=cfg.intended_use,
    )
