"""The receiver: a pynetdicom AE answering C-ECHO and C-STORE under the association policy.

One receiver runs per process (``node.service`` starts several sharing the port). A C-STORE is
answered Success only once the instance is durable: its data set, written to disk while it
arrived, is flushed and *landed* (``node.store``). The index row follows within milliseconds: the
process's ``Indexer`` places landed files at their final paths and commits their rows in
batches, and whatever a crash left landed is indexed when the node (or the receiver) starts
again (``recover_landed``). Nothing answered Success is lost to kill -9 or a power cut; the
index is at most one batch behind the answers. Associations are served by ``node.acceptor``
(pynetdicom with event-driven reactors and a direct C-STORE path). Logs carry no patient data:
instances are named by a short hash of their SOP Instance UID.
"""

from __future__ import annotations

import errno
import hashlib
import io
import ipaddress
import logging
import os
import socket
import sqlite3
import ssl
import struct
import tempfile
import threading
import time
import warnings
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom import uid as dcm_uid
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Connection, Engine, bindparam, case, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from node.ingest import acceptor, journal, store
from node.core import audit, metrics
from node.index import Instance, Patient, Series, Study, utcnow
from node.core.settings import Peer, Settings

log = logging.getLogger("ainode.receiver")
security_log = logging.getLogger("ainode.security")

# --- DICOM status codes we answer (PS3.4 B.2.3 and C.4.2.1.4) ---------------------------------
SUCCESS = 0x0000
WARNING_DUPLICATE_DISCARDED = 0xB006  # Elements Discarded: the first copy was kept
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # data set does not match the C-STORE request's SOP Class/Instance
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC001  # Cannot understand: a UID that is not digits and dots, or too long
NOT_AUTHORIZED = 0x0124
PROCESSING_FAILURE = 0x0110

# Transfer syntaxes accepted and stored as received (no transcoding).
TRANSFER_SYNTAXES = [
    dcm_uid.ExplicitVRLittleEndian,
    dcm_uid.ImplicitVRLittleEndian,
    dcm_uid.DeflatedExplicitVRLittleEndian,
    dcm_uid.ExplicitVRBigEndian,
    dcm_uid.JPEGBaseline8Bit,
    dcm_uid.JPEGExtended12Bit,
    dcm_uid.JPEGLossless,
    dcm_uid.JPEGLosslessSV1,
    dcm_uid.JPEGLSLossless,
    dcm_uid.JPEGLSNearLossless,
    dcm_uid.JPEG2000Lossless,
    dcm_uid.JPEG2000,
    dcm_uid.RLELossless,
    dcm_uid.HTJ2KLossless,
    dcm_uid.HTJ2KLosslessRPCL,
    dcm_uid.HTJ2K,
]

# The file meta names the implementation that received the data (as the conformance statement).
IMPLEMENTATION_CLASS_UID = PYNETDICOM_IMPLEMENTATION_UID
IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION

# The header fields the index needs: everything else stays unparsed.
HEADER_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "Modality", "Manufacturer", "ReferringPhysicianName", "StationName",
    "StudyDescription", "SeriesDescription", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "PatientAge", "BodyPartExamined", "SliceThickness",
    "StudyInstanceUID", "SeriesInstanceUID", "StudyID", "SeriesNumber", "InstanceNumber",
    "NumberOfFrames", "FrameOfReferenceUID",
)
HEADER_TAGS = [Tag(k) for k in HEADER_KEYWORDS]
_PIXEL_DATA = 0x7FE00010
_UNKNOWN: Any = object()
_SPILL_AT = 16 * 1024 * 1024  # larger data sets are received straight into a file


def quiet_pynetdicom() -> None:
    """No identifiers (patient data) in pynetdicom's or pydicom's logs, no per-PDU chatter.

    pydicom's validation warnings quote element values (a malformed Patient Name would be
    logged verbatim), so they are silenced; our own log lines say what was refused and why.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"pynetdicom(\..*)?")


def instance_tag(sop_instance_uid: str) -> str:
    """A short, non-identifying name for an instance in logs."""
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:12]


# --- parsing the received data set -----------------------------------------------------------


class Unparseable(Exception):
    """The data set is not a complete, well-formed DICOM encoding (answer C000)."""


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _walk(buf: memoryview, pos: int, end: int, implicit: bool, little: bool, stop_at: int | None,
          pixel_at: list[int] | None = None, uids: dict[int, tuple[int, int, bytes]] | None = None) -> int:
    """Walk element headers from ``pos``; return where the walk stopped.

    Checks that every declared length fits in the buffer, so a truncated data set is caught
    without reading any value. ``stop_at`` is an item/sequence delimiter tag that ends the walk;
    ``pixel_at`` receives the offset of the top-level Pixel Data element, ``uids`` the (offset,
    length, VR) of the top-level elements the index needs (``_INDEX_TAGS``; VR ``b""`` when
    implicit).
    """
    u16 = "<H" if little else ">H"
    u32 = "<I" if little else ">I"
    while pos < end:
        if pos + 8 > end:
            raise Unparseable("data set ends inside an element header")
        group, elem = struct.unpack_from("<HH" if little else ">HH", buf, pos)
        tag = (group << 16) | elem
        if pixel_at is not None and not pixel_at and tag >= _PIXEL_DATA:
            pixel_at.append(pos)
        if tag in (_ITEM_END, _SEQ_END):
            if tag != stop_at:
                raise Unparseable("unexpected delimiter")
            return pos + 8
        if implicit or group == 0xFFFE:
            length = struct.unpack_from(u32, buf, pos + 4)[0]
            header, vr = 8, b""
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise Unparseable("data set ends inside an element header")
                length = struct.unpack_from(u32, buf, pos + 8)[0]
                header = 12
            else:
                length = struct.unpack_from(u16, buf, pos + 6)[0]
                header = 8
        pos += header
        if uids is not None and tag in _INDEX_TAGS and length != 0xFFFFFFFF:
            uids[tag] = (pos, length, vr)
        if length == 0xFFFFFFFF:
            pos = _walk_items(buf, pos, end, implicit, little, encapsulated=(tag == _PIXEL_DATA))
        else:
            pos += length
            if pos > end:
                raise Unparseable("an element's value runs past the end of the data set")
    if stop_at is not None:
        raise Unparseable("data set ends inside a sequence")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, little: bool, encapsulated: bool) -> int:
    # An undefined-length sequence or encapsulated pixel data: items until the sequence delimiter.
    order = "<HHI" if little else ">HHI"
    while True:
        if pos + 8 > end:
            raise Unparseable("data set ends inside a sequence")
        group, elem, length = struct.unpack_from(order, buf, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise Unparseable("expected an item in a sequence")
        if length == 0xFFFFFFFF and not encapsulated:
            pos = _walk(buf, pos, end, implicit, little, stop_at=_ITEM_END)
        else:
            pos += length
            if pos > end:
                raise Unparseable("an item runs past the end of the data set")


_UID_TAGS = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
             0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}
_INDEX_TAGS = {int(tag): keyword for tag, keyword in zip(HEADER_TAGS, HEADER_KEYWORDS)}
# Value representations whose bytes are the text itself (PS3.5 6.2); ASCII text of these is
# decoded here, anything else by pydicom.
_TEXT_VRS = frozenset({b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST",
                       b"TM", b"UC", b"UI", b"UT", b""})
_MISSING: Any = object()


class Header:
    """The fields of a data set the index needs.

    Found by the walk that checks the encoding (``read_header``) and decoded straight from the
    bytes when they are ASCII text, which they nearly always are: the four UIDs the answer
    depends on at once, the rest when the Indexer asks. Values come back as text (several
    values joined by backslashes, as encoded), which is what the index stores. A value in
    another character set or an unexpected VR is decoded by pydicom (the whole header parsed
    once, only the index's fields). Supports ``get(keyword)`` and attribute access like a
    pydicom Dataset.
    """

    def __init__(self, raw: bytes, implicit: bool, little: bool, uids: dict[str, str],
                 fields: dict[str, tuple[int, int, bytes]] | None = None):
        self._raw, self._implicit, self._little = raw, implicit, little
        self._uids = uids
        self._fields = fields or {}
        self._dataset: Dataset | None = None

    def get(self, keyword: str, default: Any = None) -> Any:
        """The value of ``keyword`` (None/default when absent)."""
        if keyword in self._uids:
            return self._uids[keyword]
        if keyword in _UID_KEYWORDS:
            return default
        where = self._fields.get(keyword)
        if where is None:
            return default
        pos, length, vr = where
        value = self._raw[pos:pos + length]
        if vr in _TEXT_VRS and value.isascii():
            return value.decode("ascii").rstrip("\x00 ")
        return self.dataset().get(keyword, default)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise AttributeError(name)
        return value

    def dataset(self) -> Dataset:
        """The header parsed by pydicom (only the index's fields)."""
        if self._dataset is None:
            try:
                self._dataset = read_dataset(io.BytesIO(self._raw), self._implicit, self._little,
                                             stop_when=_before_pixels, specific_tags=HEADER_TAGS)
            except Exception:  # pydicom raises many kinds on odd values: index without them
                self._dataset = Dataset()
        return self._dataset


_UID_KEYWORDS = frozenset(_UID_TAGS.values())


def read_header(encoded: memoryview, transfer_syntax: str) -> Header:
    """Check the encoded data set is complete and take out what the index needs."""
    ts = dcm_uid.UID(transfer_syntax)
    if ts == dcm_uid.DeflatedExplicitVRLittleEndian:
        try:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded)
        except zlib.error as err:
            raise Unparseable(f"deflated data set does not inflate: {err}") from None
        encoded = memoryview(raw)
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    if len(encoded) == 0:
        raise Unparseable("empty data set")
    try:
        pixel_at: list[int] = []
        found: dict[int, tuple[int, int, bytes]] = {}
        _walk(encoded, 0, len(encoded), implicit, little, stop_at=None, pixel_at=pixel_at, uids=found)
    except Unparseable:
        raise
    except Exception as err:  # struct errors on garbage
        raise Unparseable(f"{type(err).__name__}") from None
    uids = {_UID_TAGS[tag]: bytes(encoded[pos:pos + length]).decode("ascii", "replace").rstrip("\x00 ")
            for tag, (pos, length, _) in found.items() if tag in _UID_TAGS}
    fields = {_INDEX_TAGS[tag]: where for tag, where in found.items() if tag not in _UID_TAGS}
    # Copy only the header for the parser, never the pixel data.
    return Header(bytes(encoded[:pixel_at[0]] if pixel_at else encoded), implicit, little, uids, fields)


def _before_pixels(tag: Any, _vr: Any, _length: int) -> bool:
    return int(tag) >= _PIXEL_DATA


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value in (None, ""):
            return None
        if isinstance(value, str):  # IS as text: "12", " 12 ", also "12.0" as pydicom reads it
            try:
                return int(value)
            except ValueError:
                number = float(value)
                return int(number) if number.is_integer() else None
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


# --- the index --------------------------------------------------------------------------------


# Storage Commitment Push Model SOP Class (PS3.4 J).
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"


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
    outcome: str = ""  # new | same | kept_first | replaced
    old_relpath: str = ""
    kept_relpath: str = ""
    failures: int = 0
    retry_at: float = 0.0
    queued_at: float = 0.0
    recovered: bool = False  # from a crash: its final file may be there but incomplete
    _stored: store.StoredFile | None = None

    def digest(self) -> str:
        """The data set's SHA-256 (hashing the landed file or journal record the first time)."""
        if self.sha256 is None:
            if self.record is not None:
                payload = self.record.payload()
                try:
                    self.sha256 = hashlib.sha256(payload[self.meta_len:]).hexdigest()
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


def _get_or_create(conn: Connection, table: Any, where: Any, values: Callable[[], dict[str, Any]]) -> int:
    """The id of the row matching ``where``, inserted from ``values()`` when there is none."""
    found = conn.execute(select(table.c.id).where(where)).scalar()
    if found is not None:
        return found
    if conn.dialect.name == "sqlite":
        # SQLite writers are serialised by BEGIN IMMEDIATE: nobody can insert it meanwhile.
        return conn.execute(insert(table).values(**values())).inserted_primary_key[0]
    try:
        with conn.begin_nested():
            return conn.execute(insert(table).values(**values())).inserted_primary_key[0]
    except IntegrityError:
        # Another receiver process created it a moment ago.
        return conn.execute(select(table.c.id).where(where)).scalar_one()


_PATIENTS, _STUDIES, _SERIES, _INSTANCES = (m.__table__ for m in (Patient, Study, Series, Instance))


def _count_update(table: Any) -> Any:
    # instance_count += :n; last_received_at = the later of the stored time and :t.
    at = bindparam("t", type_=table.c.last_received_at.type)
    return (update(table).where(table.c.id == bindparam("pk"))
            .values(instance_count=func.coalesce(table.c.instance_count, 0) + bindparam("n"),
                    last_received_at=case((table.c.last_received_at.is_(None), at),
                                          (table.c.last_received_at < at, at), else_=table.c.last_received_at)))


# Built once: SQLAlchemy then reuses the compiled statements (building them per batch cost more
# than the database work).
_SELECT_EXISTING = (select(_INSTANCES.c.id, _INSTANCES.c.sop_instance_uid, _INSTANCES.c.sha256, _INSTANCES.c.path)
                    .where(_INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True))))
_SELECT_SERIES = (select(_SERIES.c.id, _SERIES.c.study_pk)
                  .where(_SERIES.c.series_uid == bindparam("uid")))
_INSERT_INSTANCES = insert(_INSTANCES)
_UPDATE_INSTANCE = (update(_INSTANCES).where(_INSTANCES.c.id == bindparam("pk"))
                    .values(path=bindparam("path"), size_bytes=bindparam("size_bytes"), sha256=bindparam("sha256"),
                            transfer_syntax_uid=bindparam("transfer_syntax_uid"),
                            received_at=bindparam("received_at", type_=_INSTANCES.c.received_at.type),
                            calling_ae=bindparam("calling_ae")))
_UPDATE_SERIES_COUNT = _count_update(_SERIES)
_UPDATE_STUDY_COUNT = _count_update(_STUDIES)


def index_batch(conn: Connection, arrivals: list[Arrival], policy: str) -> None:
    """Record arrivals in the index (in the caller's transaction); sets each ``outcome``.

    SQLAlchemy Core, one lookup per distinct study and series and one multi-row insert, so
    a batch costs about as much as one instance did through the ORM.
    """
    uids = sorted({a.header.SOPInstanceUID for a in arrivals})
    existing: dict[str, dict[str, Any]] = {
        row.sop_instance_uid: dict(row._mapping) for row in conn.execute(_SELECT_EXISTING, {"uids": uids})}
    series_ids: dict[str, tuple[int, int]] = {}  # series UID -> (series id, study id)
    new_rows: list[dict[str, Any]] = []
    counts: dict[tuple[int, int], list[Any]] = {}  # (series id, study id) -> [count, last time]
    for arrival in arrivals:
        ds, stored = arrival.header, arrival.stored
        uid = ds.SOPInstanceUID
        row = existing.get(uid)
        if row is not None:
            if row["sha256"] == stored.sha256:
                arrival.outcome = "same"
            elif policy == "keep_first":
                arrival.outcome, arrival.kept_relpath = "kept_first", row["path"]
            else:
                arrival.outcome, arrival.old_relpath = "replaced", row["path"]
                values = dict(path=stored.relpath, size_bytes=stored.size_bytes, sha256=stored.sha256,
                              transfer_syntax_uid=arrival.transfer_syntax, received_at=arrival.received_at,
                              calling_ae=arrival.calling_ae)
                if row.get("id") is not None:
                    conn.execute(_UPDATE_INSTANCE, {"pk": row["id"], **values})
                else:  # inserted earlier in this batch
                    row["pending"].update(values)
                row.update(sha256=stored.sha256, path=stored.relpath)
            continue
        key = series_ids.get(ds.SeriesInstanceUID)
        if key is None:
            key = series_ids[ds.SeriesInstanceUID] = _series_of(conn, arrival)
        values = dict(sop_instance_uid=uid, sop_class_uid=ds.SOPClassUID, series_pk=key[0],
                      transfer_syntax_uid=arrival.transfer_syntax, path=stored.relpath,
                      size_bytes=stored.size_bytes, sha256=stored.sha256,
                      instance_number=_int(ds, "InstanceNumber"), number_of_frames=_int(ds, "NumberOfFrames") or 1,
                      calling_ae=arrival.calling_ae, received_at=arrival.received_at)
        new_rows.append(values)
        existing[uid] = {"id": None, "sha256": stored.sha256, "path": stored.relpath, "pending": values}
        count = counts.setdefault(key, [0, arrival.received_at])
        count[0] += 1
        count[1] = max(count[1], arrival.received_at)
        arrival.outcome = "new"
    if new_rows:
        conn.execute(_INSERT_INSTANCES, new_rows)
    # Counters and times move with the rows in the same transaction: the assembler's quiet
    # timers read last_received_at.
    per_study: dict[int, list[Any]] = {}
    for (series_pk, study_pk), (n, last) in counts.items():
        conn.execute(_UPDATE_SERIES_COUNT, {"pk": series_pk, "n": n, "t": last})
        total = per_study.setdefault(study_pk, [0, last])
        total[0] += n
        total[1] = max(total[1], last)
    for study_pk, (n, last) in per_study.items():
        conn.execute(_UPDATE_STUDY_COUNT, {"pk": study_pk, "n": n, "t": last})


def _series_of(conn: Connection, arrival: Arrival) -> tuple[int, int]:
    """(series id, study id) of an arrival's series, creating patient, study and series rows."""
    ds, now = arrival.header, arrival.received_at
    row = conn.execute(_SELECT_SERIES, {"uid": ds.SeriesInstanceUID}).first()
    if row is not None:
        return row.id, row.study_pk
    patient_id, issuer = _text(ds, "PatientID", 64), _text(ds, "IssuerOfPatientID", 64)
    patient_pk = _get_or_create(
        conn, _PATIENTS, (_PATIENTS.c.patient_id == patient_id) & (_PATIENTS.c.issuer == issuer),
        lambda: dict(patient_id=patient_id, issuer=issuer, name=_text(ds, "PatientName", 324),
                     birth_date=_text(ds, "PatientBirthDate", 8), sex=_text(ds, "PatientSex", 16)))
    study_pk = _get_or_create(
        conn, _STUDIES, _STUDIES.c.study_uid == ds.StudyInstanceUID,
        lambda: dict(study_uid=ds.StudyInstanceUID, patient_pk=patient_pk,
                     accession_number=_text(ds, "AccessionNumber", 64),
                     study_date=_text(ds, "StudyDate", 8), study_time=_text(ds, "StudyTime", 16),
                     description=_text(ds, "StudyDescription", 64),
                     referring_physician=_text(ds, "ReferringPhysicianName", 324),
                     study_id=_text(ds, "StudyID", 16), patient_age=_text(ds, "PatientAge", 4),
                     calling_ae=arrival.calling_ae, called_ae=arrival.called_ae,
                     instance_count=0, first_received_at=now, last_received_at=now))
    series_pk = _get_or_create(
        conn, _SERIES, _SERIES.c.series_uid == ds.SeriesInstanceUID,
        lambda: dict(series_uid=ds.SeriesInstanceUID, study_pk=study_pk,
                     modality=_text(ds, "Modality", 16), series_number=_int(ds, "SeriesNumber"),
                     description=_text(ds, "SeriesDescription", 64),
                     body_part=_text(ds, "BodyPartExamined", 16),
                     station_name=_text(ds, "StationName", 16),
                     manufacturer=_text(ds, "Manufacturer", 64),
                     slice_thickness=_float(ds, "SliceThickness"),
                     frame_of_reference_uid=_text(ds, "FrameOfReferenceUID", 64),
                     instance_count=0, first_received_at=now, last_received_at=now))
    return series_pk, study_pk


def _begin_write(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        # Take the write lock up front so concurrent receivers never race on get-or-create.
        conn.execute(text("BEGIN IMMEDIATE"))


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

    def __init__(self, engine: Engine, root: Path, policy: str, max_batch: int = 128,
                 max_waiting: int = 4096, background: bool = True, linger: float = 0.1, prefix: str = ""):
        self._engine = engine
        self.root = Path(root)
        self.prefix = prefix
        self._policy = policy
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
        self._unsynced: list[Arrival] = []  # placed and indexed, files not yet flushed
        self._synced_at = time.monotonic()
        self._sync_interval = 0.5
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
            self._thread.start()

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
                    _begin_write(conn)
                    index_batch(conn, arrivals, self._policy)
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
                    if len(self._queue) < self._max_batch and age < self._linger and not self._stopping:
                        self._cond.wait(self._linger - age)
                        continue
                    self._busy = True
                    return [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
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
                continue
            except Exception:
                pass
            for arrival in batch:  # one bad arrival must not hold up the others
                try:
                    self.process([arrival])
                    self._done([arrival])
                except Exception as err:
                    arrival.failures += 1
                    if arrival.failures in (1, 10) or arrival.failures % 100 == 0:
                        log.error("instance %s not indexed yet (attempt %d, %s); it is landed and will be retried",
                                  instance_tag(arrival.header.SOPInstanceUID), arrival.failures, type(err).__name__)
                    arrival.retry_at = time.monotonic() + min(60.0, 0.1 * 2 ** min(arrival.failures, 10))
                    with self._cond:
                        self._retry.append(arrival)


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
    problem = _header_problem(header, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID))
    if problem:
        raise Unparseable(problem[1])
    stat = path.stat()
    return Arrival(header, transfer_syntax, stat.st_size, offset, str(meta.get("SourceApplicationEntityTitle", "")).strip(),
                   called_ae, received_at=datetime.fromtimestamp(stat.st_mtime, timezone.utc), landed=path,
                   sha256=digest, recovered=True)


def arrival_from_record(record: journal.Record, called_ae: str) -> Arrival:
    """Rebuild the Arrival of a journal record (after a crash): everything is in the record."""
    payload = record.payload()
    try:
        fh = io.BytesIO(bytes(payload[:record.meta_len]))
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        transfer_syntax = str(meta.TransferSyntaxUID)
        data = payload[record.meta_len:]
        header = read_header(data, transfer_syntax)
        digest = record.sha256 or hashlib.sha256(data).hexdigest()  # version 2: checked by the scan
        data.release()
    finally:
        payload.release()
    problem = _header_problem(header, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID))
    if problem:
        raise Unparseable(problem[1])
    received = (datetime.fromtimestamp(record.received_ns / 1e9, timezone.utc) if record.received_ns else utcnow())
    return Arrival(header, transfer_syntax, record.payload_len, record.meta_len,
                   str(meta.get("SourceApplicationEntityTitle", "")).strip(), called_ae,
                   received_at=received, record=record, sha256=digest, recovered=True)


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
            log.error("journal record %d of %s cannot be read back (%s); skipped", record.seq, path.name,
                      type(err).__name__)
            jrnl.retire([record])
    for start in range(0, len(arrivals), 64):
        indexer.process(arrivals[start:start + 64], durable=True)
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


# --- association policy -----------------------------------------------------------------------


class AssociationSlots:
    """Association counts shared by every receiver process (total and per peer).

    A flat shared int array, one row per receiver process and one column per peer (plus one for
    unknown peers and one for the total). Each process writes only its own row, so the service
    can zero the row of a receiver that died without knowing what it held.
    """

    def __init__(self, array: Any, processes: int, peers: list[Peer]):
        self._array = array
        self._columns = len(peers) + 2  # peers..., unknown, total
        self.processes = processes

    @classmethod
    def create(cls, ctx: Any, processes: int, peers: list[Peer]) -> "AssociationSlots":
        """Allocate the shared counters (before forking the receivers)."""
        return cls(ctx.Array("i", processes * (len(peers) + 2)), processes, peers)

    def _sum(self, column: int) -> int:
        return sum(self._array[r * self._columns + column] for r in range(self.processes))

    def acquire(self, row: int, column: int, peer_limit: int, total_limit: int) -> str | None:
        """Take a slot; returns None, or why not ("total", "peer")."""
        with self._array.get_lock():
            if self._sum(self._columns - 1) >= total_limit:
                return "total"
            if self._sum(column) >= peer_limit:
                return "peer"
            self._array[row * self._columns + column] += 1
            self._array[row * self._columns + self._columns - 1] += 1
        return None

    def release(self, row: int, column: int) -> None:
        """Give a slot back when its association ends."""
        with self._array.get_lock():
            self._array[row * self._columns + column] -= 1
            self._array[row * self._columns + self._columns - 1] -= 1

    def clear_row(self, row: int) -> None:
        """Forget everything a (dead) receiver process held."""
        with self._array.get_lock():
            for c in range(self._columns):
                self._array[row * self._columns + c] = 0

    def total(self) -> int:
        """Associations open now across every receiver."""
        with self._array.get_lock():
            return self._sum(self._columns - 1)


def address_allowed(address: str, patterns: list[str]) -> bool:
    """True when ``address`` matches one of a peer's hosts (IP, CIDR network or host name)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for pattern in patterns:
        try:
            if ip in ipaddress.ip_network(pattern, strict=False):
                return True
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(pattern, None)
        except OSError:
            continue
        if any(ipaddress.ip_address(info[4][0]) == ip for info in infos):
            return True
    return False


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context (TLS 1.2 or newer; client certificates when configured)."""
    tls = settings.node.tls
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        ctx.load_verify_locations(str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx


# --- the receiver -----------------------------------------------------------------------------


@dataclass
class _AssociationState:
    peer: Peer | None
    column: int


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT, so several processes share the port."""

    def server_bind(self) -> None:  # noqa: D102 - socketserver hook
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; with TLS the handshake happens later, on the association's thread.

        pynetdicom wraps the socket with an immediate handshake in the accept loop, so one peer
        that connects and sends nothing would stall every other connection to this receiver.
        """
        client, address = self.socket.accept()
        # Answers go out at once, whatever pynetdicom writes in pieces (see scu.associate).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client.settimeout(self.ae.acse_timeout)  # a silent TLS peer cannot hold a thread forever
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


@dataclass
class Receiver:
    """The DICOM listener of one process: policy, C-ECHO and C-STORE handlers."""

    settings: Settings
    engine: Engine
    slots: AssociationSlots
    row: int = 0
    mpps_handlers: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)
    # Storage Commitment reports from the PACS (it opens a new association and plays the SCP role).
    commitment_handlers: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.settings.storage.path)
        self.reserve = int(self.settings.storage.min_free_bytes)
        self.space = store.SpaceGuard(self.root, self.reserve)
        self.prefix = f"r{self.row}-"  # this process's temp and landed files
        self.policy = self.settings.node.duplicate_policy
        self.indexer = Indexer(self.engine, self.root, self.policy, prefix=self.prefix)
        self._lookup = _ShaLookup(self.engine)
        self.journal: journal.Journal | None = None
        self.dirsync = store.DirSync()
        self._assocs: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()

    def recover(self) -> int:
        """Open this process's journal and index what a predecessor answered but did not index
        (normally nothing: the node indexes everything at start, before receivers run)."""
        store.prepare_root(self.root, self.prefix)
        path = self.root / journal.FOLDER / f"{self.prefix}journal.wal"
        try:
            self.journal, found = recover_journal(self.indexer, self.settings.node.ae_title, path)
        except Exception as err:  # the database is down: records stay, indexed at the next start
            log.error("indexing journal records failed (%s); they are indexed at the next start", type(err).__name__)
            self.journal, found = None, 0
        try:
            return found + recover_landed(self.indexer, self.settings.node.ae_title, self.prefix)
        except Exception as err:
            log.error("indexing landed instances failed (%s); retrying in the background", type(err).__name__)
            return found + recover_landed(self.indexer, self.settings.node.ae_title, self.prefix, synchronous=False)

    # -- association events

    def on_requested(self, event: Any) -> None:
        """Admit or reject an association (permanent for unknown peers, transient at limits)."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        node = self.settings.node
        peer = self.settings.peer(calling)
        if peer is None and not node.accept_unknown_peers:
            security_log.warning("association rejected: unknown calling AE %r from %s", calling, address)
            return self._reject(assoc, 0x01, 0x01, 0x03)
        if peer is not None and not address_allowed(address, peer.hosts):
            security_log.warning("association rejected: calling AE %r from address %s not allowed", calling, address)
            return self._reject(assoc, 0x01, 0x01, 0x03)
        if peer is None:
            security_log.info("association from unknown calling AE %r at %s accepted (accept_unknown_peers)", calling, address)
        column = self.settings.peers.index(peer) if peer is not None else len(self.settings.peers)
        peer_limit = (peer.max_associations if peer and peer.max_associations else node.max_associations_per_peer)
        refused = self.slots.acquire(self.row, column, peer_limit, node.max_associations)
        if refused:
            log.warning("association from %r refused: %s association limit reached", calling, refused)
            return self._reject(assoc, 0x02, 0x03, 0x02)  # transient, local limit exceeded
        with self._lock:
            self._assocs[id(assoc)] = _AssociationState(peer, column)
        metrics.ASSOCIATIONS.labels("accepted").inc()

    def _reject(self, assoc: Any, result: int, source: int, diagnostic: int) -> None:
        metrics.ASSOCIATIONS.labels("rejected").inc()
        if result == 0x01:  # permanent: a peer we do not know (limits are transient, not security)
            audit.security_alert(audit.NODE_AUTHENTICATION, user=str(assoc.requestor.primitive.calling_ae_title).strip(),
                                 address=str(assoc.requestor.address), outcome=audit.MINOR_FAILURE,
                                 detail="association rejected: calling AE title or address not allowed")
        assoc.acse.send_reject(result, source, diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_closed(self, event: Any) -> None:
        """Give back the association's slot."""
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
        if state is not None:
            self.slots.release(self.row, state.column)

    def _allowed(self, assoc: Any, action: str) -> bool:
        with self._lock:
            state = self._assocs.get(id(assoc))
        return state is not None and (state.peer is None or action in state.peer.allow)

    def open_associations(self) -> int:
        """Associations this process is serving now."""
        with self._lock:
            return len(self._assocs)

    # -- services

    def on_echo(self, event: Any) -> int:
        """C-ECHO: Success for peers allowed to echo."""
        return SUCCESS if self._allowed(event.assoc, "echo") else NOT_AUTHORIZED

    # C-STORE arrives on the fast path (node.acceptor): open_sink when the command is in, then
    # store when the data set is complete. on_store serves what pynetdicom hands over instead.

    def open_sink(self, assoc: Any, req: acceptor.StoreRequest) -> Any:
        """Where a C-STORE's data set goes while it arrives: a temp file, or a refusal."""
        if not self._allowed(assoc, "store"):
            return _Refusal(NOT_AUTHORIZED)
        if not (store.valid_uid(req.sop_class_uid) and store.valid_uid(req.sop_instance_uid)):
            return _Refusal(INVALID_UID, "invalid SOP Class or Instance UID",
                            "instance refused: invalid UID in the C-STORE request")
        context = assoc._accepted_cx.get(req.context_id)
        if context is None:
            return _Refusal(PROCESSING_FAILURE, "no such presentation context")
        try:
            self.space.check()
            meta = _file_meta(req.sop_class_uid, req.sop_instance_uid, str(context.transfer_syntax[0]),
                              assoc.requestor.ae_title)
            spill_at = self.journal.max_payload - len(meta) if self.journal is not None else 0
            sink = store.DataSetBuffer(self.root, self.prefix, meta, min(spill_at, _SPILL_AT))
        except store.OutOfSpace as err:
            return _Refusal(OUT_OF_RESOURCES, "out of storage space", f"instance refused (A700): {err}", error=True)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                return _Refusal(OUT_OF_RESOURCES, "out of storage space", "instance refused (A700): disk full", error=True)
            return _Refusal(PROCESSING_FAILURE, "internal error", f"instance failed: {type(err).__name__}", error=True)
        # What the index holds for this UID, looked up while the data set is still arriving.
        sink.known_sha = self._known_sha(req.sop_instance_uid)
        return sink

    def store(self, assoc: Any, req: acceptor.StoreRequest, context: Any) -> int | tuple[int, str]:
        """A complete C-STORE from the fast path: the answer (status, comment)."""
        sink = req.sink
        if isinstance(sink, _Refusal):
            return sink.answer()
        with metrics.STAGE_SECONDS.labels("store").time():
            return self._finish(assoc, req.sop_class_uid, req.sop_instance_uid, str(context.transfer_syntax[0]), sink)

    def on_store(self, event: Any) -> int | Dataset:
        """C-STORE through pynetdicom (the fast path declined it): same rules, same answers."""
        req = event.request
        sop_class, sop_instance = str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or "")
        fake = acceptor.StoreRequest()
        fake.sop_class_uid, fake.sop_instance_uid = sop_class, sop_instance
        fake.context_id = event.context.context_id
        sink = self.open_sink(event.assoc, fake)
        if isinstance(sink, _Refusal):
            status, comment = sink.answer()
            return _status(status, comment) if comment else status
        sink.write(req.DataSet.getvalue())
        with metrics.STAGE_SECONDS.labels("store").time():
            answer = self._finish(event.assoc, sop_class, sop_instance, str(event.context.transfer_syntax), sink)
        return _status(*answer) if isinstance(answer, tuple) else answer

    def _finish(self, assoc: Any, sop_class: str, sop_instance: str, transfer_syntax: str,
                sink: Any) -> int | tuple[int, str]:
        try:
            return self._land(assoc, sop_class, sop_instance, transfer_syntax, sink)
        except store.OutOfSpace as err:
            log.error("instance refused (A700): %s", err)
            return OUT_OF_RESOURCES, "out of storage space"
        except IndexBacklog as err:
            log.error("instance refused (A700): %s", err)
            return OUT_OF_RESOURCES, "index backlog"
        except Exception as err:  # never a traceback: database errors quote row values
            log.error("instance failed: %s", type(err).__name__)
            return PROCESSING_FAILURE, "internal error"
        finally:
            sink.discard()  # nothing left behind unless it was landed

    def _land(self, assoc: Any, sop_class: str, sop_instance: str, transfer_syntax: str,
              sink: Any) -> int | tuple[int, str]:
        """Check the data set, make it durable (journal record, or landed file), hand it to the
        Indexer. Returns the answer; raises OutOfSpace, IndexBacklog and unexpected errors."""
        name = instance_tag(sop_instance)
        if isinstance(sink, store.DataSetBuffer) and sink.file is not None:
            sink = sink.file  # spilled: a large instance goes the per-file way
        if sink.error is not None:
            raise sink.error
        in_memory = isinstance(sink, store.DataSetBuffer)
        data = sink.data() if in_memory else None
        try:
            if in_memory:
                header = read_header(memoryview(data), transfer_syntax)  # type: ignore[arg-type]
            else:
                with sink.data_set_view() as view:
                    header = read_header(view, transfer_syntax)
        except Unparseable as err:
            log.warning("instance %s refused (C000): %s", name, err)
            return CANNOT_UNDERSTAND, f"data set cannot be parsed: {err}"
        problem = _header_problem(header, sop_class, sop_instance)
        if problem:
            log.warning("instance %s refused: %s", name, problem[1])
            return problem
        sha = None
        existing = self._known_sha(sop_instance, sink.known_sha)
        if existing is not None:  # a duplicate (rare): only now is the content hash needed
            sha = sink.sha256
            if existing == sha:
                log.info("instance %s: identical duplicate, nothing changed", name)
                return SUCCESS
            if self.policy == "keep_first":
                log.warning("instance %s: duplicate with different content; first copy kept (policy keep_first)", name)
                return WARNING_DUPLICATE_DISCARDED, "duplicate SOP Instance UID with different content: first copy kept"
        # The reserve still holds with this file written (the journal's file comes next).
        self.space.check(sink.size if in_memory else 0)
        self.indexer.reserve()
        try:
            record = landed = None
            if in_memory:
                try:
                    record = self.journal.append(sink.meta, data, time.time_ns(), sink.digest)  # type: ignore[union-attr]
                except journal.JournalFull:  # the ring is busy: this one takes the per-file way
                    spilled = store.IncomingFile(self.root, self.prefix, sink.meta)
                    spilled.write(data)
                    if spilled.error is not None:
                        raise spilled.error
                    sink.file = sink = spilled
            if record is None:
                landed = sink.land(self.dirsync)
        except BaseException:
            self.indexer.unreserve()
            raise
        # Durable from here: the sender may be answered. The index row follows (Indexer).
        self.indexer.submit(Arrival(header, transfer_syntax, sink.size, len(sink.meta) if in_memory and record else sink.meta_len,
                                    str(assoc.requestor.ae_title).strip(), str(assoc.acceptor.ae_title).strip(),
                                    landed=landed, record=record, sha256=record.sha256 if record else sha))
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(sink.size)
        return SUCCESS

    def _known_sha(self, sop_instance: str, looked_up: Any = _UNKNOWN) -> str | None:
        """The content hash already answered for a UID: pending in this process, else indexed.

        ``looked_up`` is an earlier index lookup (made when the command arrived). A failed
        lookup (database down) counts as unknown: the Indexer applies the policy later.
        """
        pending = self.indexer.pending(sop_instance)
        if pending is not None:
            return pending.digest()
        if looked_up is not _UNKNOWN:
            return looked_up
        try:
            return self._lookup(sop_instance)
        except Exception as err:
            log.warning("index lookup failed (%s); duplicate policy applied at indexing", type(err).__name__)
            return None

    # -- the AE

    def build_ae(self) -> AE:
        """The pynetdicom AE with our contexts, timeouts and PDU size."""
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.require_called_aet = True
        # The real limits (total, per peer, across processes) are AssociationSlots'; pynetdicom's
        # own count includes bare TCP connections (port probes), so it only guards against floods.
        ae.maximum_associations = node.max_associations * 2 + 16
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.add_supported_context(Verification)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        if self.mpps_handlers:
            ae.add_supported_context(ModalityPerformedProcedureStep, TRANSFER_SYNTAXES[:4])
        if self.commitment_handlers:
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH, TRANSFER_SYNTAXES[:4], scu_role=False, scp_role=True)
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """Every event handler the listener binds."""
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            *[(event, self._only_if_allowed("mpps", handler)) for event, handler in self.mpps_handlers],
            *self.commitment_handlers,
        ]

    def _only_if_allowed(self, action: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a DIMSE-N handler so a peer without ``action`` in its allow list is refused."""

        def guarded(event: Any, *args: Any) -> Any:
            if not self._allowed(event.assoc, action):
                security_log.warning("%s refused: calling AE %r is not allowed it", action,
                                     event.assoc.requestor.ae_title)
                return NOT_AUTHORIZED, None
            return handler(event, *args)

        return guarded

    def start(self) -> ReusePortServer:
        """Bind the port (shared with the other receivers) and serve on a background thread."""
        node = self.settings.node
        ae = self.build_ae()
        server = ae.make_server((node.host, node.port), ae_title=node.ae_title,
                                ssl_context=tls_context(self.settings), evt_handlers=self.handlers(),
                                server_class=ReusePortServer,
                                **({"request_handler": acceptor.request_handler_class(self)} if acceptor.SUPPORTED else {}))
        ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        return server


class _ShaLookup:
    """The indexed content hash of a SOP Instance UID: one read per instance, while it arrives.

    SQLite: one connection of this process's own, kept open and shared under a lock (a query
    takes microseconds; checking a connection out of SQLAlchemy's pool and back took several
    times that). Other databases: plain DBAPI on a pooled connection (Core's statement
    handling costs several times the query itself).
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(engine.dialect.paramstyle)
        table = Instance.__table__.name
        self._sql = f"SELECT sha256 FROM {table} WHERE sop_instance_uid = {mark}" if mark else None
        self._core = select(Instance.sha256).where(Instance.sop_instance_uid == bindparam("uid"))
        database = engine.url.database
        self._sqlite_path = database if engine.dialect.name == "sqlite" and database not in (None, "", ":memory:") else None
        self._sqlite: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __call__(self, sop_instance: str) -> str | None:
        if self._sqlite_path is not None and self._sql is not None:
            return self._from_sqlite(sop_instance)
        if self._sql is None:
            with self._engine.connect() as conn:
                return conn.execute(self._core, {"uid": sop_instance}).scalar()
        raw = self._engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute(self._sql, (sop_instance,))
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            raw.close()
        return row[0] if row else None

    def _from_sqlite(self, sop_instance: str) -> str | None:
        with self._lock:
            if self._sqlite is None:
                # Autocommit reads: each query is its own read transaction, so this connection
                # never holds back the WAL checkpoints of the writers.
                self._sqlite = sqlite3.connect(self._sqlite_path, timeout=30, check_same_thread=False,
                                               isolation_level=None)
            try:
                row = self._sqlite.execute(self._sql, (sop_instance,)).fetchone()  # type: ignore[arg-type]
            except sqlite3.Error:
                self._sqlite.close()  # open a fresh one next time
                self._sqlite = None
                raise
        return row[0] if row else None


class _Refusal:
    """The sink of a C-STORE refused before its data set arrived: counts bytes, keeps none."""

    def __init__(self, status: int, comment: str = "", message: str = "", error: bool = False):
        self.status, self.comment, self.message, self.error = status, comment, message, error

    def write(self, data: Any) -> None:  # noqa: D102
        pass

    def discard(self) -> None:  # noqa: D102
        pass

    def answer(self) -> int | tuple[int, str]:
        """The status to send (and log why)."""
        if self.message:
            (log.error if self.error else log.warning)("%s", self.message)
        return (self.status, self.comment) if self.comment else self.status


def _header_problem(ds: Dataset, sop_class: str, sop_instance: str) -> tuple[int, str] | None:
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


def _meta_element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1), explicit VR little endian.

    Encoded directly (pydicom takes about a millisecond for this); byte-identical to
    ``pydicom.filewriter.write_file_meta_info`` (a test holds it to that).
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01", b"\x00"),
        _meta_element(0x0002, b"UI", sop_class.encode("ascii"), b"\x00"),
        _meta_element(0x0003, b"UI", sop_instance.encode("ascii"), b"\x00"),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00"),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"), b" "),
        _meta_element(0x0016, b"AE", str(calling_ae).strip().encode("ascii", "replace"), b" "),
    ))
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body)), b"") + body


def _file_meta_pydicom(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """The same, through pydicom (the reference for tests)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = str(calling_ae).strip()
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
