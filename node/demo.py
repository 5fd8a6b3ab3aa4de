"""`ainode demo`: the whole node end to end on one machine, in a few minutes, with nothing to set up.

1. A local test PACS: Orthanc when installed, otherwise a small built-in pynetdicom storage SCP.
2. `ainode serve` on embedded defaults (SQLite, local storage, the embedded broker and worker),
   with one rule: CT → ct-segmentation → the test PACS.
3. A generated CT phantom (``workers.synthetic.phantoms``) pushed over C-STORE, with a progress bar.
4. Wait for the results to reach the PACS; print the per-stage timeline and the result objects;
   write a PNG of the key slice (the largest lesion at its widest cross-section) with the
   segmentation outline and lesion boxes.
5. With ``--out``: copy every result object that reached the PACS there.

Exit status 0 only when every result object the node produced is in the PACS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from node.admin.access import read_api_token, token_path
from node.admin.keyslice import key_slices, render_png, study_overlay
from node.core.dicom import SUCCESS
from node.core.logs import configure_logging
from node.core.settings import Settings, load_settings, resolve_paths
from node.dispatch.scu import associate
from workers.analysis.registry import available_analyses
from workers.synthetic import phantoms

console = Console(stderr=True)
REPO_ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = "ct-segmentation"
MODALITY_AE, PACS_AE = "DEMO_CT", "DEMO_PACS"
RESULT_TIMEOUT_S = 1800.0


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll until predicate() is true or timeout seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --- test PACS --------------------------------------------------------------------------------


@dataclass
class OrthancPACS:
    """Orthanc on loopback with its own storage under the work folder."""

    folder: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    name: str = "Orthanc"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ainode-demo",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": PACS_AE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")
        # DCMTK inside Orthanc sets TCP_NODELAY only when asked: without it each small answer
        # waits on a delayed ACK (~40 ms per C-STORE on loopback).
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [orthanc_binary() or "Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        if not wait_until(lambda: port_open(self.dicom_port) and port_open(self.http_port), 60):
            raise RuntimeError("Orthanc did not start; see " + str(self.folder / "orthanc.log"))

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return r.read()

    def instance_count(self) -> int:
        """How many instances the PACS holds."""
        return int(json.loads(self._get("/statistics"))["CountInstances"])

    def objects(self, study_uid: str) -> dict[str, bytes]:
        """SOP Instance UID -> file bytes of every instance of the study held by the PACS."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/find",
            method="POST",
            data=json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode(),
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            found = json.loads(r.read())
        return {item["MainDicomTags"]["SOPInstanceUID"]: self._get(f"/instances/{item['ID']}/file") for item in found}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class BuiltinPACS:
    """A minimal storage SCP (pynetdicom) that keeps what it receives in memory and on disk (written
    and fsynced before the C-STORE is acknowledged)."""

    folder: Path
    dicom_port: int = field(default_factory=free_port)
    name: str = "built-in storage SCP"
    received: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # sop uid -> (study uid, bytes)
    _server: Any = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta

            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            # Acknowledged means on disk, as a PACS would answer: the time-to-result bench
            # (bench/time_to_result_portable.py) counts this acknowledgement as "in the PACS".
            keep_file(self.folder / f"{ds.SOPInstanceUID}.dcm", data)
            self.received[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID), data)
            return SUCCESS

        self._server = ae.start_server(
            ("127.0.0.1", self.dicom_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def objects(self, study_uid: str) -> dict[str, bytes]:
        """SOP Instance UID -> file bytes of the study's instances received."""
        return {uid: data for uid, (study, data) in list(self.received.items()) if study == study_uid}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def keep_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: a temporary file, fsync, then renamed into place."""
    part = path.with_suffix(".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def orthanc_binary() -> str | None:
    """Orthanc's path when installed (Debian puts it in /usr/sbin)."""
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None
    )


def test_pacs(folder: Path) -> Any:
    """Orthanc when installed, else the built-in SCP; started."""
    pacs: Any = OrthancPACS(folder) if orthanc_binary() else BuiltinPACS(folder)
    pacs.start()
    return pacs


# --- the node -----------------------------------------------------------------------------------


def node_config(workdir: Path, pacs_port: int, analysis: str = ANALYSIS) -> dict[str, Any]:
    """Embedded defaults on loopback, with one rule sending CT segmentations to the test PACS."""
    return {
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": free_port(), "receivers": 1},
        "storage": {"path": str(workdir / "store"), "min_free_bytes": "64MiB"},
        "database": {"url": f"sqlite:///{workdir / 'ainode.db'}"},
        "broker": {"url": ""},
        "peers": [{"ae_title": MODALITY_AE, "hosts": ["127.0.0.1"]}],
        "destinations": [
            {
                "name": "test-pacs",
                "ae_title": PACS_AE,
                "host": "127.0.0.1",
                "port": pacs_port,
                "retry_initial_s": 1,
                "retry_max_s": 10,
            }
        ],
        "timers": {"series_quiet_s": 2, "study_quiet_s": 3},
        "rules": [
            {
                "name": "ct-organs",
                "match": {"modality": "CT"},
                "analyses": [analysis],
                "priority": "stat",
                "destinations": ["test-pacs"],
            }
        ],
        "api": {"host": "127.0.0.1", "port": free_port()},
        "audit": {"path": str(workdir / "audit.log")},
    }


class DemoNode:
    """`ainode serve` in a subprocess, logging to the work folder."""

    def __init__(self, workdir: Path, config: dict[str, Any]):
        self.config = config
        self.config_path = workdir / "ainode.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.config['api']['port']}"

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "-c", str(self.config_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        up = wait_until(
            lambda: (
                self.proc.poll() is not None
                or (port_open(self.config["node"]["port"]) and port_open(self.config["api"]["port"]))
            ),
            120,
        )
        if not up or self.proc.poll() is not None:
            raise RuntimeError("the node did not start:\n" + self.log_path.read_text(errors="replace")[-2000:])

    @cached_property
    def settings(self) -> Settings:
        """The node's settings, as `ainode serve` resolved them."""
        return resolve_paths(load_settings(self.config_path), self.config_path.parent)

    def get(self, path: str) -> Any:
        # The demo configures no api.token: the node generated one into its storage folder.
        request = urllib.request.Request(
            self.api + path, headers={"Authorization": f"Bearer {read_api_token(self.settings)}"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- the steps ----------------------------------------------------------------------------------


def make_study(folder: Path) -> tuple[str, list[Path]]:
    """A generated abdomen CT phantom with lesions, written as a DICOM series."""
    phantom = phantoms.make_ct_phantom(seed=2024, liver_lesions=(2, 2), lung_nodules=(1, 1))
    paths = phantoms.write_ct_series(
        phantom, folder, patient_id="DEMO0001", patient_name="Demo^Phantom", accession_number="DEMO0001"
    )

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths


def push(paths: list[Path], port: int) -> int:
    """C-STORE the files to the node on one association, with a progress bar; failures counted."""
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(CTImageStorage)
    assoc = associate(ae, "127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    failed = 0
    with _progress() as bar:
        task = bar.add_task("C-STORE to AINODE", total=len(paths))
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if not status or status.Status != 0:
                failed += 1
            bar.advance(task)
    assoc.release()
    return failed


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def wait_for_results(node: DemoNode, study_uid: str, timeout: float) -> dict[str, Any] | None:
    """Follow the study through the pipeline until delivered or failed; the final study view."""
    phases = ["received", "ready", "queued", "running", "delivered"]
    view: dict[str, Any] | None = None
    with _progress() as bar:
        task = bar.add_task("waiting for the node", total=len(phases))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                view = node.get(f"/api/studies/{study_uid}")
            except Exception:  # noqa: BLE001 - not indexed yet
                view = None
            if view:
                phase = view["phase"]
                bar.update(
                    task,
                    description=f"study is {phase}",
                    completed=phases.index(phase) + 1 if phase in phases else bar.tasks[0].completed,
                )
                if phase in ("delivered", "failed", "unrouted", "done"):
                    if phase != "delivered" or all(d["state"] in ("delivered", "skipped") for d in view["deliveries"]):
                        return view
            if node.proc and node.proc.poll() is not None:
                console.print("the node stopped unexpectedly", style="red")
                return view
            time.sleep(0.5)
    return view


def print_timeline(view: dict[str, Any]) -> None:
    """The per-stage timeline of the study."""
    table = Table(title="Timeline per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in view["timings_s"].items():
        table.add_row(stage, "–" if seconds is None else f"{seconds:.2f}")
    console.print(table)


def print_results(view: dict[str, Any], in_pacs: dict[str, bytes]) -> None:
    """Each result object, its delivery state, and whether the PACS holds it."""
    table = Table(title="Result objects")
    for col in ("object", "SOP Instance UID", "delivery", "in test PACS"):
        table.add_column(col)
    for d in view["deliveries"]:
        table.add_row(d["kind"], d["sop_instance_uid"], d["state"], "yes" if d["sop_instance_uid"] in in_pacs else "NO")
    console.print(table)


def write_key_slice(config_path: Path, study_uid: str, target: Path) -> tuple[int, int]:
    """Render the key slice (the largest lesion at its widest; ``node.admin.keyslice.key_slices``, as on
    the dashboard's study page) with the overlay to ``target``; (slice index, findings on it)."""
    settings = resolve_paths(load_settings(config_path), config_path.parent)
    overlay = study_overlay(settings, study_uid)
    k = key_slices(overlay, 1)[0]
    target.write_bytes(render_png(overlay, k))
    return k, len(overlay.marks_on(k))


def run_demo(out: Path | None, workdir: Path | None, analysis: str = ANALYSIS) -> int:
    """Run the demo with ``analysis`` on CT; 0 when every result object reached the test PACS."""
    configure_logging()  # the built-in PACS and the result reading use pydicom/pynetdicom
    own_folder = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ainode-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console.rule("ainode demo")
    console.print(f"work folder: {workdir}")

    weights = getattr(available_analyses().get(analysis), "weights", None)
    if weights is not None and not Path(weights).exists():
        console.print(f"{analysis} has no trained weights at {weights}; train it first (`ainode train`)", style="red")
        return 1
    pacs = node = None
    try:
        pacs = test_pacs(workdir / "pacs")
        console.print(f"test PACS: {pacs.name} ({PACS_AE} on port {pacs.dicom_port})")
        node = DemoNode(workdir, node_config(workdir, pacs.dicom_port, analysis))
        node.start()
        console.print(
            f"node: AINODE on port {node.config['node']['port']}, dashboard {node.api}/dashboard/"
            f" (token in {token_path(node.settings)})"
        )
        study_uid, paths = make_study(workdir / "phantom")
        console.print(f"generated a CT phantom: {len(paths)} slices")
        if push(paths, node.config["node"]["port"]):
            console.print("some instances were refused", style="red")
            return 1
        view = wait_for_results(node, study_uid, RESULT_TIMEOUT_S)
        if view is None:
            console.print("the study never reached the node's index", style="red")
            return 1
        print_timeline(view)
        in_pacs = pacs.objects(study_uid)
        print_results(view, in_pacs)
        return _finish(view, in_pacs, node, study_uid, workdir, out)
    except Exception as err:  # noqa: BLE001 - say what failed, point at the logs, exit non-zero
        console.print(f"demo failed: {err}", style="red")
        return 1
    finally:
        if node:
            node.stop()
        if pacs:
            pacs.stop()
        if own_folder and out is not None:
            console.print(f"logs kept in {workdir}")


def _finish(
    view: dict[str, Any], in_pacs: dict[str, bytes], node: DemoNode, study_uid: str, workdir: Path, out: Path | None
) -> int:
    expected = [d["sop_instance_uid"] for d in view["deliveries"]]
    missing = [uid for uid in expected if uid not in in_pacs]
    for failure in view["failures"]:
        console.print(failure, style="red")
    png = (out or workdir) / "key-slice.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        k, found = write_key_slice(node.config_path, study_uid, png)
        console.print(
            f"key slice {k} ({found} finding(s) boxed, the largest lesion at its widest) "
            f"with the segmentation overlay: {png}"
        )
    except Exception as err:  # noqa: BLE001 - the picture is a bonus; the results decide the outcome
        console.print(f"key slice not rendered: {err}", style="yellow")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for uid in expected:
            if uid in in_pacs:
                (out / f"{uid}.dcm").write_bytes(in_pacs[uid])
        console.print(f"{len(expected) - len(missing)} result object(s) copied to {out}")
    if not expected:
        console.print("the node produced no result objects", style="red")
        return 1
    if missing:
        console.print(f"{len(missing)} result object(s) missing from the test PACS", style="red")
        return 1
    console.print(f"all {len(expected)} result objects reached the test PACS", style="green")
    return 0
