"""One received instance on its way into the index (``Arrival``), and rebuilding one after a crash.

An Arrival is made by the receiver once the instance is durable (journal record or landed file)
and carries it through the Indexer; ``arrival_from_landed``/``arrival_from_record`` rebuild it
from what a crash left behind (``node.ingest.recovery``). ``header_problem`` is the check both
apply: the data set agrees with the request and its UIDs can key the index.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from node.core.clock import utcnow
from node.core.dicom import DATASET_MISMATCH, INVALID_UID, NODE_DEVICE_SERIAL, NODE_MANUFACTURER
from node.ingest import journal, store
from node.ingest.index_values import IndexValues, index_values
from node.ingest.wire import Header, Unparseable, read_header


def made_here(header: Header | Dataset) -> bool:
    """Whether the node itself made this object (a result a PACS sent back): its equipment, or a
    Contributing Equipment item, is this node's (Manufacturer and Device Serial Number). Such
    objects are stored (they were acknowledged) but never analysed."""

    def ours(item: Header | Dataset) -> bool:
        return (
            str(item.get("Manufacturer") or "").strip() == NODE_MANUFACTURER
            and str(item.get("DeviceSerialNumber") or "").strip() == NODE_DEVICE_SERIAL
        )

    if ours(header):
        return True
    try:
        return any(ours(item) for item in header.get("ContributingEquipmentSequence") or [])
    except (TypeError, AttributeError):  # not a sequence as read: not ours
        return False


def instance_tag(sop_instance_uid: str) -> str:
    """A short, non-identifying name for an instance in logs."""
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:12]


@dataclass
class Arrival:
    """One received instance on its way into the index."""

    header: Header | Dataset
    transfer_syntax: str
    size_bytes: int
    meta_len: int  # where the data set starts in the file
    calling_ae: str
    called_ae: str
    received_at: datetime = field(default_factory=utcnow)
    landed: Path | None = None  # the durable landed file, until placed and indexed
    record: journal.Record | None = None  # or the durable journal record, until placed and indexed
    sha256: str | None = None  # of the data set; computed from the landed file when first needed
    outcome: str = ""  # new | same | kept_first | replaced | corrected
    corrected: list[str] = field(default_factory=list)  # identifying attributes a re-send changed
    old_relpath: str = ""
    kept_relpath: str = ""
    failures: int = 0
    retry_at: float = 0.0
    queued_at: float = 0.0
    recovered: bool = False  # from a crash: its final file may be there but incomplete
    values: IndexValues | None = None  # the rows' values, fitted when received (index_values)
    _stored: store.StoredFile | None = None

    def index_values(self) -> IndexValues:
        """The values of its index rows (fitted once: by the receiver, or here after a crash)."""
        if self.values is None:
            self.values = index_values(self.header)
        return self.values

    def digest(self) -> str:
        """The data set's SHA-256 (hashing the landed file or journal record the first time)."""
        if self.sha256 is None:
            if self.record is not None:
                payload = self.record.payload()
                try:
                    self.sha256 = hashlib.sha256(payload[self.meta_len :]).hexdigest()
                finally:
                    payload.release()
            else:
                self.sha256 = store.data_set_sha256(self.landed, self.meta_len)  # type: ignore[arg-type]
        return self.sha256

    @property
    def stored(self) -> store.StoredFile:
        """Final path (from the UIDs and the content hash), size and hash."""
        if self._stored is None:
            h, sha = self.header, self.digest()
            relpath = store.instance_relpath(h.StudyInstanceUID, h.SeriesInstanceUID, h.SOPInstanceUID, sha)
            self._stored = store.StoredFile(relpath, self.size_bytes, sha)
        return self._stored


def header_problem(ds: Dataset, sop_class: str, sop_instance: str) -> tuple[int, str] | None:
    # The request and the data set must agree (A900); the UIDs we key the index on must be valid.
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        value = ds.get(keyword)
        if value is not None and not store.valid_uid(str(value)):
            return INVALID_UID, f"{keyword} in the data set is invalid"
    if ds.get("SOPClassUID") != sop_class or ds.get("SOPInstanceUID") != sop_instance:
        return DATASET_MISMATCH, "SOP Class/Instance UID in the data set differ from the C-STORE request"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(keyword)
        if not store.valid_uid(str(value) if value is not None else None):
            return INVALID_UID, f"{keyword} missing or invalid"
    return None


def arrival_from_landed(path: Path, called_ae: str) -> Arrival:
    """Rebuild the Arrival of a landed file (after a crash): everything is in the file."""
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        offset = fh.tell()
        transfer_syntax = str(meta.TransferSyntaxUID)
        with store.MappedDataSet(fh.fileno(), offset) as view:
            header = read_header(view, transfer_syntax)
            digest = hashlib.sha256(view).hexdigest()
    problem = header_problem(header, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID))
    if problem:
        raise Unparseable(problem[1])
    stat = path.stat()
    return Arrival(
        header,
        transfer_syntax,
        stat.st_size,
        offset,
        str(meta.get("SourceApplicationEntityTitle", "")).strip(),
        called_ae,
        received_at=datetime.fromtimestamp(stat.st_mtime, timezone.utc),
        landed=path,
        sha256=digest,
        recovered=True,
    )


def arrival_from_record(record: journal.Record, called_ae: str) -> Arrival:
    """Rebuild the Arrival of a journal record (after a crash): everything is in the record."""
    payload = record.payload()
    try:
        fh = io.BytesIO(bytes(payload[: record.meta_len]))
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        transfer_syntax = str(meta.TransferSyntaxUID)
        data = payload[record.meta_len :]
        header = read_header(data, transfer_syntax)
        digest = record.sha256 or hashlib.sha256(data).hexdigest()  # version 2: checked by the scan
        data.release()
    finally:
        payload.release()
    problem = header_problem(header, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID))
    if problem:
        raise Unparseable(problem[1])
    received = datetime.fromtimestamp(record.received_ns / 1e9, timezone.utc) if record.received_ns else utcnow()
    return Arrival(
        header,
        transfer_syntax,
        record.payload_len,
        record.meta_len,
        str(meta.get("SourceApplicationEntityTitle", "")).strip(),
        called_ae,
        received_at=received,
        record=record,
        sha256=digest,
        recovered=True,
    )
