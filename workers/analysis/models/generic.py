"""Generic pre/postprocessing for configured (TorchScript, ONNX, MONAI bundle) models, per task.

A hospital describes its model in ``settings.analyses`` (task, labels, params); this module turns
that description into the preprocess / infer / postprocess steps of an ``Analysis``:

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

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from workers.analysis import imaging
from workers.analysis.findings import Classification, DerivedImage, Detection, Measurement, Segment, Volume
from workers.analysis.registry import Outputs, RunContext, codes_for


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
    import torch

    if output == "sigmoid":
        return torch.sigmoid(logits.float())
    if output == "raw":
        return logits.float()
    return torch.softmax(logits.float(), dim=dim)


def source_labels(volume: Volume, work_affine: np.ndarray, probs: np.ndarray, output: str,
                  threshold: float = 0.5) -> np.ndarray:
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
        import torch
        from monai.inferers import sliding_window_inference

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
                out.segments.append(Segment(label=name, mask=mask, property_type=ptype,
                                            property_category=category, tracking_id=name))
        return out

    def post_detection(volume: Volume, inputs: dict, probs: np.ndarray, run_params: dict) -> Outputs:
        from scipy import ndimage

        seg = post_segmentation(volume, inputs, probs, run_params)
        out = Outputs()
        spacing = np.asarray(volume.spacing)
        for s in seg.segments:
            components, n = ndimage.label(s.mask)
            for c in range(1, n + 1):
                voxels = np.argwhere(components == c)
                lo, hi = voxels.min(axis=0), voxels.max(axis=0)
                diameter = float(2 * (len(voxels) * np.prod(spacing) * 3 / (4 * np.pi)) ** (1 / 3))
                out.detections.append(Detection(
                    label=s.label, finding_type=s.property_type, center_kji=tuple(voxels.mean(axis=0).tolist()),
                    box_kji=(tuple(lo.astype(float).tolist()), tuple(hi.astype(float).tolist())),
                    score=1.0, diameter_mm=round(diameter, 1), tracking_id=f"{s.tracking_id}-{c}"))
        return out

    def prep_2d(volume: Volume, run_params: dict) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        size = tuple(int(s) for s in params.get("size", (224, 224)))
        x = torch.from_numpy(np.stack([_normalise(f, params) for f in volume.pixels])[:, None])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).numpy()

    def infer_2d(predictor, images: np.ndarray, ctx: RunContext) -> np.ndarray:
        import torch

        with ctx.inference():
            logits = predictor.torch_module()(torch.from_numpy(images).to(ctx.device))
            return _activate(logits, output)[:, :].cpu().numpy()

    def post_classification(volume: Volume, images, probs: np.ndarray, run_params: dict) -> Outputs:
        probs = probs.reshape(len(images), -1).max(axis=0)
        threshold = float(params.get("threshold", 0.5))
        out = Outputs()
        for name, p in zip(labels or ["finding"], probs[-max(1, len(labels)):]):
            _, ptype = codes_for(name)
            out.classifications.append(Classification(label=name, finding=ptype, probability=float(p), threshold=threshold))
        return out

    def prep_image(volume: Volume, run_params: dict) -> dict:
        return {"image": _normalise(volume.pixels, params)[None], "mean": float(volume.pixels.mean()),
                "std": float(volume.pixels.std())}

    def infer_image(predictor, inputs: dict, ctx: RunContext) -> np.ndarray:
        import torch

        with ctx.inference():
            return predictor.torch_module()(torch.from_numpy(inputs["image"][None]).to(ctx.device)).float().cpu().numpy()

    def post_reconstruction(volume: Volume, inputs: dict, raw: np.ndarray, run_params: dict) -> Outputs:
        img = raw.reshape(volume.pixels.shape)
        window = params.get("window")
        img = img * (float(window[1]) - float(window[0])) + float(window[0]) if window else img * inputs["std"] + inputs["mean"]
        return Outputs(derived=[DerivedImage(pixels=img.astype(np.float32),
                                             series_description=str(params.get("series_description", "Processed")),
                                             derivation_description=str(params.get("derivation_description", "model output")))])

    def post_ef(volume: Volume, inputs: dict, raw: np.ndarray, run_params: dict) -> Outputs:
        value = float(np.asarray(raw).ravel()[0])
        return Outputs(measurements=[Measurement(name=("10230-1", "LN", "Left ventricular Ejection fraction"),
                                                 value=round(value, 1), unit=("%", "UCUM", "percent"))])

    if task == "segmentation":
        return Steps("3d", prep_3d, infer_3d, post_segmentation)
    if task == "detection":
        return Steps("3d", prep_3d, infer_3d, post_detection)
    if task == "classification":
        return Steps("2d", prep_2d, infer_2d, post_classification)
    if task == "reconstruction":
        return Steps("3d", prep_image, infer_image, post_reconstruction)
    return Steps("2d+t", prep_image, infer_image, post_ef)
