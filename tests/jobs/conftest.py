"""Fixtures for the jobs area: a node configuration on disk, index rows, a private Redis, workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from node.core.clock import utcnow
from node.core.db import dispose_engines, engine_for, init_db, session_scope
from node.core.settings import Settings, load_settings, resolve_paths
from node.index import Instance, Patient, Series, Study
from tests.helpers import free_port, port_open, wait_for

ROOT = Path(__file__).resolve().parents[2]


def write_config(folder: Path, broker_url: str = "", **sections: Any) -> Path:
    """A configuration file in folder (database and storage inside it); sections override defaults."""
    data: dict[str, Any] = {
        "storage": {"path": str(folder / "store")},
        "database": {"url": f"sqlite:///{folder / 'ainode.db'}"},
        "broker": {"url": broker_url},
        "timers": {"series_quiet_s": 1, "study_quiet_s": 2, "force_complete_s": 600},
        "jobs": {"max_attempts": 3, "heartbeat_timeout_s": 3, "reconcile_interval_s": 1},
        "audit": {"sink": "none"},
        "api": {"enabled": False},
    }
    data.update(sections)
    path = folder / "ainode.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def settings_from(path: Path) -> Settings:
    """Load a configuration file the way the CLI does."""
    return resolve_paths(load_settings(path, environ={}), path.parent.resolve())


def add_study(
    settings: Settings,
    *,
    study_uid: str,
    modality: str = "CT",
    instances: int = 3,
    series: int = 1,
    age: timedelta = timedelta(0),
    first_age: timedelta | None = None,
    calling_ae: str = "CT01",
    description: str = "CT CHEST",
    body_part: str = "CHEST",
    slice_thickness: float = 1.0,
    state: str = "received",
) -> int:
    """Index rows as the receiver writes them (no files); returns the study's row id."""
    now = utcnow()
    last = now - age
    first = now - (first_age if first_age is not None else age)
    with session_scope(engine_for(settings.database.url)) as session:
        patient = session.query(Patient).filter_by(patient_id="P-" + study_uid[-6:]).one_or_none()
        if patient is None:
            patient = Patient(patient_id="P-" + study_uid[-6:], name="Test^Patient")
            session.add(patient)
            session.flush()
        study = Study(
            study_uid=study_uid,
            patient_pk=patient.id,
            description=description,
            calling_ae=calling_ae,
            called_ae="AINODE",
            patient_age="054Y",
            instance_count=instances * series,
            first_received_at=first,
            last_received_at=last,
            state=state,
        )
        session.add(study)
        session.flush()
        for s in range(series):
            row = Series(
                series_uid=f"{study_uid}.{s + 1}",
                study_pk=study.id,
                modality=modality,
                body_part=body_part,
                description=f"series {s + 1}",
                slice_thickness=slice_thickness,
                instance_count=instances,
                first_received_at=first,
                last_received_at=last,
                state=state,
            )
            session.add(row)
            session.flush()
            for i in range(instances):
                session.add(
                    Instance(
                        sop_instance_uid=f"{study_uid}.{s + 1}.{i + 1}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        series_pk=row.id,
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"x/{study_uid}.{s}.{i}",
                        size_bytes=10,
                        sha256="0" * 64,
                        instance_number=i + 1,
                        received_at=last,
                    )
                )
        return study.id


@pytest.fixture
def node_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for one node's configuration, database and storage."""
    (tmp_path / "store").mkdir()
    yield tmp_path
    dispose_engines()


@pytest.fixture
def make_settings(node_dir: Path) -> Callable[..., Settings]:
    """Write a configuration into node_dir, create its database, and return its settings."""

    def make(broker_url: str = "", **sections: Any) -> Settings:
        settings = settings_from(write_config(node_dir, broker_url, **sections))
        init_db(settings.database.url)
        return settings

    return make


class RedisServer:
    """A private redis-server on a free port, so a test may kill, restart or flush it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_for(lambda: port_open(self.port), 30), "redis-server did not start"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flushall(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


@pytest.fixture(scope="module")
def _redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(_redis_process: RedisServer) -> RedisServer:
    """The module's private Redis, running and empty (job ids restart at 1 in every test's database)."""
    if _redis_process.proc is None or _redis_process.proc.poll() is not None:
        _redis_process.start()
    _redis_process.flushall()
    return _redis_process


def env_for_children() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AINODE_CONFIG", None)
    return env


class Worker:
    """`ainode worker -c CFG` as a real process (its own process group, so kill -9 takes all of it)."""

    def __init__(self, config: Path, concurrency: int = 1, queues: str = "gpu,cpu"):
        self.log = config.parent / f"worker-{free_port()}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "worker",
                "-c",
                str(config),
                "--concurrency",
                str(concurrency),
                "--queues",
                queues,
            ],
            cwd=ROOT,
            env=env_for_children(),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        """SIGKILL the worker and its pool processes at once (a machine losing power, in effect)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(config: Path, **kw: Any) -> Worker:
        w = Worker(config, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
