"""Ingest benchmark: DCMTK storescu pushing a 300-slice 512x512 CT to DCMTK storescp and to ainode.

Both receivers get the same files from the same storescu, over 1 and over N parallel
associations, in one run. storescp runs with TCP_NODELAY=1 (without it DCMTK waits on delayed
ACKs on loopback) and with --fork for parallel associations; it does not fsync. ainode runs as
configured in production: every instance is durable (flushed to its receiver's journal, or for
large ones to its own file) before its Success; the index rows follow just after, and the
benchmark also reports how long after the last answer the index held every instance
(``ainode_index_lag_s``). A second part sends one large multi-frame instance (default 1 GiB)
and reports the receiving process's peak RSS.

CPU time per instance (``*_cpu_ms_per_instance``, from /proc) judges code changes better than
the rates on a shared machine: ainode's counts every process of the node from the first request
until the index holds every instance (``ainode_receivers_cpu_ms_per_instance``: without the
node's main process, whose background stages tick whatever arrives); storescp's includes its
forked association children. ``ratio_ceiling_if_cpu_bound`` is the ratio the two CPU figures
allow when both receivers saturate the machine with their senders (CPU seconds per instance of
storescp + its storescu over ainode + its storescu): with parallel associations on a small
machine the measured ratio cannot pass it. ``journal_flush_ms_median`` is the disk's price of durability per
answer with one association: a 512 KiB write into a preallocated file and its ``fdatasync``.
``--no-flush`` adds a clearly labelled diagnosis run with flushes disabled (libeatmydata).

When Orthanc is installed it is a second peer in the same run (``orthanc_ips``,
``ratio_vs_orthanc``, ``orthanc_cpu_ms_per_instance``): a PACS that, like ainode, makes every
instance durable before answering (its default ``SyncStorageArea`` flushes each file) and
indexes it (SQLite).

    python bench/ingest.py --json          # last line: JSON with dcmtk_mbps, ainode_mbps, ratio
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

from common import finish_work, hold_port, start_listening  # noqa: E402

from tests.helpers import NodeProcess, wait_for  # noqa: E402


def build_ct(folder: Path, slices: int = 300, size: int = 512) -> list[Path]:
    """A synthetic CT series: one file per slice, 16-bit pixels (different on every slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2000, (size, size), dtype=np.uint16)
    paths = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Ingest", "BENCH1", "CT"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "BENCH"
        ds.InstanceNumber, ds.SliceThickness = i + 1, 1.0
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (base + i).tobytes()
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build_multiframe(path: Path, megabytes: int) -> Path:
    """One multi-frame instance of about ``megabytes`` MiB (512x512 16-bit frames)."""
    frames = max(1, megabytes * 1024 * 1024 // (512 * 512 * 2))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", generate_uid()  # Enhanced CT
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Big", "BENCH2", "CT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = b"\x00\x01" * (frames * 512 * 512)
    ds.save_as(path, enforce_file_format=True)
    return path


_TICK = os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (through /proc/PID/task/TID/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def own_cpu_s(pid: int) -> float:
    """CPU seconds of one process alone (its threads; not its children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process, its live descendants and the
    descendants they have reaped (cutime/cstime), from /proc/PID/stat.

    CPU time per instance is what changes to the code are judged by: on a shared machine
    wall-clock rates move with the other work, CPU per instance far less.
    """
    total = 0
    for p in _process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


def _children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (the storescu processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def push(port: int, ae_title: str, files: list[Path], associations: int) -> float:
    """storescu over ``associations`` parallel associations; seconds until all have finished."""
    groups = [files[i::associations] for i in range(associations)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "STORESCU", "-aec", ae_title, "127.0.0.1", str(port), *map(str, g)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for g in groups
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def _reap_storescp_children(port: int) -> None:
    """storescp --fork reaps finished association children only before its next accept: two
    C-ECHOs make it reap every push child (and the first echo's), so their CPU time shows in
    its cutime/cstime."""
    for _ in range(2):
        subprocess.run(
            ["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        time.sleep(0.05)


def dcmtk_run(files: list[Path], associations: int, work: Path) -> tuple[float, float, float]:
    """Seconds for DCMTK storescp (TCP_NODELAY=1, --fork) to receive ``files``, and the CPU
    seconds of storescp (with its association children) and of the storescu senders."""
    out = work / f"storescp-{associations}"
    out.mkdir(parents=True)

    def start(ports: list[int]) -> subprocess.Popen:
        return subprocess.Popen(
            ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(ports[0])],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    proc, (port,) = start_listening(start)
    try:
        _reap_storescp_children(port)
        cpu0, sender0 = tree_cpu_s(proc.pid), _children_cpu_s()
        seconds = push(port, "STORESCP", files, associations)
        sender = _children_cpu_s() - sender0
        _reap_storescp_children(port)
        cpu = tree_cpu_s(proc.pid) - cpu0
        if len(list(out.iterdir())) != len(files):
            raise RuntimeError("storescp did not store every file")
        return seconds, cpu, sender
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def orthanc_run(files: list[Path], associations: int, work: Path) -> tuple[float, float]:
    """Seconds for Orthanc (a PACS: flushes each file and indexes it in SQLite before answering;
    default configuration) to receive ``files``, and its CPU seconds until it answered the last."""
    from node.demo import PACS_AE, OrthancPACS

    pacs = OrthancPACS(work / f"orthanc-{associations}")
    pacs.start()
    try:
        assert pacs.proc is not None
        cpu0 = tree_cpu_s(pacs.proc.pid)
        seconds = push(pacs.dicom_port, PACS_AE, files, associations)
        cpu = tree_cpu_s(pacs.proc.pid) - cpu0
        stored = pacs.instance_count()
        if stored != len(files):
            raise RuntimeError(f"Orthanc stored {stored} of {len(files)} instances")
        return seconds, cpu
    finally:
        pacs.stop()
        shutil.rmtree(pacs.folder, ignore_errors=True)


def _peak_rss_kib(pid: int) -> int:
    """Peak resident set (VmHWM) of a process and its children, the largest one."""
    peak = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak


def ainode_node(work: Path, name: str, receivers: int, env: dict[str, str] | None = None) -> NodeProcess:
    """A fresh ainode (own storage and SQLite index) with production durability settings
    (``env``: extra environment, only for the labelled no-flush diagnosis). Its DICOM port is
    held until it listens; it serves no API (no second port to race for)."""
    hold = hold_port()
    try:
        overrides = {
            "node": {"receivers": receivers, "port": hold.port},
            "storage": {"min_free_bytes": "1GiB"},
            "api": {"enabled": False},
        }
        return NodeProcess(work / name, overrides, env=env).start()
    finally:
        hold.release()


def ainode_run(
    files: list[Path], associations: int, work: Path, receivers: int, env: dict[str, str] | None = None
) -> dict[str, float]:
    """ainode receiving ``files`` (each durable before its answer): seconds until the last
    answer, its processes' CPU seconds from the first request until the index held every
    instance, seconds from the last answer until then (index lag), the storescu senders' CPU
    seconds and the receivers' peak RSS (KiB)."""
    import sqlite3

    node = ainode_node(work, f"ainode-{associations}", receivers, env)
    db = sqlite3.connect(node.database_url.split("///", 1)[1], timeout=30)
    try:
        time.sleep(0.5)  # let the node finish starting (its start-up CPU is not ingest)
        cpu0, main0, sender0 = tree_cpu_s(node.proc.pid), own_cpu_s(node.proc.pid), _children_cpu_s()
        seconds = push(node.port, node.ae_title, files, associations)
        sender = _children_cpu_s() - sender0
        answered = time.perf_counter()
        wait_for(lambda: db.execute("select count(*) from instances").fetchone()[0] >= len(files), 120, 0.01)
        lag = time.perf_counter() - answered
        cpu = tree_cpu_s(node.proc.pid) - cpu0
        main = own_cpu_s(node.proc.pid) - main0
        rss = _peak_rss_kib(node.proc.pid)
    finally:
        node.stop()
    count = db.execute("select count(*) from instances").fetchone()[0]
    db.close()
    if count != len(files):
        raise RuntimeError(f"ainode indexed {count} of {len(files)} instances")
    shutil.rmtree(node.workdir, ignore_errors=True)
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "receivers_cpu_s": cpu - main,
        "lag_s": lag,
        "sender_cpu_s": sender,
        "rss_kib": rss,
    }


def big_instance_run(work: Path, megabytes: int, receivers: int) -> dict[str, float]:
    """Send one large multi-frame instance; peak RSS of the receiving process against its size."""
    path = build_multiframe(work / "big.dcm", megabytes)
    size = path.stat().st_size
    node = ainode_node(work, "ainode-big", receivers)
    try:
        before = _peak_rss_kib(node.proc.pid)
        seconds = push(node.port, node.ae_title, [path], 1)
        peak = _peak_rss_kib(node.proc.pid)
    finally:
        node.stop()
        path.unlink()
    shutil.rmtree(node.workdir, ignore_errors=True)  # kept, node.log included, when it failed
    return {
        "size_mib": round(size / 2**20, 1),
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak / 1024, 1),
        "idle_rss_mib": round(before / 1024, 1),
        "peak_rss_over_size": round(peak * 1024 / size, 2),
    }


def fsync_latency_ms(folder: Path, rounds: int = 20, size: int = 512 * 1024) -> float:
    """Median cost of the per-file durable-write recipe for one slice on this disk, in the same run
    (write + fsync + rename + folder fsync: what a large instance costs)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload, times = os.urandom(size), []
    for i in range(rounds):
        start = time.perf_counter()
        tmp, final = folder / f"{i}.part", folder / f"{i}.dcm"
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        times.append(time.perf_counter() - start)
    shutil.rmtree(folder, ignore_errors=True)
    return round(float(np.median(times)) * 1000, 2)


def journal_flush_ms(folder: Path, rounds: int = 40, size: int = 512 * 1024) -> float:
    """Median cost of what one association waits for per instance at the least: one slice
    written into a preallocated file (like the receiver's journal) and ``fdatasync``."""
    folder.mkdir(parents=True, exist_ok=True)
    path, payload, times = folder / "journal", os.urandom(size), []
    slots = 16
    with open(path, "wb") as fh:  # preallocated and flushed: overwriting changes no metadata
        fh.write(bytes(size * slots))
        fh.flush()
        os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(rounds):
            start = time.perf_counter()
            os.pwrite(fd, payload, (i % slots) * size)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
    return round(float(np.median(times)) * 1000, 2)


def no_flush_env() -> dict[str, str]:
    """LD_PRELOAD of libeatmydata: fsync/fdatasync return at once. Only for the labelled
    diagnosis (``--no-flush``): it shows what bounds ainode besides the disk; it is no
    configuration, and answers given under it are not durable."""
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"):
        lib = Path(folder) / "libeatmydata.so"
        if lib.exists():
            return {"LD_PRELOAD": str(lib)}
    raise SystemExit("--no-flush needs libeatmydata (apt-get install eatmydata)")


def _ms_per_instance(seconds: float, files: int) -> float:
    return round(seconds * 1000 / files, 2)


def main() -> int:
    """Run the benchmark; print a summary and, last, one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="end with a JSON line (always printed last)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=4, help="associations in the parallel run")
    ap.add_argument("--receivers", type=int, default=0, help="ainode receiver processes (0: node default)")
    ap.add_argument("--big-mb", type=int, default=1024, help="size of the large instance (0: skip)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the best is reported")
    ap.add_argument(
        "--no-flush",
        action="store_true",
        help="DIAGNOSIS ONLY: also run ainode with fsync/fdatasync disabled (libeatmydata), "
        "reported apart as ainode_no_flush_*; never how ainode runs",
    )
    ap.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc peer (run when Orthanc is installed)")
    args = ap.parse_args()
    from node.demo import orthanc_binary

    with_orthanc = not args.no_orthanc and orthanc_binary() is not None

    work = Path(tempfile.mkdtemp(prefix="ainode-bench-"))
    succeeded = False
    try:
        files = build_ct(work / "ct", args.slices)
        n = len(files)
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"{n} files, {total_mb:.1f} MB", file=sys.stderr)
        result: dict = {
            "files": n,
            "megabytes": round(total_mb, 1),
            "cpu_cores": os.cpu_count(),
            "dcmtk_mbps": {},
            "ainode_mbps": {},
            "ratio": {},
            "dcmtk_ips": {},
            "ainode_ips": {},
            "dcmtk_cpu_ms_per_instance": {},
            "ainode_cpu_ms_per_instance": {},
            "ainode_receivers_cpu_ms_per_instance": {},
            "storescu_cpu_ms_per_instance": {},
            "ainode_index_lag_s": {},
            "ainode_peak_rss_mib": {},
        }
        result["durable_write_ms_median"] = fsync_latency_ms(work / "fsync")
        result["journal_flush_ms_median"] = journal_flush_ms(work / "flush")
        result["load_average_1min"] = round(os.getloadavg()[0], 2)
        for assoc in (1, args.parallel):
            key = str(assoc)
            dcmtk_runs, runs, orthanc_runs = [], [], []
            for _ in range(args.repeat):  # interleaved, so all see the same minute of load
                dcmtk_runs.append(dcmtk_run(files, assoc, work))
                runs.append(ainode_run(files, assoc, work, args.receivers))
                if with_orthanc:
                    orthanc_runs.append(orthanc_run(files, assoc, work))
            dcmtk = min(r[0] for r in dcmtk_runs)
            ours = min(r["seconds"] for r in runs)
            result["dcmtk_mbps"][key] = round(total_mb / dcmtk, 1)
            result["ainode_mbps"][key] = round(total_mb / ours, 1)
            result["ratio"][key] = round(dcmtk / ours, 2)
            result["dcmtk_ips"][key] = round(n / dcmtk)
            result["ainode_ips"][key] = round(n / ours)
            result["dcmtk_cpu_ms_per_instance"][key] = _ms_per_instance(min(r[1] for r in dcmtk_runs), n)
            result["ainode_cpu_ms_per_instance"][key] = _ms_per_instance(min(r["cpu_s"] for r in runs), n)
            result["ainode_receivers_cpu_ms_per_instance"][key] = _ms_per_instance(
                min(r["receivers_cpu_s"] for r in runs), n
            )
            result["storescu_cpu_ms_per_instance"][key] = _ms_per_instance(min(r["sender_cpu_s"] for r in runs), n)
            # Where both saturate the cores (parallel associations on a small machine), the
            # ratio cannot exceed what the CPU per instance allows, senders included.
            peer_cpu = min(r[1] for r in dcmtk_runs) + min(r[2] for r in dcmtk_runs)
            own_cpu = min(r["cpu_s"] for r in runs) + min(r["sender_cpu_s"] for r in runs)
            result.setdefault("ratio_ceiling_if_cpu_bound", {})[key] = round(peer_cpu / own_cpu, 2)
            if orthanc_runs:
                orthanc = min(r[0] for r in orthanc_runs)
                result.setdefault("orthanc_ips", {})[key] = round(n / orthanc)
                result.setdefault("ratio_vs_orthanc", {})[key] = round(orthanc / ours, 2)
                result.setdefault("orthanc_cpu_ms_per_instance", {})[key] = _ms_per_instance(
                    min(r[1] for r in orthanc_runs), n
                )
            result["ainode_index_lag_s"][key] = round(max(r["lag_s"] for r in runs), 3)
            result["ainode_peak_rss_mib"][key] = round(max(r["rss_kib"] for r in runs) / 1024, 1)
            print(
                f"{assoc} association(s): DCMTK {total_mb / dcmtk:.1f} MB/s, ainode {total_mb / ours:.1f} MB/s "
                f"(ratio {dcmtk / ours:.2f}); CPU ms/instance storescp "
                f"{result['dcmtk_cpu_ms_per_instance'][key]}, ainode {result['ainode_cpu_ms_per_instance'][key]}",
                file=sys.stderr,
            )
            if args.no_flush:
                diag = [ainode_run(files, assoc, work, args.receivers, no_flush_env()) for _ in range(args.repeat)]
                best = min(r["seconds"] for r in diag)
                result.setdefault("ainode_no_flush_ips", {})[key] = round(n / best)
                result.setdefault("ainode_no_flush_ratio", {})[key] = round(dcmtk / best, 2)
                result.setdefault("ainode_no_flush_cpu_ms_per_instance", {})[key] = _ms_per_instance(
                    min(r["cpu_s"] for r in diag), n
                )
                print(
                    f"  diagnosis without flushes (NOT durable): ainode {n / best:.0f} instances/s "
                    f"(ratio {dcmtk / best:.2f})",
                    file=sys.stderr,
                )
        if args.big_mb:
            result["large_instance"] = big_instance_run(work, args.big_mb, args.receivers)
            print(f"large instance: {result['large_instance']}", file=sys.stderr)
        result["load_average_1min_end"] = round(os.getloadavg()[0], 2)
        succeeded = True
    finally:
        finish_work(work, remove=succeeded)  # a failed run's node logs stay
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
