"""Fixtures of the receiver tests: a running node and DCMTK/pynetdicom peers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from node.core.volumes import VOLUME_DIR
from tests.helpers import NodeProcess, wait_for


@pytest.fixture
def node(tmp_path: Path):
    """A running `ainode serve` with the test defaults (one receiver, SQLite)."""
    with NodeProcess(tmp_path / "node") as proc:
        yield proc


def storescu(
    node: NodeProcess, *files: Path | str, aet: str = "STORESCU", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Push files with DCMTK storescu (verbose, so answers can be read from stderr)."""
    cmd = ["storescu", "-v", "-aet", aet, "-aec", node.ae_title, *extra, "127.0.0.1", str(node.port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True)


def echoscu(node: NodeProcess, aet: str = "ECHOSCU") -> subprocess.CompletedProcess:
    """C-ECHO the node with DCMTK echoscu."""
    cmd = ["echoscu", "-v", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    return subprocess.run(cmd, capture_output=True, text=True)


def store_file(node: NodeProcess, path: Path, aet: str = "PYNETDICOM") -> int | None:
    """C-STORE one file with pynetdicom, streaming its bytes exactly as they are on disk.

    The request's UIDs come from the file meta, the data set is sent unparsed: this is how the
    tests deliver broken input (truncated, mismatched UIDs). Returns the status (None: no answer).
    """
    from pydicom import dcmread
    from pynetdicom import AE, _config

    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=aet)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established, "association refused"
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return getattr(status, "Status", None)


def settled(node: NodeProcess, timeout: float = 120.0) -> None:
    """Wait until every instance answered Success is indexed and placed.

    The node answers once an instance is durable (landed) and indexes it just after, so the
    index may trail the answers by a batch; a landed file is removed only after its row is
    committed, so an empty landing folder means the index has caught up.
    """
    landed = node.storage / ".landed"
    assert wait_for(lambda: not landed.is_dir() or not any(landed.iterdir()), timeout), "instances left unindexed"
    assert wait_for(lambda: _journals_retired(node), timeout), "journal records left unindexed"


def _journals_retired(node: NodeProcess) -> bool:
    from node.ingest import journal

    for path in journal.journal_files(node.storage):
        jrnl, records = journal.Journal.open(path, create=False)
        jrnl.close()
        if records:
            return False
    return True


def stored_files(node: NodeProcess) -> list[Path]:
    """Every file under the storage root, temp and landed files included, once the index caught
    up (not the receivers' journals: preallocated files of their own, see node/journal.py; nor
    the series' streamed volumes, decoded copies of instances already counted; nor the generated
    API token)."""
    settled(node)
    journals = node.storage / ".journal"
    return sorted(
        p
        for p in node.storage.rglob("*")
        if p.is_file()
        and journals not in p.parents
        and VOLUME_DIR not in p.parent.parts
        and not _api_token_file(node, p)
    )


def _api_token_file(node: NodeProcess, path: Path) -> bool:
    # The generated token, or its temporary file while the node writes it (then renames it).
    return path.parent == node.storage and (path.name == "api-token" or path.name.startswith(".api-token."))


def index_count(node: NodeProcess) -> int:
    """Instances in the node's index (once it caught up with the answers)."""
    from sqlalchemy import create_engine, func, select

    from node.index import Instance

    settled(node)

    engine = create_engine(node.database_url)
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(Instance)).scalar_one()
    engine.dispose()
    return count
