"""Small helpers shared by every test area (ports, waiting, a running node). Area fixtures live in tests/<area>/."""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll until predicate() is true; False on timeout (tests then assert on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- a running `ainode serve` -------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent

# Calling AE titles the tests' peers use (DCMTK's defaults, pynetdicom, Orthanc).
TEST_PEERS = ["STORESCU", "ECHOSCU", "FINDSCU", "MOVESCU", "GETSCU", "PYNETDICOM", "TESTSCU", "ORTHANC", "MODALITY"]


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base`` (dicts recursively, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class NodeProcess:
    """`ainode serve` in a subprocess, configured by a YAML file written into ``workdir``.

    ``overrides`` is merged into a test configuration: DICOM port and API port free on
    127.0.0.1, storage/SQLite/audit under ``workdir``, one receiver, peers TEST_PEERS from
    127.0.0.1, embedded broker. Use as a context manager or call start()/stop()/kill()/restart().
    The node's output goes to ``workdir/node.log`` (``log_text()``). It runs in ``cwd`` (the
    repository by default; a sandbox folder shows what it writes outside its configured paths).
    """

    def __init__(
        self,
        workdir: Path | str,
        overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        defaults = {
            "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": self.port, "receivers": 1},
            "storage": {"path": str(self.workdir / "store"), "min_free_bytes": "16MiB"},
            "database": {"url": f"sqlite:///{self.workdir / 'ainode.db'}"},
            "broker": {"url": ""},
            "peers": [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in TEST_PEERS],
            "api": {"host": "127.0.0.1", "port": free_port()},
            "audit": {"path": str(self.workdir / "audit.log")},
        }
        self.config = deep_merge(defaults, overrides or {})
        self.port = int(self.config["node"]["port"])
        self.ae_title = self.config["node"]["ae_title"]
        self.config_path = self.workdir / "ainode.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = self.workdir / "node.log"
        self.env = env or {}
        self.cwd = cwd or REPO_ROOT
        self.proc: subprocess.Popen | None = None

    @property
    def storage(self) -> Path:
        """The storage root."""
        return Path(self.config["storage"]["path"])

    @property
    def api_token(self) -> str:
        """The admin API's token: configured, or the one the node generated in its storage."""
        configured = (self.config.get("api") or {}).get("token")
        return configured or (self.storage / "api-token").read_text().strip()

    @property
    def api_base(self) -> str:
        """``http://127.0.0.1:PORT``, or ``https://`` when ``api.tls`` is enabled."""
        tls = (self.config.get("api") or {}).get("tls") or {}
        return f"{'https' if tls.get('enabled') else 'http'}://127.0.0.1:{self.config['api']['port']}"

    def api_ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting the API's own (test, self-signed) certificate; None for HTTP."""
        tls = (self.config.get("api") or {}).get("tls") or {}
        return ssl.create_default_context(cafile=tls["certificate"]) if tls.get("enabled") else None

    def api_get(self, path: str) -> bytes:
        """GET ``path`` from the node's admin API with its token."""
        request = urllib.request.Request(self.api_base + path, headers={"Authorization": f"Bearer {self.api_token}"})
        with urllib.request.urlopen(request, timeout=60, context=self.api_ssl_context()) as answer:
            return answer.read()

    @property
    def database_url(self) -> str:
        """The index's SQLAlchemy URL."""
        return self.config["database"]["url"]

    @property
    def target(self) -> str:
        """``AE@HOST:PORT`` for `ainode send`/`echo`."""
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "NodeProcess":
        """Start the node and wait until its DICOM port accepts connections."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **self.env}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "-c", str(self.config_path)],
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ok = wait_for(lambda: self.proc.poll() is not None or port_open(self.port), timeout)
        if not ok or self.proc.poll() is not None:
            tail = self.log_text()[-3000:]
            self.kill()
            raise RuntimeError(f"ainode serve did not start (exit {self.proc.returncode}):\n{tail}")
        return self

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the node and every process it started (like a power cut for the software)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        # Receivers die with their parent (PR_SET_PDEATHSIG); wait until the port is free.
        wait_for(lambda: not port_open(self.port), 30)

    def restart(self, timeout: float = 120.0) -> "NodeProcess":
        """Stop (gracefully if running) and start again on the same port and files."""
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        """Everything the node printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def train_quick(model: str, out: Path) -> subprocess.CompletedProcess[str]:
    """`ainode train MODEL --quick --out OUT` as a user runs it (its own process); asserts it succeeded."""
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", model, "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run


# A Patient participant object of a DICOM audit message (PS3.15 A.5): the one place the audit trail
# names a patient; everything else in the trail and the whole application log must not.
PATIENT_OBJECT = re.compile(
    r'<ParticipantObjectIdentification [^>]*ParticipantObjectTypeCodeRole="1">.*?</ParticipantObjectIdentification>'
)


def outside_patient_objects(audit_text: str) -> str:
    """The audit trail with its Patient participant objects left out."""
    return PATIENT_OBJECT.sub("", audit_text)
