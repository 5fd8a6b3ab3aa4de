"""CT organ and lesion segmentation: a small MONAI 3D U-Net trained on the project's phantoms.

Pipeline: the series is resampled onto an axis-aligned 4 mm grid (``imaging.canonical_grid``),
intensities go to two windows (soft tissue and wide), MONAI sliding-window inference gives class
probabilities, which are sampled back at every source voxel (trilinear) and arg-maxed, so the
label mask lies exactly on the source images whatever their orientation or slice order. A second
pass at 2 mm (``lesion_refinement.py``) then decides the lesion voxels around every lesion candidate.

Classes: ``phantoms.LABELS`` (lung, liver, spleen, kidney, spine, liver lesion, lung nodule).
Reference model for demonstration and pipeline verification, not for diagnosis.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.analysis import imaging
from workers.synthetic import phantoms
from workers.analysis.findings import Measurement, Segment, Volume
from workers.analysis.registry import Analysis, Outputs, RunContext, codes_for
from workers.analysis.models.common import CARDS, weights_dir

log = logging.getLogger(__name__)

NAME = "ct-segmentation"
VERSION = "2.1.0"
WEIGHTS = weights_dir() / "ct_segmentation.pt"
CARD = CARDS / "ct-segmentation.md"
SPACING_MM = 4.0
N_CLASSES = 1 + len(phantoms.LABELS)
CHANNELS = (16, 32, 64, 128)
ROI = (64, 64, 64)
TRAIN_PATCH = (48, 48, 48)  # CPU training patches
TRAIN_PATCH_GPU = (64, 64, 64)  # GPU training patches (the inference window)
WINDOWS = ((-160.0, 240.0), (-1024.0, 600.0))


def build_network(channels: tuple[int, ...] = CHANNELS):
    """The 3D U-Net (MONAI): 2 input windows, one output channel per class."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=len(WINDOWS), out_channels=N_CLASSES, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=1, norm="instance")


def intensity_channels(hu: np.ndarray) -> np.ndarray:
    """(2, ...) float32: HU scaled to 0..1 in a soft-tissue window and a wide (lung/bone) window."""
    return np.stack([np.clip((hu - lo) / (hi - lo), 0, 1) for lo, hi in WINDOWS]).astype(np.float32)


def load(device: str):
    """The trained network on ``device`` (eval mode)."""
    import torch

    net = build_network()
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.to(device).eval()


@dataclass
class Models:
    """The 4 mm network and the 2 mm lesion refinement network (None: 4 mm lesion labels only)."""

    net: object
    refiner: object | None


def load_with_refinement(device: str) -> Models:
    """Both networks of the analysis on ``device`` (eval mode)."""
    from workers.analysis.models import lesion_refinement

    return Models(load(device), lesion_refinement.load(device))


def preprocess(volume: Volume, params: dict) -> dict:
    """Resample to the 4 mm axis-aligned working grid and window the intensities (the volume is
    kept for the 2 mm lesion pass, which cuts its patches from the source)."""
    shape, affine = imaging.canonical_grid(volume, SPACING_MM)
    hu = imaging.resample_to_grid(volume, shape, affine, order=1, fill=-1024.0)
    return {"image": intensity_channels(hu), "affine": affine, "volume": volume}


def infer(model, inputs: dict, ctx: RunContext) -> np.ndarray:
    """Class probabilities (C, k, j, i) on the working grid, by MONAI sliding-window inference
    (``model``: the 4 mm network, or the analysis's ``Models``, whose 4 mm network runs)."""
    import torch
    from monai.inferers import sliding_window_inference

    model = model.net if isinstance(model, Models) else model
    x = torch.from_numpy(inputs["image"][None]).to(ctx.device)
    with ctx.inference():
        logits = sliding_window_inference(x, ROI, sw_batch_size=int(ctx.params.get("sw_batch_size", 2)),
                                          predictor=model, overlap=0.25, mode="gaussian")
        probs = torch.softmax(logits.float(), dim=1)[0]
    return probs.cpu().numpy()


def infer_with_refinement(models: Models, inputs: dict, ctx: RunContext) -> dict:
    """The 4 mm class probabilities and the 2 mm lesion patches around their lesion candidates."""
    from workers.analysis.models import lesion_refinement

    probs = infer(models.net, inputs, ctx)
    if models.refiner is None or not ctx.params.get("refine_lesions", True):
        return {"probs": probs, "patches": []}
    patches = lesion_refinement.refine(models.refiner, inputs["volume"], probs, inputs["affine"], ctx.device)
    return {"probs": probs, "patches": patches}


def labels_on_source(volume: Volume, inputs: dict, probs: np.ndarray) -> np.ndarray:
    """Arg-max label at every source voxel from working-grid probabilities (trilinear).

    ``imaging.argmax_on_source`` gives the labels of ``resample_back(...).argmax(0)`` voxel for
    voxel without sampling 8 class volumes at full resolution (it interpolates only in working
    cells whose corners disagree): about 1 s instead of 20 s for a 300 x 256 x 256 CT on 2 cores.
    """
    return imaging.argmax_on_source(volume, inputs["affine"], probs).astype(np.uint8)


def refined_labels(volume: Volume, inputs: dict, raw: dict | np.ndarray) -> np.ndarray:
    """Labels on the source grid: the 4 mm arg-max, with the 2 mm pass's lesion decision inside
    its patches (``raw`` from ``infer_with_refinement``; a plain probability array: 4 mm only)."""
    from workers.analysis.models import lesion_refinement

    if isinstance(raw, np.ndarray):
        return labels_on_source(volume, inputs, raw)
    labels = labels_on_source(volume, inputs, raw["probs"])
    return lesion_refinement.apply(volume, labels, raw["probs"], inputs["affine"], raw["patches"])


def postprocess(volume: Volume, inputs: dict, raw: dict | np.ndarray, params: dict) -> Outputs:
    """One segment per class found, plus each structure's volume in cm3."""
    labels = refined_labels(volume, inputs, raw)
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000.0
    out = Outputs()
    for value, name in phantoms.LABELS.items():
        mask = labels == value
        if not mask.any():
            continue
        category, ptype = codes_for(name)
        out.segments.append(Segment(label=name.replace("_", " "), mask=mask, property_type=ptype,
                                    property_category=category, tracking_id=name))
        out.measurements.append(Measurement(name=("118565006", "SCT", "Volume"), value=round(float(mask.sum()) * voxel_cm3, 2),
                                            unit=("cm3", "UCUM", "cubic centimeter"),
                                            segment_label=name.replace("_", " "), finding_site=ptype, tracking_id=name))
    return out


def example_series(folder: Path, shape: tuple[int, int, int] = (80, 256, 256),
                   spacing: tuple[float, float, float] = (3.0, 1.4, 1.4)) -> list[Path]:
    """A clinical-sized phantom CT series (for benchmarks): 80 x 256 x 256 at 3 x 1.4 x 1.4 mm."""
    return phantoms.write_ct_series(phantoms.make_ct_phantom(123, shape=shape, spacing=spacing), folder)


def analyses() -> list[Analysis]:
    """The CT segmentation analysis (discovered by the registry)."""
    from workers.analysis.models import lesion_refinement

    return [Analysis(
        name=NAME, task="segmentation", modalities=("CT",), dimensionality="3d",
        algorithm_name="ainode CT organ and lesion U-Net", version=VERSION,
        load=load_with_refinement, preprocess=preprocess, infer=infer_with_refinement, postprocess=postprocess,
        weights=WEIGHTS, extra_weights=(lesion_refinement.WEIGHTS,), card=CARD, gpu_memory_bytes=1 << 30,
        description="3D U-Net: lung, liver, spleen, kidney, spine, liver lesions, lung nodules on CT",
        example=example_series,
    )]


# --- training and evaluation ------------------------------------------------------------------

TRAIN_SEEDS = range(0, 100_000)  # held-out seeds are 900_000+, tuning seeds 800_000+
HELD_OUT_SEEDS = range(900_000, 900_100)


def training_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One training example exactly as the network meets a series at inference.

    A lesion-rich phantom is rendered on a random source geometry (orientation, slice order,
    spacing 2-6.5 mm in-plane and 1.5-7 mm between slices, field of view and centre, so the body's
    ends and the air beyond them appear), goes through ``preprocess`` like any series, and is paired
    with the exact labels at the working grid's voxel centres (0 outside the source's field of
    view). Returns (image (2, k, j, i) float32, labels (k, j, i) uint8), padded to at least
    ``TRAIN_PATCH``.
    """
    anatomy, volume = training_series(seed)
    inputs = preprocess(volume, {})
    shape = inputs["image"].shape[1:]
    labels = phantoms.labels_at(anatomy, phantoms.Grid(shape, inputs["affine"]))
    labels[~_inside_source(volume, shape, inputs["affine"])] = 0
    pad = [(0, max(0, want - have)) for want, have in zip(TRAIN_PATCH_GPU, shape)]
    return np.pad(inputs["image"], [(0, 0)] + pad), np.pad(labels, pad)


def training_series(seed: int) -> tuple[phantoms.Anatomy, Volume]:
    """The lesion-rich anatomy and the series rendered from it on a random source geometry that
    ``training_case`` (and the lesion refinement's training) start from."""
    from workers.analysis.findings import SourceFrame

    rng = np.random.default_rng(seed + 7_000_001)
    orientation = str(rng.choice(["axial", "axial", "coronal", "sagittal", "oblique"]))
    in_plane, thick = float(rng.uniform(2.0, 6.5)), float(rng.uniform(1.5, 7.0))
    n = min(112, int(rng.uniform(300, 420) / in_plane))
    slices = min(112, int(rng.uniform(180, 380) / thick))
    centre = (float(rng.uniform(-20, 20)), float(10 + rng.uniform(-20, 20)), float(-10 + rng.uniform(-60, 60)))
    anatomy = phantoms.make_anatomy(np.random.default_rng(seed), liver_lesions=(1, 4), lung_nodules=(1, 4))
    grid = phantoms.make_grid((slices, n, n), (thick, in_plane, in_plane), orientation,  # type: ignore[arg-type]
                              descending=bool(rng.integers(2)), center_mm=centre, rng=rng)
    phantom = phantoms.render(anatomy, grid, rng, noise_hu=float(rng.uniform(8, 25)))
    return anatomy, Volume(phantom.hu, phantom.affine, [SourceFrame("", "", Path("."))] * slices, "", "", "", "CT")


def _inside_source(volume: Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Voxels of a grid whose centre lies inside the source series' field of view."""
    to_src = np.linalg.inv(volume.affine) @ affine
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ to_src.T
    limits = volume.pixels.shape[::-1]  # (i, j, k) sizes
    return np.all([(ijk[..., a] >= -0.5) & (ijk[..., a] <= limits[a] - 0.5) for a in range(3)], axis=0)


def _random_patch(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, size: tuple[int, int, int]):
    """A training patch; half of them centred (+-8 voxels) on a lesion voxel so small lesions are learned."""
    shape = np.asarray(labels.shape)
    size_a = np.asarray(size)
    lesion_voxels = np.argwhere(labels >= 6)
    if len(lesion_voxels) and rng.random() < 0.5:
        centre = lesion_voxels[rng.integers(len(lesion_voxels))] + rng.integers(-8, 9, 3)
    else:
        centre = rng.integers(size_a // 2, shape - size_a // 2 + 1)
    start = np.clip(centre - size_a // 2, 0, shape - size_a)
    sl = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size_a))
    return image[(slice(None), *sl)], labels[sl]


class _CaseStream:
    """Training cases generated by a process pool in the background; the trainer samples the cases
    ready so far (replacing the oldest once ``keep`` are held), so the GPU never waits for phantoms."""

    def __init__(self, seeds: range, workers: int, keep: int):
        import multiprocessing
        import threading

        self.cases: list[tuple[np.ndarray, np.ndarray]] = []
        self.made = 0
        self._keep = keep
        self._lock = threading.Lock()
        self._pool = multiprocessing.get_context("spawn").Pool(workers)
        self._results = self._pool.imap_unordered(training_case, seeds)
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        for case in self._results:
            with self._lock:
                if len(self.cases) < self._keep:
                    self.cases.append(case)
                else:
                    self.cases[self.made % self._keep] = case
                self.made += 1

    def wait_for(self, n: int) -> None:
        """Block until ``n`` cases exist (or all seeds are done)."""
        while len(self.cases) < n and self._thread.is_alive():
            time.sleep(0.2)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.cases[int(rng.integers(len(self.cases)))]

    def close(self) -> None:
        self._pool.terminate()



def train(out: Path | None = None, quick: bool = False, minutes: float | None = None, seed: int = 0,
          resume_from: Path | None = None, max_lr: float = 3e-3, device: str | None = None,
          workers: int | None = None, channels: tuple[int, ...] = CHANNELS) -> dict:
    """Train the U-Net on generated phantoms (``training_case``) and save the weights; returns a summary.

    On a CUDA device (picked automatically when there is one) phantoms are generated by all CPU
    cores while the GPU trains on 64-cubed patches in batches of 8 with bf16 autocast; on the CPU a
    fixed set of cases is generated first and the network trains on 48-cubed patches, 2 at a time.
    The learning-rate schedule follows the clock (``minutes``: default 7.5 on a GPU, as for the
    shipped weights, and 40 on a CPU), not a step count, so it anneals by the end of the budget
    whatever the machine's speed.
    """
    import os

    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    workers = workers or max(1, (os.cpu_count() or 2) - (1 if gpu else 0))
    patch, batch = (TRAIN_PATCH_GPU, 8) if gpu else (TRAIN_PATCH, 2)
    n_cases = 2 if quick else (len(TRAIN_SEEDS) if gpu else 48)
    budget_s = 60 * (minutes if minutes is not None else (1 if quick else 7.5 if gpu else 40))
    started = time.monotonic()
    stream = _CaseStream(range(TRAIN_SEEDS.start, TRAIN_SEEDS.start + n_cases), workers,
                         keep=2000 if gpu else n_cases)
    stream.wait_for(min(n_cases, 32 if gpu else n_cases))
    log.info("%d training cases ready after %.0f s", len(stream.cases), time.monotonic() - started)
    net = build_network(channels)
    if resume_from:
        net.load_state_dict(torch.load(resume_from, map_location="cpu", weights_only=True))
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=max_lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    net.train()
    losses: list[float] = []
    step = 0
    train_start = time.monotonic()
    train_budget = max(1.0, budget_s - (train_start - started))
    while True:
        fraction = min(1.0, (time.monotonic() - train_start) / train_budget)
        if fraction >= 1 and step >= 3:  # a few steps even when phantom generation ate the budget
            break
        step += 1
        warm = min(1.0, step / 100)
        for group in opt.param_groups:
            group["lr"] = max_lr * warm * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * fraction)))
        pairs = [_random_patch(rng, *stream.sample(rng), patch if not quick else TRAIN_PATCH) for _ in range(batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device, non_blocking=True)
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)[:, None]).to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log.info("step %d loss %.4f (%.0f s, %d cases made)", step, np.mean(losses[-50:]),
                     time.monotonic() - started, stream.made)
    stream.close()
    out = Path(out) if out else WEIGHTS
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out)
    summary = {"model": NAME, "version": VERSION, "steps": step, "batch": batch, "patch": list(patch),
               "cases_generated": stream.made, "channels": list(channels), "device": device,
               "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.monotonic() - started, 1),
               "weights": str(out)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def evaluate(seeds, device: str = "cpu", phantom=None, refine: bool = True, refiner=None) -> dict:
    """Dice per class on held-out phantoms of random spacing/orientation, on the source grid.

    ``phantom`` makes the phantom of a seed: ``phantoms.random_ct_phantom`` (default: coarse
    4.5-6.5 mm grids of at most 64 voxels, quick enough for CI) or ``phantoms.clinical_ct_phantom``
    (1.5-2.5 mm). ``per_class`` is the mean of per-phantom Dice (phantoms where the class is
    absent in both truth and prediction are skipped); ``global`` pools every voxel of the set;
    ``predicted_only`` counts phantoms with a lesion class predicted but not in the truth. With
    ``refine`` (the default) these are the labels after the 2 mm lesion pass (``refiner``, a
    network, else the shipped weights), and ``before_refinement`` scores the 4 mm labels alone in
    the same run; ``refine_seconds`` is the time the 2 mm pass added (patches and labels).
    """
    from workers.analysis.findings import SourceFrame
    from workers.analysis.models import lesion_refinement

    model = load(device)
    if not refine:
        refiner = None
    elif refiner is None:
        refiner = lesion_refinement.load(device)
    make = phantom or phantoms.random_ct_phantom
    scores = {"refined": _Scores(), "before": _Scores()}
    refine_s = 0.0
    for s in seeds:
        p = make(s)
        vol = Volume(p.hu, p.affine, [SourceFrame("", "", Path("."))] * p.hu.shape[0], "", "", "", "CT")
        inputs = preprocess(vol, {})
        probs = infer(model, inputs, RunContext(device))
        pred = labels_on_source(vol, inputs, probs)
        scores["before"].add(p.labels, pred)
        if refiner is not None:
            t = time.perf_counter()
            patches = lesion_refinement.refine(refiner, vol, probs, inputs["affine"], device)
            pred = lesion_refinement.apply(vol, pred, probs, inputs["affine"], patches)
            refine_s += time.perf_counter() - t
        scores["refined"].add(p.labels, pred)
    out = {**scores["refined"].summary(), "phantoms": len(list(seeds))}
    if refiner is not None:
        out["before_refinement"] = scores["before"].summary()
        out["refine_seconds"] = round(refine_s, 1)
    return out


class _Scores:
    """Per-phantom and pooled Dice of each class over a set of phantoms."""

    def __init__(self) -> None:
        self.per: dict[str, list[float]] = {n: [] for n in phantoms.LABELS.values()}
        self.pooled = {n: [0, 0] for n in phantoms.LABELS.values()}  # intersection, sum
        self.specks = {n: 0 for n in phantoms.LABELS.values()}  # phantoms with the class predicted only

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """Score one phantom's predicted labels against its true labels."""
        for value, name in phantoms.LABELS.items():
            t, q = truth == value, pred == value
            if t.any() or q.any():
                self.per[name].append(dice(t, q))
            self.specks[name] += int(q.any() and not t.any())
            self.pooled[name][0] += int(np.logical_and(t, q).sum())
            self.pooled[name][1] += int(t.sum() + q.sum())

    def summary(self) -> dict:
        """Mean per-phantom Dice, pooled Dice and the number of phantoms where the class is predicted
        but absent from the truth (false specks, Dice 0), by class name."""
        return {"per_class": {n: round(float(np.mean(v)), 4) if v else None for n, v in self.per.items()},
                "global": {n: round(2 * i / s, 4) if s else None for n, (i, s) in self.pooled.items()},
                "predicted_only": {n: self.specks[n] for n in phantoms.LESION_LABELS}}
