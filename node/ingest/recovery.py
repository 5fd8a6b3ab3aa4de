"""Crash recovery: index what was answered Success but not indexed when a process died.

Everything answered is durable as a journal record or a landed file; at start the node (and
each receiver, for its own share) rebuilds the Arrivals from them and indexes them. One bad
instance never holds up the others: a batch that fails is indexed one instance at a time, and
an instance the index cannot take (or that cannot be read back) is quarantined
(``node.ingest.quarantine``). Only a database that does not answer leaves instances waiting:
they are handed back to the caller, which retries them in the background.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from node.ingest import journal, store
from node.ingest.arrival import Arrival, arrival_from_landed, arrival_from_record
from node.ingest.indexer import Indexer
from node.ingest.quarantine import lasting, quarantine_arrival, quarantine_landed, quarantine_record, reason_of

# The receiver's logger: these lines read as they did before the stages were split.
log = logging.getLogger("ainode.receiver")

BATCH = 64


def index_isolated(indexer: Indexer, arrivals: list[Arrival]) -> list[Arrival]:
    """Index ``arrivals`` in batches; when a batch fails, one at a time, quarantining each one
    the index cannot take. Returns those left unindexed because the database did not answer
    (in order, from the first that failed that way)."""
    for start in range(0, len(arrivals), BATCH):
        chunk = arrivals[start : start + BATCH]
        try:
            indexer.process(chunk, durable=True)
            continue
        except Exception as err:
            if not lasting(err) and not isinstance(err, IntegrityError):
                return arrivals[start:]  # the database is down or the disk full: nothing to isolate
        for n, arrival in enumerate(chunk):
            failure = _index_one(indexer, arrival)
            if failure is None:
                continue
            if not (lasting(failure) or isinstance(failure, IntegrityError)):
                return chunk[n:] + arrivals[start + BATCH :]
            quarantine_arrival(indexer.root, arrival, reason_of(failure))
    return []


def _index_one(indexer: Indexer, arrival: Arrival) -> Exception | None:
    """Index one arrival; what failed, if anything. An integrity error is tried twice: another
    receiver may have inserted the same row meanwhile (then it is a duplicate and goes in)."""
    failure: Exception | None = None
    for _ in range(2):
        try:
            indexer.process([arrival], durable=True)
            return None
        except IntegrityError as err:
            failure = err
        except Exception as err:
            return err
    return failure


def recover_journal(indexer: Indexer, called_ae: str, path: Path) -> tuple[journal.Journal, int, list[Arrival]]:
    """Open a journal and index the records a crash left in it: the journal, how many records
    were found, and the arrivals left for the database (see ``index_isolated``). Raises
    OSError when the journal cannot be opened."""
    jrnl, records = journal.Journal.open(path)
    arrivals = []
    for record in records:
        try:
            arrivals.append(arrival_from_record(record, called_ae))
        except Exception as err:  # only complete, checksummed records are read back
            quarantine_record(indexer.root, record, f"cannot be read back: {type(err).__name__}", called_ae)
    left = index_isolated(indexer, arrivals)
    jrnl.checkpoint()
    done = len(arrivals) - len(left)
    if done:
        log.warning("%d instance(s) answered before a restart were indexed from journal %s", done, path.name)
    return jrnl, len(records), left


def recover_all(indexer: Indexer, called_ae: str) -> int:
    """Index everything answered but not indexed: every journal, every landed file."""
    found = 0
    for path in journal.journal_files(indexer.root):
        try:
            jrnl, n, left = recover_journal(indexer, called_ae, path)
        except OSError as err:
            log.error("journal %s cannot be opened (%s): its records wait for its receiver", path.name, err.strerror)
            continue
        if left:
            log.error(
                "%d instance(s) in journal %s wait for the database: indexed by its receiver when it answers",
                len(left),
                path.name,
            )
        jrnl.close()
        found += n
    return found + recover_landed(indexer, called_ae)


def recover_landed(indexer: Indexer, called_ae: str, prefix: str = "", synchronous: bool = True) -> int:
    """Index and place the instances a crash left landed (answered Success, maybe not indexed).

    Synchronous: indexed (or quarantined) before this returns; what waits for the database is
    handed to the indexer's background thread, if it has one. Otherwise all go to that thread. Returns how
    many were found.
    """
    arrivals: list[Arrival] = []
    for path in store.landed_files(indexer.root, prefix):
        try:
            arrivals.append(arrival_from_landed(path, called_ae))
        except Exception as err:  # only complete files are ever landed: this needs a human
            quarantine_landed(indexer.root, path, f"cannot be read back: {type(err).__name__}", called_ae)
    left = index_isolated(indexer, arrivals) if synchronous else arrivals
    if indexer.background:  # else (the node's start) each receiver takes up its own later
        for arrival in left:
            indexer.reserve(timeout=3600)
            indexer.submit(arrival)
    if len(arrivals) > len(left):
        log.warning(
            "%d instance(s) answered before a restart were indexed from the landing folder", len(arrivals) - len(left)
        )
    return len(arrivals)
