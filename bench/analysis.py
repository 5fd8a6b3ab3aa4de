"""Seconds per study for each analysis, split by stage, on this machine's CPU (and GPU if any).

    PYTHONPATH=. python bench/analysis.py --json [--only ct-segmentation] [--repeat 2] [--small] [--reference]

Each analysis that declares an ``example`` input writes one example series as DICOM; the bench
times load/decode (``imaging.load_series``), then ``registry.run_analysis``'s preprocess,
inference and postprocess stages (after one warm-up run, so model loading is reported apart).
The peer in the same run is the loader most scripts use: pydicom reads sorted by Instance
Number and stacked, without geometry checks. GPU fields are null when no CUDA device exists.
For 2D analyses ``batch_images_per_s`` is the inference rate over a batch of 256 inputs.
``--reference`` also times, on the GPU, the workloads the issue names as the bar: an nnU-Net-sized
3D U-Net (MONAI DynUNet, 32-320 channels) over a 300 x 512 x 512 CT in 128-cubed windows, and
DenseNet-121 on 512-pixel images, both with AMP, so our models' inference can be read against them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402

from workers.analysis import imaging, registry  # noqa: E402


def naive_load(paths: list[Path]) -> np.ndarray:
    """The peer: read every file, sort by Instance Number, stack pixels with rescale."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.get("InstanceNumber", 0)))
    return np.stack(
        [d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0)) for d in datasets]
    ).astype(np.float32)


def time_device(name: str, volume, device: str, repeat: int) -> dict:
    """Median stage timings over ``repeat`` runs after a warm-up (which loads the model)."""
    params = {"device": device}
    warm = registry.run_analysis(name, volume, params)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [registry.run_analysis(name, volume, params).timings_s for _ in range(repeat)]
    out = {
        stage: round(statistics.median(r[stage] for r in runs), 4)
        for stage in ("preprocess", "inference", "postprocess")
    }
    out["load_model_s"] = round(warm.timings_s["load_model"], 4)
    out["peak_gpu_memory_mib"] = (
        round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None
    )
    frames = volume.pixels.shape[0]
    out["images_per_s"] = round(frames / out["inference"], 1) if out["inference"] > 0 else None
    analysis = registry.get_analysis(name)
    if analysis.dimensionality == "2d":
        out["batch_images_per_s"] = batch_rate(analysis, volume, device)
    return out


def batch_rate(analysis, volume, device: str, n: int = 256) -> float:
    """Images per second of ``analysis.infer`` over ``n`` copies of the volume's first prepared image."""
    inputs = analysis.preprocess(volume, {})
    first = inputs[:1]
    batch = (
        first.repeat(n, *([1] * (first.ndim - 1))) if isinstance(first, torch.Tensor) else np.repeat(first, n, axis=0)
    )
    model = registry.loaded_model(analysis, device)
    ctx = registry.RunContext(device=device, autocast=device.startswith("cuda"))
    analysis.infer(model, batch[:8], ctx)  # warm-up (cuDNN autotuning, allocator)
    t = time.perf_counter()
    analysis.infer(model, batch, ctx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return round(n / (time.perf_counter() - t), 1)


def reference_workloads(repeat: int) -> dict:
    """The issue's reference points on this GPU: nnU-Net-sized 3D U-Net sliding window, DenseNet-121."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DenseNet121, DynUNet

    unet = (
        DynUNet(
            3,
            1,
            8,
            kernel_size=[3] * 6,
            strides=[1, 2, 2, 2, 2, 2],
            upsample_kernel_size=[2] * 5,
            filters=[32, 64, 128, 256, 320, 320],
            norm_name="instance",
        )
        .cuda()
        .eval()
    )
    ct = torch.randn(1, 1, 300, 512, 512, device="cuda")
    densenet = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).cuda().eval()
    images = torch.randn(256, 1, 512, 512, device="cuda")

    def timed(fn) -> float:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            fn()
            torch.cuda.synchronize()
            runs = []
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    unet_s = timed(lambda: sliding_window_inference(ct, (128, 128, 128), 4, unet, overlap=0.5, mode="gaussian"))
    dense_s = timed(lambda: densenet(images))
    return {
        "nnunet_sized_3d_unet_300x512x512_128cube_s": round(unet_s, 3),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "densenet121_512px_images_per_s": round(256 / dense_s, 1),
    }


def bench(names: list[str], repeat: int, small: bool, reference: bool = False) -> dict:
    """The benchmark report for the named analyses (all with an example input when empty)."""
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "analyses": {},
    }
    for name, analysis in sorted(registry.builtin_analyses().items()):
        if names and name not in names:
            continue
        if analysis.example is None:
            report["analyses"][name] = {"skipped": "the analysis declares no example input"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            kwargs = {"shape": (40, 128, 128), "spacing": (6.0, 2.8, 2.8)} if small and name.startswith("ct-") else {}
            paths = analysis.example(Path(tmp), **kwargs)
            t = time.perf_counter()
            volume = imaging.load_series(paths)
            load_s = time.perf_counter() - t
            t = time.perf_counter()
            naive_load(paths)
            peer_s = time.perf_counter() - t
            entry = {
                "input": {
                    "shape_kji": list(volume.pixels.shape),
                    "spacing_mm": [round(s, 3) for s in volume.spacing],
                    "files": len(paths),
                },
                "load_decode_s": round(load_s, 4),
                "peer_naive_pydicom_load_s": round(peer_s, 4),
                "cpu": time_device(name, volume, "cpu", repeat),
                "gpu": time_device(name, volume, "cuda", repeat) if torch.cuda.is_available() else None,
            }
            entry["cpu"]["total_s"] = round(
                load_s + sum(entry["cpu"][s] for s in ("preprocess", "inference", "postprocess")), 4
            )
            report["analyses"][name] = entry
    if reference and torch.cuda.is_available():
        report["reference_gpu"] = reference_workloads(repeat)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--only", action="append", default=[], help="analysis name (repeatable)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="small CT inputs (smoke runs)")
    parser.add_argument("--reference", action="store_true", help="also time the issue's reference GPU workloads")
    args = parser.parse_args()
    report = bench(args.only, args.repeat, args.small, args.reference)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
