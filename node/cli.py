"""The ``ainode`` command line (Typer). Each command is a thin shell over its stage's module.

Each command imports its stage when it runs, not at the top: importing every stage costs 3.3 s
(torch through the analysis registry, pynetdicom, FastAPI) on the 2-core machine, against 0.12 s
for the settings alone, and `ainode config check`, `echo` or `--help` need none of it. This module
is part of the composition root, so it may import the workers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from node.core import metrics_folder
from node.core.settings import ConfigError, Settings, load_settings, resolve_paths

app = typer.Typer(
    help="ainode: a DICOM node that runs deep-learning analyses and returns DICOM results.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Check the configuration.", no_args_is_help=True)
rules_app = typer.Typer(help="Inspect routing rules.", no_args_is_help=True)
app.add_typer(config_app, name="config")
db_app = typer.Typer(help="The database's schema: its revision, and upgrades.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(db_app, name="db")
api_app = typer.Typer(help="The admin API's users.", no_args_is_help=True)
app.add_typer(api_app, name="api")

console = Console(stderr=True)

ConfigOpt = typer.Option(
    None, "--config", "-c", help="YAML configuration file (default: $AINODE_CONFIG, else embedded defaults)."
)


def settings_from(config: Optional[Path]) -> Settings:
    """Load and validate the configuration, or print every error and exit 2."""
    try:
        settings = load_settings(config)
    except ConfigError as err:
        for line in err.errors:
            console.print(line, markup=False, highlight=False)
        raise typer.Exit(2) from None
    base = config.parent if config else Path.cwd()
    return resolve_paths(settings, base.resolve())


def unknown_analyses(settings: Settings) -> list[str]:
    """Rules naming an analysis that is neither built in, configured, nor a diagnostic one."""
    from workers.analysis.registry import AnalysisError, available_analyses  # noqa: PLC0415 - see the module docstring
    from workers.tasks import DIAGNOSTIC_ANALYSES  # noqa: PLC0415 - see the module docstring

    try:
        known = set(available_analyses(settings)) | set(DIAGNOSTIC_ANALYSES)
    except AnalysisError as err:
        return [f"analyses: {err}"]
    return [
        f"rules[{i}].analyses[{j}]: unknown analysis {ref.name!r} (known: {', '.join(sorted(known))})"
        for i, rule in enumerate(settings.rules)
        for j, ref in enumerate(rule.analyses)
        if ref.name not in known
    ]


@config_app.command("check")
def config_check(file: Path = typer.Argument(..., help="Configuration file to validate.")) -> None:
    """Validate a configuration file; print each error with its line and exit non-zero on any."""
    try:
        settings = load_settings(file)
    except ConfigError as err:
        for line in err.errors:
            console.print(line, markup=False, highlight=False)
        console.print(f"{len(err.errors)} error(s) in {file}", style="red")
        raise typer.Exit(1) from None
    unknown = unknown_analyses(settings)
    for line in unknown:
        console.print(f"{file}: {line}", markup=False, highlight=False)
    if unknown:
        console.print(f"{len(unknown)} error(s) in {file}", style="red")
        raise typer.Exit(1)
    typer.echo(
        f"{file}: OK ({len(settings.peers)} peers, {len(settings.destinations)} destinations, "
        f"{len(settings.rules)} rules, {len(settings.analyses)} analyses)"
    )


@app.command()
def serve(config: Optional[Path] = ConfigOpt) -> None:
    """Run the node until SIGTERM: DICOM listener, completion, routing, jobs, delivery, API."""
    settings = settings_from(config)
    # Receivers are forked processes: their metrics reach /metrics through prometheus
    # multiprocess mode, which must be chosen before prometheus-client is first imported.
    folder = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_folder.remove_stale_folders()
        folder = metrics_folder.create_folder()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        from node.service import serve as run_service  # noqa: PLC0415 - see the module docstring

        code = run_service(settings)
    finally:
        if folder is not None:
            metrics_folder.remove_folder(folder)
    raise typer.Exit(code)


@app.command()
def worker(
    config: Optional[Path] = ConfigOpt,
    queues: str = typer.Option("gpu,cpu", help="Comma-separated queues to consume."),
    concurrency: int = typer.Option(1, help="Worker processes."),
) -> None:
    """Start a Celery worker that runs analyses (gpu queue) and delivers results (cpu queue)."""
    from workers.worker import run_worker  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(run_worker(settings_from(config), queues.split(","), concurrency))


@app.command()
def echo(
    target: str = typer.Argument(..., help="AE@HOST:PORT"),
    calling_ae: str = typer.Option("AINODE", "--aet", help="Our calling AE title."),
) -> None:
    """C-ECHO a remote AE to test a link."""
    from node.dispatch.scu import echo as do_echo  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(do_echo(target, calling_ae))


@app.command()
def send(
    target: str = typer.Argument(..., help="AE@HOST:PORT"),
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders."),
    calling_ae: str = typer.Option("AINODE", "--aet", help="Our calling AE title."),
) -> None:
    """C-STORE files to a remote AE, with a progress bar."""
    from node.dispatch.scu import send as do_send  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(do_send(target, paths, calling_ae))


@app.command()
def status(
    config: Optional[Path] = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")
) -> None:
    """What the node holds and where each stage stands."""
    from node.admin.status import print_status  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(print_status(settings_from(config), as_json))


@app.command("run")
def run_analysis(
    analysis: str = typer.Argument(..., help="The analysis to run, e.g. ct-segmentation."),
    study: str = typer.Option(..., "--study", help="The study's Study Instance UID."),
    source: Optional[str] = typer.Option(
        None, "--from", help="A configured source to retrieve the study from (only what the node lacks)."
    ),
    to: Optional[list[str]] = typer.Option(
        None, "--to", help="A destination for the results (repeatable; default: the rules' for this analysis)."
    ),
    priority: str = typer.Option("stat", help="stat, routine or low."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job until it has ended."),
    timeout: float = typer.Option(3600, help="Seconds to follow the request at most."),
    priors: int = typer.Option(
        0, help="Also retrieve this many earlier studies of the patient (same modality) as extra inputs."
    ),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Analyse a study on demand through the running node: retrieve it from a PACS, run one analysis,
    send the results to its destinations."""
    from node.admin.client import order_analysis  # noqa: PLC0415 - see the module docstring

    settings = settings_from(config)
    raise typer.Exit(
        order_analysis(
            settings, study, analysis, source, to, priority, wait, timeout, priors, say=lambda line: typer.echo(line)
        )
    )


@rules_app.command("test")
def rules_test(
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders."), config: Optional[Path] = ConfigOpt
) -> None:
    """Show which rules match the given DICOM data and why the others do not."""
    from node.router import explain_rules  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(explain_rules(settings_from(config), paths))


@db_app.command("upgrade")
def db_upgrade(config: Optional[Path] = ConfigOpt) -> None:
    """Bring the database's schema to this release (as `ainode serve` does at start; back it up first)."""
    from node.core.db import init_db, schema_revision  # noqa: PLC0415 - see the module docstring
    from node.core.logs import configure_logging  # noqa: PLC0415 - see the module docstring
    from node.core.migrations import SchemaError, head  # noqa: PLC0415 - see the module docstring

    configure_logging()
    url = settings_from(config).database.url
    try:
        before = schema_revision(url)
        init_db(url)
    except SchemaError as err:
        console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    print(f"schema at revision {head()}" + ("" if before == head() else f" (was {before or 'empty'})"))


@db_app.command("current")
def db_current(config: Optional[Path] = ConfigOpt) -> None:
    """Print the database's schema revision and this release's; exit 1 unless they are the same."""
    from node.core.db import schema_revision  # noqa: PLC0415 - see the module docstring
    from node.core.migrations import SchemaError, head  # noqa: PLC0415 - see the module docstring

    try:
        current = schema_revision(settings_from(config).database.url)
    except SchemaError as err:
        console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    state = "up to date" if current == head() else "needs `ainode db upgrade`"
    print(f"database: {current or 'no schema revision'}; this release: {head()}; {state}")
    raise typer.Exit(0 if current == head() else 1)


@db_app.command("revision", hidden=True)
def db_revision(message: str = typer.Argument(..., help="What the revision changes, in a few words.")) -> None:
    """For developers: write a revision from the models' changes since the newest one (review it)."""
    from node.core.db import Base, load_tables  # noqa: PLC0415 - see the module docstring
    from node.core.migrations import new_revision  # noqa: PLC0415 - see the module docstring

    load_tables()
    print(new_revision(message, Base.metadata))


@api_app.command("hash-password")
def api_hash_password(
    cost: int = typer.Option(2**15, "--n", help="scrypt's cost N (a power of two; memory is 128 * N * 8 bytes)."),
) -> None:
    """Print the hash of a password for api.users[].password_hash (the password is read from
    standard input when it is not a terminal, else asked twice; it is never printed)."""
    import getpass  # noqa: PLC0415 - see the module docstring

    from node.admin.passwords import hash_password  # noqa: PLC0415 - see the module docstring

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            console.print("the two passwords differ")
            raise typer.Exit(1)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        typer.echo(hash_password(password, n=cost))
    except ValueError as err:
        console.print(str(err), markup=False, highlight=False)
        raise typer.Exit(1) from None


@app.command()
def train(
    model: str = typer.Argument(..., help="Reference model to train (see `ainode models`)."),
    out: Optional[Path] = typer.Option(
        None, help="Where to write the weights (default: a new folder ./trained/MODEL-TIME/, printed at the end)."
    ),
    quick: bool = typer.Option(False, help="A short run for smoke tests."),
    replace_shipped: bool = typer.Option(
        False, "--replace-shipped", help="Write over the shipped weights and their metadata (workers/weights/)."
    ),
) -> None:
    """Train a reference model on generated phantoms (reproduces the shipped weights)."""
    from workers.training import train_model  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(train_model(model, out, quick, replace_shipped=replace_shipped))


@app.command()
def models(config: Optional[Path] = ConfigOpt) -> None:
    """List the installed analyses with version, checksum and model card."""
    from workers.analysis.registry import print_models  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(print_models(settings_from(config)))


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Copy every result object that reached the test PACS here."),
    workdir: Optional[Path] = typer.Option(None, help="Working folder (default: a temporary one)."),
) -> None:
    """Run the node end to end on embedded defaults with a local test PACS and a generated study."""
    from node.demo import run_demo  # noqa: PLC0415 - see the module docstring

    raise typer.Exit(run_demo(out, workdir))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    sys.exit(app())
