"""Seconds per stage of one CT segmentation study on this machine, from the files on disk to the
result files written: load, preprocess, inference, postprocess, and the writers (SEG, SR, KOS built,
then the files written), with an optional cProfile of each stage.

    PYTHONPATH=. python bench/profile_stages.py [--size 512] [--slices 300] [--repeat 3] [--profile]

The phantom CT (same geometry as ``bench/time_to_result.py``: 375 x 384 x 384 mm) is rendered once
and kept in the temp folder. The volume is loaded once per repeat; the model is loaded and every
stage run once before timing (imports, weights, allocator), so the numbers are those of a warm
worker. Each stage's median and every run are reported: on a shared machine the spread matters,
and so does ``cpu_median_s``, the process's CPU seconds (all threads), which other programs on the
machine disturb far less than the wall clock.
The worker's thread settings (``workers.worker.share_cpu_threads``) apply, as in the worker.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANALYSIS = "ct-segmentation"


def phantom_files(slices: int, size: int, seed: int = 7) -> list[Path]:
    """The phantom CT as DICOM files, rendered once into the temp folder."""
    from workers.synthetic import phantoms

    # The folder bench/time_to_result.py renders into: one rendering serves both.
    folder = Path(tempfile.gettempdir()) / f"ainode-phantom-{slices}x{size}x{size}-{seed}"
    done = folder / "complete"
    if not done.exists():
        spacing = (375.0 / slices, 384.0 / size, 384.0 / size)
        phantoms.write_ct_series(phantoms.make_ct_phantom(seed, shape=(slices, size, size), spacing=spacing), folder)
        done.write_text("ok")
    return sorted(folder.glob("*.dcm"))


class Stages:
    """Times (and optionally profiles) named stages; keeps every run's seconds."""

    def __init__(self, profile: bool) -> None:
        self.runs: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.profiles: dict[str, cProfile.Profile] = {}
        self.profile = profile

    def run(self, name: str, fn, *args):
        prof = self.profiles.setdefault(name, cProfile.Profile()) if self.profile else None
        t, c = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        try:
            return fn(*args)
        finally:
            if prof is not None:
                prof.disable()
            self.runs.setdefault(name, []).append(round(time.perf_counter() - t, 4))
            self.cpu.setdefault(name, []).append(round(time.process_time() - c, 4))

    def report(self) -> dict:
        return {
            name: {
                "median_s": round(statistics.median(r), 4),
                "runs_s": r,
                "cpu_median_s": round(statistics.median(self.cpu[name]), 4),
            }
            for name, r in self.runs.items()
        }

    def print_profiles(self, top: int) -> None:
        for name, prof in self.profiles.items():
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
            print(f"===== {name} =====\n{out.getvalue()}", file=sys.stderr)


def one_study(files: list[Path], stages: Stages, work: Path, tag: str) -> None:
    """Load, analyse and write one study, each stage timed."""
    from workers.analysis import imaging, registry
    from workers.analysis.contract import RunContext
    from workers.results import ResultContext
    from workers.results.context import UIDFactory
    from workers.results.kos import write_kos
    from workers.results.seg import write_seg
    from workers.results.sources import SourceImages, write
    from workers.results.sr import write_sr

    analysis = registry.get_analysis(ANALYSIS)
    volume = stages.run("load", imaging.load_series, files)
    model = registry.loaded_model(analysis, "cpu")
    ctx = RunContext(device="cpu", params={})
    inputs = stages.run("preprocess", analysis.preprocess, volume, {})
    raw = stages.run("inference", analysis.infer, model, inputs, ctx)
    outputs = stages.run("postprocess", analysis.postprocess, volume, inputs, raw, {})
    findings = registry.Findings(
        analysis=analysis.name,
        algorithm_name=analysis.algorithm_name,
        algorithm_version=analysis.version,
        model_sha256=registry.analysis_sha256(analysis),
        volume=volume,
        kind=analysis.task,
        segments=outputs.segments,
        measurements=outputs.measurements,
    )
    context = ResultContext(job_key=f"profile-{tag}", output_dir=work / tag)
    sources = SourceImages(volume.sources)
    stages.run("write_headers", lambda: sources.headers)
    uids = UIDFactory(context.job_key, [f.sop_instance_uid for f in sources.frames], findings.algorithm_version)
    seg = stages.run("write_seg_build", write_seg, findings, sources, context, uids)
    sr = stages.run("write_sr_build", write_sr, findings, sources, context, uids, seg)
    kos = stages.run("write_kos_build", write_kos, findings, sources, context, uids, [seg, sr])
    for kind, ds in (("seg", seg), ("sr", sr), ("kos", kos)):
        stages.run(f"write_{kind}_file", write, ds, Path(context.output_dir), f"{kind}-{ds.SOPInstanceUID}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile each stage (to stderr)")
    parser.add_argument("--top", type=int, default=25, help="functions listed per stage profile")
    parser.add_argument("--label", default="", help="a note kept in the JSON (e.g. before/after)")
    args = parser.parse_args()
    from workers.worker import share_cpu_threads

    share_cpu_threads(1)  # as the worker does, before torch is imported
    import torch

    from workers.tasks import collection_after_job

    files = phantom_files(args.slices, args.size)
    stages = Stages(args.profile)
    with tempfile.TemporaryDirectory(prefix="ainode-profile-") as tmp:
        one_study(files, Stages(False), Path(tmp), "warm")  # imports, weights, allocator
        for n in range(args.repeat):
            # As in the worker: no cyclic garbage collection inside a job (workers.tasks).
            with collection_after_job():
                one_study(files, stages, Path(tmp), f"run{n}")
    report = stages.report()
    groups = {
        "inference_total": ("preprocess", "inference", "postprocess"),
        "write_total": tuple(k for k in report if k.startswith("write_")),
    }
    summary = {g: round(sum(report[k]["median_s"] for k in ks), 3) for g, ks in groups.items()}
    summary.update({f"{g}_cpu": round(sum(report[k]["cpu_median_s"] for k in ks), 3) for g, ks in groups.items()})
    if args.profile:
        stages.print_profiles(args.top)
    print(
        json.dumps(
            {
                "label": args.label,
                "analysis": ANALYSIS,
                "input": {"slices": args.slices, "rows_columns": args.size, "files": len(files)},
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                },
                "repeat": args.repeat,
                "summary_median_s": summary,
                "stages": report,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
