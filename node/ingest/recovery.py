"""Crash recovery: index what was answered Success but not indexed when a process died.

Everything answered is durable as a journal record or a landed file; at start the node (and
each receiver, for its own share) rebuilds the Arrivals from them and indexes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from node.ingest import journal, store
from node.ingest.arrival import Arrival, arrival_from_landed, arrival_from_record
from node.ingest.indexer import Indexer

# The receiver's logger: these lines read as they did before the stages were split.
log = logging.getLogger("ainode.receiver")


def recover_journal(indexer: Indexer, called_ae: str, path: Path) -> tuple[journal.Journal | None, int]:
    """Open a journal and index the records a crash left in it; returns it (None if it cannot
    be opened) and how many records were recovered."""
    try:
        jrnl, records = journal.Journal.open(path)
    except OSError as err:
        log.error("journal %s unavailable (%s): instances take the per-file path", path.name, err.strerror)
        return None, 0
    arrivals = []
    for record in records:
        try:
            arrivals.append(arrival_from_record(record, called_ae))
        except Exception as err:  # only complete, checksummed records are read back
            log.error(
                "journal record %d of %s cannot be read back (%s); skipped", record.seq, path.name, type(err).__name__
            )
            jrnl.retire([record])
    for start in range(0, len(arrivals), 64):
        indexer.process(arrivals[start : start + 64], durable=True)
    jrnl.checkpoint()
    if arrivals:
        log.warning("%d instance(s) answered before a restart were indexed from journal %s", len(arrivals), path.name)
    return jrnl, len(arrivals)


def recover_all(indexer: Indexer, called_ae: str) -> int:
    """Index everything answered but not indexed: every journal, every landed file."""
    found = 0
    for path in journal.journal_files(indexer.root):
        jrnl, n = recover_journal(indexer, called_ae, path)
        if jrnl is not None:
            jrnl.close()
        found += n
    return found + recover_landed(indexer, called_ae)


def recover_landed(indexer: Indexer, called_ae: str, prefix: str = "", synchronous: bool = True) -> int:
    """Index and place the instances a crash left landed (answered Success, maybe not indexed).

    Synchronous: committed before this returns (errors raised). Otherwise handed to the
    indexer's background thread. Returns how many were found.
    """
    batch: list[Arrival] = []
    found = 0
    for path in store.landed_files(indexer.root, prefix):
        try:
            arrival = arrival_from_landed(path, called_ae)
        except Exception as err:  # only complete files are ever landed: this needs a human
            log.error("landed file %s cannot be read back (%s); left in place", path.name, type(err).__name__)
            continue
        found += 1
        if synchronous:
            batch.append(arrival)
            if len(batch) >= 64:
                indexer.process(batch, durable=True)
                batch = []
        else:
            indexer.reserve(timeout=3600)
            indexer.submit(arrival)
    if batch:
        indexer.process(batch, durable=True)
    if found:
        log.warning("%d instance(s) answered before a restart were indexed from the landing folder", found)
    return found
