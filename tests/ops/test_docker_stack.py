"""The images built and the compose stack run for real (issue 17): node, worker, Redis, PostgreSQL
and Orthanc as containers; a study from DCMTK storescu comes back as SEG/SR/KOS in Orthanc; a
`down` and `up` keeps everything; a worker killed mid-job loses nothing.

A private Docker daemon (scripts/docker.sh start: own data root and socket, host networking, vfs)
with a Debian base made by mmdebstrap (no Docker Hub here). The images are built once per test
session (`scripts/docker.sh build --local`: CPU torch from /opt/wheels; a second run reuses the
cached layers). docker/compose.yaml is run as written except for what this machine imposes: the
host's network (no bridge) with free ports, the local peer images in place of the official redis
and postgres ones, no GPU reservation. Skipped, saying why, where the daemon cannot be started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from pydicom.uid import MRImageStorage
from sqlalchemy import create_engine, text

from tests.helpers import REPO_ROOT, free_port, port_open, wait_for
from tests.jobs.test_model_path import Threshold
from tests.ops.conftest import make_ct_study
from tests.results.peers import Orthanc
from workers.synthetic import phantoms

pytestmark = pytest.mark.slow

STORESCU = "/usr/bin/storescu"
SOCKET = "/run/ainode-docker.sock"
TOKEN = "docker-stack-token"
PASSWORD = "stack-pw"
VERSION = "0.1.0"


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """A command with its output captured; a failure shows the output's tail."""
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    return done


@dataclass
class Docker:
    """The private daemon, the client and compose command that talk to it, and build timings."""

    env: dict[str, str]
    cli: str
    compose: list[str]
    build_s: dict[str, float] = field(default_factory=dict)

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([self.cli, *args], self.env, check)


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.fixture(scope="session")
def docker() -> Docker:
    """Daemon started, local base made, node/worker/peer images built (or found in the cache)."""
    started = subprocess.run(["bash", "scripts/docker.sh", "start"], cwd=REPO_ROOT, capture_output=True, text=True)
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no Docker daemon for the container tests (scripts/docker.sh start): {reason}")
    compose = compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    # vfs removes a container by deleting its full copy of the image (GBs): more than compose
    # 1.29's default 60 s per API call on a loaded machine.
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}", "DOCKER_BUILDKIT": "1", "COMPOSE_HTTP_TIMEOUT": "900"}
    cli = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
    out = Docker(env, cli, compose)
    for what, cmd in (("node+worker", ["build", "--local"]), ("peers", ["peers"])):
        t0 = time.monotonic()
        run(["bash", "scripts/docker.sh", *cmd], env)
        out.build_s[what] = round(time.monotonic() - t0, 1)
    sizes = out("image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout
    print(f"\nimage builds (s): {out.build_s}\n{sizes}")
    return out


# --- the images --------------------------------------------------------------------------------


@pytest.mark.parametrize("image", ["ainode-node", "ainode-worker"])
def test_images_are_labelled_non_root_and_hold_no_build_secret(docker: Docker, image: str):
    info = json.loads(docker("image", "inspect", f"{image}:latest").stdout)[0]
    labels = info["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.source"] not in ("", "unknown")
    assert info["Config"]["User"] == "ainode" and info["Config"]["Healthcheck"]["Test"][0] == "CMD"
    # The CA bundle was a build secret: in no layer, no history entry, no file of the image.
    history = docker("history", "--no-trunc", f"{image}:latest").stdout
    assert "BEGIN CERTIFICATE" not in history


def test_the_worker_is_the_nodes_layers_when_built_alike(docker: Docker):
    """Node and worker share their file-system layers: one build per test run, one copy on disk."""
    layers = {
        image: json.loads(docker("image", "inspect", f"{image}:latest").stdout)[0]["RootFS"]["Layers"]
        for image in ("ainode-node", "ainode-worker")
    }
    assert layers["ainode-node"] == layers["ainode-worker"]


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    """docker/compose.yaml as this machine can run it, in a folder of its own."""

    docker: Docker
    folder: Path
    project: str = field(default_factory=lambda: f"ainode-test-{uuid.uuid4().hex[:8]}")
    ports: dict[str, int] = field(
        default_factory=lambda: {
            k: free_port() for k in ("dicom", "api", "redis", "postgres", "orthanc", "orthanc_http")
        }
    )

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self.docker.compose, "-p", self.project, "-f", str(self.folder / "compose.yaml"), *args]
        return run(cmd, self.docker.env, check)

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://ainode:{PASSWORD}@127.0.0.1:{self.ports['postgres']}/ainode"

    def query(self, sql: str, **params) -> list[tuple]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), params).all()]
        finally:
            engine.dispose()

    def orthanc(self) -> Orthanc:
        return Orthanc(self.folder / "orthanc", dicom_port=self.ports["orthanc"], http_port=self.ports["orthanc_http"])

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        cid = self.container(service)
        if not cid:
            return "absent"
        return self.docker("inspect", "-f", "{{.State.Health.Status}}", cid, check=False).stdout.strip()

    def up(self) -> None:
        self.compose("up", "-d", "--no-build")
        ok = wait_for(lambda: self.health("node") == "healthy" and self.health("worker") == "healthy", 300, 2)
        assert ok, self.logs()

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]


def stack_files(stack: Stack) -> None:
    """Write compose.yaml (docker/compose.yaml adapted), ainode.yaml, the model, Orthanc's config."""
    p = stack.ports
    spec = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    services = spec["services"]
    fast_health = {"interval": "3s", "start_period": "120s"}
    for name, service in services.items():
        service["network_mode"] = "host"  # the daemon has no bridge: --bridge=none
        service.pop("ports", None)
        service.pop("deploy", None)  # no GPU here: the worker runs the CPU torch
        service.pop("build", None)  # built once per session by the fixture
    for name in ("node", "worker"):
        services[name]["image"] = f"ainode-{name}:latest"
        env = services[name]["environment"] = dict(services[name]["environment"])
        env["AINODE_DATABASE__URL"] = stack.database_url
        env["AINODE_BROKER__URL"] = f"redis://127.0.0.1:{p['redis']}/0"
        services[name]["volumes"].append(f"{stack.folder / 'models'}:/models:ro")
        services[name]["healthcheck"] = dict(fast_health)
    services["node"]["environment"].update({"AINODE_NODE__PORT": str(p["dicom"]), "AINODE_API__PORT": str(p["api"])})
    services["node"]["environment"]["AINODE_API__TOKEN"] = TOKEN
    redis = services["redis"]
    redis.update(image="ainode-test-peers:latest")
    redis["command"] += ["--port", str(p["redis"]), "--bind", "127.0.0.1"]
    test = redis["healthcheck"]["test"]  # ["CMD", "redis-cli", "ping"]: the port goes before the command
    redis["healthcheck"] = {"test": [*test[:2], "-p", str(p["redis"]), *test[2:]], **fast_health}
    postgres = services["postgres"]
    postgres.update(image="ainode-test-peers:latest", command=["postgres"], volumes=["postgres:/data"])
    postgres["environment"]["POSTGRES_PASSWORD"] = PASSWORD
    # postgres and pg_isready read them (the healthcheck then asks over TCP, as the node connects).
    postgres["environment"].update(PGPORT=str(p["postgres"]), PGHOST="127.0.0.1")
    postgres["healthcheck"] = {**postgres["healthcheck"], **fast_health}
    services["orthanc"] = {
        "image": "ainode-test-peers:latest",
        "command": ["orthanc", "/config/orthanc.json"],
        "network_mode": "host",
        "volumes": ["orthanc:/data", f"{stack.folder / 'orthanc'}:/config:ro"],
        "restart": "unless-stopped",
    }
    spec["volumes"]["orthanc"] = None
    (stack.folder / "compose.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    orthanc = stack.orthanc()
    config = json.loads(orthanc.write_config().read_text())
    config.update(StorageDirectory="/data/orthanc", IndexDirectory="/data/orthanc")
    (orthanc.workdir / "orthanc.json").write_text(json.dumps(config))

    (stack.folder / "models").mkdir()
    torch.jit.script(Threshold()).save(str(stack.folder / "models" / "threshold.pt"))
    settings = {
        "node": {"ae_title": "AINODE"},
        "peers": [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"], "allow": ["echo", "store"]}],
        "destinations": [{"name": "pacs", "type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": p["orthanc"]}],
        "analyses": [
            {
                "name": "threshold-test",
                "format": "torchscript",
                "path": "/models/threshold.pt",
                "task": "segmentation",
                "modalities": ["CT"],
                "labels": ["liver"],
                "params": {"window": [-200, 200], "output": "softmax", "roi_size": [16, 32, 32]},
            }
        ],
        "rules": [
            {"name": "ct", "match": {"modality": "CT"}, "analyses": ["threshold-test"], "destinations": ["pacs"]},
            # Long enough to kill the worker in the middle of it.
            {"name": "mr-slow", "match": {"modality": "MR"}, "analyses": [{"name": "sleep", "params": {"seconds": 20}}]},
        ],
        "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        "jobs": {"heartbeat_timeout_s": 10, "reconcile_interval_s": 2},
    }  # fmt: skip
    (stack.folder / "ainode.yaml").write_text(yaml.safe_dump(settings))
    for path in [stack.folder, *stack.folder.rglob("*")]:  # the containers run as other users
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def stack(docker: Docker):
    folder = Path(tempfile.mkdtemp(prefix="ainode-stack-"))
    stack = Stack(docker, folder)
    stack_files(stack)
    try:
        yield stack
    finally:
        stack.compose("down", "-v", "--timeout", "20", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def storescu(port: int, files: list[Path]) -> None:
    cmd = [STORESCU, "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(port), *map(str, files)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def orthanc_modalities(stack: Stack, study_uid: str) -> set[str]:
    """Modalities of the series Orthanc holds in the study (empty while it has none)."""
    orthanc = stack.orthanc()
    try:
        request = urllib.request.Request(
            f"{orthanc.base_url}/tools/find",
            data=json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode(),
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return {s["MainDicomTags"].get("Modality") for s in json.loads(answer.read())}
    except OSError:
        return set()


def jobs_of(stack: Stack, study_uid: str) -> list[tuple]:
    try:
        return stack.query("SELECT state, attempts FROM jobs WHERE study_uid = :u ORDER BY id", u=study_uid)
    except Exception:  # noqa: BLE001 - PostgreSQL restarting: no answer yet
        return []


def test_a_study_comes_back_as_seg_sr_kos_and_survives_down_up_and_a_killed_worker(stack: Stack, tmp_path: Path):
    stack.up()
    docker = stack.docker
    # Inside (a container costs a copy of the image with the vfs driver: the stack's, not one more).
    for service in ("node", "worker"):
        inside = docker(
            "exec", stack.container(service), "sh", "-c",
            "id -u; ls -A /run/secrets 2>/dev/null | wc -l; python -c 'import torch; print(torch.__version__)'",
        ).stdout.split()  # fmt: skip
        assert inside == ["1000", "0", "2.13.0+cpu"], inside

    # 1. A CT study from the host's storescu to the node's DICOM port: results in Orthanc.
    series = tmp_path / "ct"
    phantoms.write_ct_series(phantoms.make_ct_phantom(3, shape=(16, 32, 32)), series)
    ct_files = sorted(series.glob("*.dcm"))
    ct_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(stack.ports["dicom"], ct_files)
    ok = wait_for(lambda: {"SEG", "SR", "KO"} <= orthanc_modalities(stack, ct_uid), 300, 1)
    assert ok, (jobs_of(stack, ct_uid), stack.logs())
    assert jobs_of(stack, ct_uid) == [("succeeded", 1)]

    # 2. The worker container killed (SIGKILL to its process, as a crash would) mid-job: the
    # restart policy brings it back, the reconciler hands the job over, it runs to the end.
    mr_uid = make_ct_study(tmp_path / "mr", 2)
    for path in (tmp_path / "mr").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.save_as(path, enforce_file_format=True)
    storescu(stack.ports["dicom"], sorted((tmp_path / "mr").glob("*.dcm")))
    assert wait_for(lambda: jobs_of(stack, mr_uid) == [("running", 1)], 180, 0.5), stack.logs()
    worker = stack.container("worker")
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", worker).stdout)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: docker("inspect", "-f", "{{.RestartCount}}", worker).stdout.strip() != "0", 60, 1)
    ok = wait_for(lambda: [s for s, _ in jobs_of(stack, mr_uid)] == ["succeeded"], 300, 1)
    assert ok, (jobs_of(stack, mr_uid), stack.logs())
    assert jobs_of(stack, mr_uid)[0][1] >= 2, "ran again after the kill"

    # 3. down and up again: every study, job and delivery is still there (volumes).
    before = snapshot(stack)
    stack.compose("down", "--timeout", "60")
    assert not port_open(stack.ports["dicom"]) and not stack.container("node")
    stack.up()
    assert snapshot(stack) == before
    assert {"SEG", "SR", "KO"} <= orthanc_modalities(stack, ct_uid)
    token = {"Authorization": f"Bearer {TOKEN}"}
    request = urllib.request.Request(f"http://127.0.0.1:{stack.ports['api']}/api/jobs", headers=token)
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


def snapshot(stack: Stack) -> dict[str, list[tuple]]:
    """What must survive a restart: studies, jobs, deliveries and the instances' count."""
    return {
        "studies": stack.query("SELECT study_uid, state FROM studies ORDER BY study_uid"),
        "jobs": stack.query("SELECT study_uid, analysis, state, attempts FROM jobs ORDER BY id"),
        "deliveries": stack.query("SELECT id, state FROM deliveries ORDER BY id"),
        "instances": stack.query("SELECT count(*) FROM instances"),
    }
