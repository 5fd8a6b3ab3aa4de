"""docker/: the compose file and the Dockerfiles checked against the code they run.

The images are built and the stack run in test_docker_stack.py (where a Docker daemon can be
started); these checks need no daemon and run everywhere: every command the images and compose run is a valid `ainode` invocation,
every AINODE_* variable is a real setting (the settings model forbids unknown keys), ports,
healthchecks, volumes and their ownership, Redis durability, the GPU reservation, and that the
torch pins agree with pyproject.toml and CI.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from node.cli import app as cli_app
from node.core.settings import ConfigError, load_settings
from tests.helpers import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
EXAMPLE_CONFIG = REPO_ROOT / "config" / "ainode.example.yaml"
# What an operator exports before `docker compose up` (compose refuses to start without the token).
OPERATOR_ENV = {"AINODE_API_TOKEN": "t0ken"}


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is unset: {arg or 'no default'}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def service_env(name: str) -> dict[str, str]:
    env = compose()["services"][name].get("environment", {})
    assert isinstance(env, dict), f"{name}: environment as a mapping"
    return {k: interpolate(str(v), OPERATOR_ENV) for k, v in env.items()}


def dockerfile(service: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the service's Dockerfile, continuation lines joined."""
    build = compose()["services"][service]["build"]
    text = (DOCKER / build["context"] / build["dockerfile"]).resolve().read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def instr(service: str, name: str) -> list[str]:
    return [args for i, args in dockerfile(service) if i == name]


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args)  # JSON arrays are YAML


def parse_cli(args: list[str]) -> str:
    """Parse `ainode ARGS` as the CLI would, without running it; the command's name. Click raises on
    an unknown command or option, a bad value or a missing argument."""
    group = typer.main.get_command(cli_app)
    ctx = group.make_context("ainode", [], resilient_parsing=True)  # no_args_is_help would exit
    names = []
    while True:
        assert args, f"no command after {' '.join(names) or 'ainode'}"
        cmd = group.get_command(ctx, args[0])
        assert cmd is not None, f"`ainode {' '.join(names + args[:1])}` is no command"
        names.append(args[0])
        if hasattr(cmd, "get_command"):  # a sub-group (config, rules)
            group, ctx, args = cmd, cmd.make_context(args[0], [], parent=ctx, resilient_parsing=True), args[1:]
            continue
        cmd.make_context(args[0], list(args[1:]), parent=ctx)
        return " ".join(names)


def settings_for(service: str):
    env = service_env(service)
    env.pop("AINODE_CONFIG")  # the file mounted there is a copy of the example (see compose.yaml)
    return load_settings(EXAMPLE_CONFIG, environ=env)


def mounts(service: str) -> dict[str, str]:
    """Mount target -> source of the service's volumes (short syntax)."""
    out = {}
    for spec in compose()["services"][service].get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = source + (":" + mode[0] if mode else "")
    return out


AINODE_SERVICES = ["node", "worker"]


@pytest.mark.parametrize("service", AINODE_SERVICES)
def test_every_environment_variable_is_a_real_setting_and_matches_the_mounts(service: str):
    env = service_env(service)
    assert all(k.startswith("AINODE_") for k in env), env
    settings = settings_for(service)  # raises ConfigError on any unknown section or key
    targets = mounts(service)
    assert targets.get(env["AINODE_CONFIG"]) == "./ainode.yaml:ro"
    assert targets.get(str(settings.storage.path)) == "store", "node and workers share the store volume"
    db = urlsplit(settings.database.url)
    postgres = {
        k: interpolate(str(v), OPERATOR_ENV) for k, v in compose()["services"]["postgres"]["environment"].items()
    }
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres" and db.path == "/" + postgres["POSTGRES_DB"]
    assert (db.username, db.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    broker = urlsplit(settings.broker.url)
    assert broker.scheme == "redis" and broker.hostname in compose()["services"]
    if "AINODE_AUDIT__PATH" in env and service == "node":
        assert str(settings.audit.path.parent) in targets, "the audit trail is kept in a volume"


def test_the_check_catches_a_misspelt_variable():
    """The settings model forbids unknown keys, so a typo in compose.yaml fails the test above."""
    with pytest.raises(ConfigError):
        load_settings(EXAMPLE_CONFIG, environ={"AINODE_STORGE__PATH": "/x"})
    with pytest.raises(ConfigError):
        load_settings(EXAMPLE_CONFIG, environ={"AINODE_API_TOKEN": "single underscore is no section"})


@pytest.mark.parametrize("service", AINODE_SERVICES)
def test_entry_point_and_commands_are_valid_ainode_invocations(service: str):
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = exec_form(instr(service, "ENTRYPOINT")[-1])
    assert entry[:2] == ["tini", "--"] and entry[2] in scripts
    assert any("tini" in shlex.split(run) for run in instr(service, "RUN")), "tini is installed"
    cmd = exec_form(instr(service, "CMD")[-1])
    assert parse_cli(cmd) == compose()["services"][service]["command"][0] == cmd[0]
    assert parse_cli(compose()["services"][service]["command"]) == {"node": "serve", "worker": "worker"}[service]
    env_config = [a for a in instr(service, "ENV") if a.startswith("AINODE_CONFIG=")]
    assert env_config == [f"AINODE_CONFIG={service_env(service)['AINODE_CONFIG']}"]


def test_the_cli_parser_check_can_fail():
    with pytest.raises(Exception):
        parse_cli(["worker", "--queue", "gpu"])  # the option is --queues
    with pytest.raises(AssertionError):
        parse_cli(["run-worker"])


def test_ports_and_healthchecks_match_the_settings():
    from fastapi.testclient import TestClient

    from node.admin.api import create_app

    settings = settings_for("node")
    node = compose()["services"]["node"]
    assert f"{settings.node.port}:{settings.node.port}" in node["ports"]
    assert f"127.0.0.1:{settings.api.port}:{settings.api.port}" in node["ports"], "the API only on loopback"
    assert settings.node.host == settings.api.host == "0.0.0.0"
    assert set(instr("node", "EXPOSE")[0].split()) == {str(settings.node.port), str(settings.api.port)}
    check = instr("node", "HEALTHCHECK")[0]
    # The health check asks the port compose gives the API, 8080 (the settings' default) without it.
    url = re.search(r"http://127\.0\.0\.1:%s(/[\w/]+)' % os\.environ\.get\('AINODE_API__PORT', '(\d+)'\)", check)
    assert url and int(url.group(2)) == settings.api.port == int(service_env("node")["AINODE_API__PORT"])
    # The health path is a real route that answers without the token.
    local = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": "sqlite://"}),
            "api": settings.api.model_copy(update={"token": "compose-sets-it"}),
        }
    )
    # The healthcheck asks 127.0.0.1: a Host the API answers to.
    with TestClient(create_app(local), base_url=f"http://127.0.0.1:{settings.api.port}") as client:
        assert client.get(url.group(1)).status_code == 200
        assert client.get("/api/jobs").status_code == 401
    services = compose()["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep] or instr(dep, "HEALTHCHECK"), f"{dep} has no healthcheck"
    for name in ("redis", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"


def test_redis_is_durable_and_never_evicts_messages():
    redis = compose()["services"]["redis"]
    cmd = redis["command"]
    options = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "redis-server"
    assert options["--appendonly"] == "yes" and options["--maxmemory-policy"] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the append-only file lives in a volume"


def test_gpu_reservation_and_torch_pins_agree_with_ci():
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("torch=="))
    ci_pin = re.search(r'"(torch==[\d.]+)"', (REPO_ROOT / "scripts" / "install.sh").read_text()).group(1)
    assert ci_pin == pin
    # The worker: PyPI's torch (the CUDA build for Linux, its CUDA libraries pip packages); the
    # node: the CPU build of the same version; the tests' local build: the CPU wheel CI installs.
    assert arg_default("worker", "TORCH") == pin and arg_default("worker", "TORCH_FROM") == ""
    assert arg_default("node", "TORCH") == pin
    assert arg_default("node", "TORCH_FROM") == "--index-url https://download.pytorch.org/whl/cpu"
    script = (REPO_ROOT / "scripts" / "docker.sh").read_text()
    assert f'"TORCH={pin}+cpu"' in script


def arg_default(service: str, name: str) -> str:
    """The default of the Dockerfile's ARG name (quotes removed)."""
    [value] = [a.partition("=")[2] for a in instr(service, "ARG") if a.partition("=")[0] == name]
    return value.strip('"')


def test_node_and_worker_share_their_layers_word_for_word():
    """Built with the same torch arguments (the tests), the worker is the node's cached layers."""
    assert instr("node", "RUN") == instr("worker", "RUN") and len(instr("node", "RUN")) == 2
    assert instr("node", "FROM") == instr("worker", "FROM") == ["${BASE}"]
    assert arg_default("node", "BASE") == arg_default("worker", "BASE") == "debian:bookworm-slim"


@pytest.mark.parametrize("service", AINODE_SERVICES)
def test_images_copy_what_exists_and_own_every_mounted_folder(service: str):
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
    # Debian bookworm's python3 (the official debian:bookworm-slim base, or the same Debian made
    # locally by mmdebstrap for the tests) is 3.11.
    assert arg_default(service, "BASE") == "debian:bookworm-slim" and (3, 11) >= minimum
    copied = re.search(r"cp -r ((?:/tmp/src/\S+ )+)/opt/ainode/", " ".join(instr(service, "RUN")))
    assert copied, "the sources are copied from the build context"
    for source in copied.group(1).split():
        assert (REPO_ROOT / source.removeprefix("/tmp/src/")).exists(), f"{source}: not in the repository"
    assert "/tmp/src/docs" in copied.group(1), "model cards (docs/models) are in the image"
    user = instr(service, "USER")
    assert user and user[-1] not in ("root", "0")
    runs = " ".join(instr(service, "RUN"))
    for secret in re.findall(r"--mount=type=secret,id=(\w+)", runs):
        assert f"/run/secrets/{secret}" in runs  # read where BuildKit mounts it, for that RUN only
    made = re.findall(r"mkdir -p ([^&]+)", runs)
    created = {p for group in made for p in group.split()}
    assert f"chown -R {user[-1]} /var/lib/ainode" in runs
    declared = set(compose().get("volumes", {}))
    for target, source in mounts(service).items():
        if not source.startswith("."):  # a named volume: a fresh one takes the folder's owner
            assert source in declared, f"volume {source} is not declared"
            assert target in created and target.startswith("/var/lib/ainode/"), (
                f"{target} must exist in the image, owned by {user[-1]}"
            )
    # The context is what the images copy and nothing more (no venv, no git history, no tests).
    ignored = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*", "the build context leaves out everything not listed"
    kept = {line[1:] for line in ignored if line.startswith("!")}
    assert kept == {s.removeprefix("/tmp/src/") for s in copied.group(1).split()} | {"docker/wheels"}
    # docker/wheels (wheels offered to pip before any index) exists in a clean clone, wheel-less.
    assert "source=docker/wheels,target=/tmp/wheels" in runs and "PIP_FIND_LINKS=/tmp/wheels" in runs
    assert (REPO_ROOT / "docker" / "wheels").is_dir() and "docker/wheels/*.whl" in (
        REPO_ROOT / ".gitignore"
    ).read_text()
