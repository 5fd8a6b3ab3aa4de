"""The Indexer: the batching thread that places answered instances and commits their index rows.

Runs after the answer, off the C-STORE path: the receiver ``reserve``s a place, lands the
instance durably, answers, and ``submit``s its Arrival; the Indexer writes or links it at its
final path, records it (``node.ingest.index_writer``) and makes the files durable in batches.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from node.core import audit
from node.ingest import journal, store
from node.ingest.arrival import Arrival, instance_tag
from node.ingest.index_writer import begin_write, index_batch
from node.ingest.quarantine import lasting, quarantine_arrival, reason_of

# The receiver's logger: these lines read as they did before the stages were split.
log = logging.getLogger("ainode.receiver")


# An arrival failing this often for a lasting reason (the database refuses a value) is moved
# aside (node.ingest.quarantine) instead of being retried forever.
QUARANTINE_AFTER = 3


class IndexBacklog(Exception):
    """Too many answered instances wait for the index (the database is down or slow)."""


class Indexer:
    """Places landed instances and commits their index rows, in batches, after the answer.

    Each batch: hard-link every landed file at its final path, fsync the final folders once,
    commit all rows in one transaction, then apply the duplicate policy's removals and forget
    the landed names. A failing batch is split and failing instances are retried with backoff
    (a database outage only delays indexing; the landed files are durable). ``reserve`` bounds
    how many answered instances may wait, so a dead database eventually stops ingestion
    (A700) instead of filling the disk unindexed.
    """

    def __init__(
        self,
        engine: Engine,
        root: Path,
        policy: str,
        max_batch: int = 128,
        max_waiting: int = 4096,
        background: bool = True,
        linger: float = 0.1,
        prefix: str = "",
        on_indexed: Callable[[list[Path]], None] | None = None,
        study_may_be_complete: Callable[[], None] | None = None,
    ):
        self._engine = engine
        self.root = Path(root)
        self.prefix = prefix
        self._policy = policy
        # Told the final paths of newly stored instances once indexed (the volume streamer).
        self._on_indexed = on_indexed
        # Told (one StudyWake.notify in the node) when a batch committed after an association ended:
        # the study's last instances may be in, so the assembler looks at once.
        self._study_may_be_complete = study_may_be_complete
        self._association_ended = False  # since the last committed batch
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._linger = linger  # how long a lone arrival waits for company (one commit for several)
        self._cond = threading.Condition()
        self._queue: deque[Arrival] = deque()
        self._retry: list[Arrival] = []
        self._waiting = 0  # reserved: being landed, queued, in a batch or waiting for a retry
        self._pending: dict[str, Arrival] = {}  # SOP Instance UID -> answered, not indexed yet
        self._stopping = False
        self._busy = False
        self._no_company = False  # an association ended: what is queued waits for nothing more
        self._unsynced: list[Arrival] = []  # placed and indexed, files not yet flushed
        self._synced_at = time.monotonic()
        self._sync_interval = 0.5
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
            self._thread.start()

    @property
    def background(self) -> bool:
        """True when a background thread indexes what is submitted."""
        return self._thread is not None

    # -- the answer path

    def reserve(self, timeout: float = 30.0) -> None:
        """Take a place in the backlog before landing an instance; IndexBacklog when full."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._waiting >= self._max_waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IndexBacklog(f"{self._waiting} instances wait for the index")
                self._cond.wait(left)
            self._waiting += 1

    def unreserve(self) -> None:
        """Give back a place taken by ``reserve`` (the instance was not landed)."""
        with self._cond:
            self._waiting -= 1
            self._cond.notify_all()

    def submit(self, arrival: Arrival) -> None:
        """Index a landed arrival (its place was reserved)."""
        arrival.queued_at = time.monotonic()
        with self._cond:
            self._pending[arrival.header.SOPInstanceUID] = arrival
            self._queue.append(arrival)
            # Wake the indexer only when it must act now: the first arrival starts its linger
            # timer, a full batch ends it. In between it sleeps until the timer runs out; waking
            # it per arrival cost two thread switches and a GIL hand-over on the answer path.
            if len(self._queue) == 1 or len(self._queue) >= self._max_batch:
                self._cond.notify_all()

    def pending(self, sop_instance_uid: str) -> Arrival | None:
        """The latest answered instance with this UID not indexed yet, if there is one."""
        with self._cond:
            return self._pending.get(sop_instance_uid)

    def no_more_coming(self) -> None:
        """An association ended: index what it left queued now instead of lingering for company
        (the study's last instances, which its readiness waits for)."""
        with self._cond:
            self._no_company = True
            self._association_ended = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits for the index; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Index what is queued (within ``timeout``) and stop; the rest stays landed."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the batches

    def process(self, arrivals: list[Arrival], durable: bool = False) -> None:
        """Place and index ``arrivals`` now (one transaction); raises what failed.

        Journal records are written out as instance files and landed files linked, at their
        final paths, and the rows committed: readers see them at once. The files are made
        durable later, many at a time (``make_durable``: one filesystem sync instead of a
        flush per file); until then the journal record or landed file stays, and recovery
        rewrites the file from it. ``durable=True`` makes this batch durable before returning.
        """
        for arrival in arrivals:
            if arrival.record is not None:
                temp = self._write_out(arrival)
                try:
                    store.place(self.root, temp, arrival.stored.relpath, replace=arrival.recovered)
                finally:
                    store.unland(temp)
            elif arrival.landed is not None:
                store.place(self.root, arrival.landed, arrival.stored.relpath, replace=arrival.recovered)
        self._commit(arrivals)
        for arrival in arrivals:
            self._settle(arrival)
        audit_corrections(arrivals)
        if self._on_indexed is not None:
            self._on_indexed(
                [self.root / a.stored.relpath for a in arrivals if a.outcome not in ("same", "kept_first")]
            )
        with self._cond:
            self._unsynced.extend(a for a in arrivals if a.record is not None or a.landed is not None)
        if durable or self._durability_due():
            self.make_durable()

    def _durability_due(self) -> bool:
        with self._cond:
            if not self._unsynced:
                return False
            if time.monotonic() - self._synced_at >= self._sync_interval:
                return True
            journals = {a.record.journal for a in self._unsynced if a.record is not None}
        return any(j.live_bytes() * 2 > j.size for j in journals)

    def make_durable(self) -> None:
        """Make every placed file durable, then drop the journal records and landed files that
        were its durable copy (checkpointing the journals)."""
        with self._cond:
            batch, self._unsynced = self._unsynced, []
            self._synced_at = time.monotonic()
        if not batch:
            return
        try:
            store.sync_files(self.root, [self.root / a.stored.relpath for a in batch])
        except BaseException:
            with self._cond:
                self._unsynced[:0] = batch
            raise
        journals: dict[journal.Journal, list[journal.Record]] = {}
        for arrival in batch:
            if arrival.record is not None:
                journals.setdefault(arrival.record.journal, []).append(arrival.record)
            elif arrival.landed is not None:
                store.unland(arrival.landed)
        for jrnl, records in journals.items():
            jrnl.retire(records)
            jrnl.checkpoint()

    def _write_out(self, arrival: Arrival) -> Path:
        """An instance file (not yet flushed) in the incoming folder, from a journal record:
        copied inside the kernel (copy_file_range), starting its writeback."""
        record = arrival.record
        fd, name = tempfile.mkstemp(dir=self.root / store.INCOMING, prefix=self.prefix + "place-", suffix=".part")
        try:
            record.journal.copy_to(record, fd)  # type: ignore[union-attr]
        except OSError as err:
            os.close(fd)
            os.unlink(name)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise store.OutOfSpace("disk full while placing") from err
            raise
        os.close(fd)
        return Path(name)

    def _settle(self, arrival: Arrival) -> None:
        name = instance_tag(arrival.header.SOPInstanceUID)
        if arrival.outcome == "kept_first":
            if arrival.stored.relpath != arrival.kept_relpath:
                store.remove_file(self.root, arrival.stored.relpath)
            log.warning("instance %s: duplicate with different content; first copy kept (policy keep_first)", name)
        elif arrival.outcome == "corrected":
            if arrival.old_relpath != arrival.stored.relpath:
                store.remove_file(self.root, arrival.old_relpath)
            log.warning(
                "instance %s: re-sent with corrected %s; the stored copy was replaced and the study is analysed again",
                name,
                ", ".join(arrival.corrected),
            )
        elif arrival.outcome == "replaced":
            # The new copy is durable and indexed: only now may the old one go.
            if arrival.old_relpath != arrival.stored.relpath:
                store.remove_file(self.root, arrival.old_relpath)
            log.warning("instance %s: duplicate with different content replaced the stored copy (policy replace)", name)
        elif arrival.outcome == "same":
            log.info("instance %s: identical duplicate, nothing changed", name)
        if arrival.landed is not None:
            store.unland(arrival.landed)

    def _commit(self, arrivals: list[Arrival]) -> None:
        for attempt in range(5):
            with self._engine.connect() as conn:
                try:
                    begin_write(conn)
                    index_batch(conn, arrivals, self._policy, self.root)
                    conn.commit()
                    return
                except OperationalError:
                    conn.rollback()
                    if attempt == 4:
                        raise
                    time.sleep(0.05 * (attempt + 1))
                except BaseException:
                    conn.rollback()
                    raise

    def _done(self, arrivals: list[Arrival]) -> None:
        with self._cond:
            for arrival in arrivals:
                uid = arrival.header.SOPInstanceUID
                if self._pending.get(uid) is arrival:
                    del self._pending[uid]
                self._waiting -= 1
            self._cond.notify_all()

    def _take(self) -> list[Arrival] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [a for a in self._retry if a.retry_at <= now]
                if due:  # one retry at a time, with whatever new arrivals are queued
                    self._retry = [a for a in self._retry if a.retry_at > now] + due[1:]
                    self._busy = True
                    return due[:1] + [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch - 1))]
                if self._queue:
                    age = now - self._queue[0].queued_at
                    lingering = not (self._stopping or self._no_company)
                    if len(self._queue) < self._max_batch and age < self._linger and lingering:
                        self._cond.wait(self._linger - age)
                        continue
                    self._busy = True
                    batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
                    self._no_company = bool(self._queue) and self._no_company
                    return batch
                if self._unsynced:
                    return []  # idle: time to make what was placed durable
                if self._stopping:
                    return None
                self._busy = False
                self._cond.notify_all()
                wait = min((a.retry_at for a in self._retry), default=now + 1.0) - now
                self._cond.wait(max(0.01, wait))

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                try:
                    self.make_durable()
                except OSError as err:
                    log.error("flushing placed instances failed: %s", err.strerror)
                return
            if not batch:
                try:
                    self.make_durable()
                except OSError as err:
                    log.error("flushing placed instances failed: %s", err.strerror)
                    time.sleep(1.0)
                continue
            try:
                self.process(batch)
                self._done(batch)
                committed = True
            except Exception:
                committed = self._process_one_by_one(batch)
            if committed:
                self._tell_if_association_ended()

    def _process_one_by_one(self, batch: list[Arrival]) -> bool:
        """A failed batch again, one arrival at a time: one bad arrival must not hold up the
        others. True when one was indexed."""
        committed = False
        for arrival in batch:
            try:
                self.process([arrival])
                self._done([arrival])
                committed = True
            except Exception as err:
                arrival.failures += 1
                if arrival.failures >= QUARANTINE_AFTER and lasting(err) and self._quarantine(arrival, err):
                    continue
                if arrival.failures in (1, 10) or arrival.failures % 100 == 0:
                    log.error(
                        "instance %s not indexed yet (attempt %d, %s); it is landed and will be retried",
                        instance_tag(arrival.header.SOPInstanceUID),
                        arrival.failures,
                        type(err).__name__,
                    )
                arrival.retry_at = time.monotonic() + min(60.0, 0.1 * 2 ** min(arrival.failures, 10))
                with self._cond:
                    self._retry.append(arrival)
        return committed

    def _tell_if_association_ended(self) -> None:
        """After a batch: when an association ended since the last one, its study's last
        instances may now be indexed. The signal stays while arrivals are queued (a batch of
        more than ``max_batch`` ends in the next one)."""
        with self._cond:
            ended = self._association_ended
            self._association_ended = ended and bool(self._queue)
        if ended and self._study_may_be_complete is not None:
            try:
                self._study_may_be_complete()
            except Exception as err:  # the timers still complete the study: indexing goes on
                log.error("telling the assembler a study may be complete failed (%s)", type(err).__name__)

    def _quarantine(self, arrival: Arrival, err: Exception) -> bool:
        """Move an arrival the index will not take aside, so it stops holding its place."""
        try:
            quarantine_arrival(self.root, arrival, reason_of(err))
        except Exception as failure:  # the disk is full: keep retrying, it is still durable
            log.error("quarantining instance failed (%s)", type(failure).__name__)
            return False
        self._done([arrival])
        return True


def audit_corrections(arrivals: list[Arrival]) -> None:
    """One Patient Record audit message per study and sender for the corrections in a batch
    (the attributes' names, never their values)."""
    corrected: dict[tuple[str, str, str], set[str]] = {}
    patients: dict[tuple[str, str, str], audit.PatientIdentity | None] = {}
    for arrival in arrivals:
        if arrival.outcome == "corrected":
            key = (str(arrival.header.StudyInstanceUID), arrival.calling_ae, arrival.called_ae)
            corrected.setdefault(key, set()).update(arrival.corrected)
            header = arrival.header  # the corrected identification: the patient as now named
            patients[key] = audit.patient_identity(
                header.get("PatientID", ""), header.get("PatientName", ""), header.get("IssuerOfPatientID", "")
            )
    for (study_uid, source_ae, node_ae), attributes in corrected.items():
        audit.patient_record(
            study_uid=study_uid,
            attributes=sorted(attributes),
            source_ae=source_ae,
            node_ae=node_ae,
            patient=patients[(study_uid, source_ae, node_ae)],
        )
