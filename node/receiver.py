"""The receiver: a pynetdicom AE answering C-ECHO and C-STORE under the association policy.

One receiver runs per process (``node.service`` starts several sharing the port). A C-STORE is
answered Success only after the instance file is durable (``node.store``) and its index row is
committed (``node.index``); commits are grouped across the process's associations so concurrent
senders share one database transaction, never weakening that rule. Logs carry no patient data:
instances are named by a short hash of their SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import queue
import socket
import ssl
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom import uid as dcm_uid
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node import audit, metrics, store
from node.index import Instance, Patient, Series, Study, utcnow
from node.settings import Peer, Settings

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
          pixel_at: list[int] | None = None) -> int:
    """Walk element headers from ``pos``; return where the walk stopped.

    Checks that every declared length fits in the buffer, so a truncated data set is caught
    without reading any value. ``stop_at`` is an item/sequence delimiter tag that ends the walk;
    ``pixel_at`` receives the offset of the top-level Pixel Data element.
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


def read_header(encoded: memoryview, transfer_syntax: str) -> Dataset:
    """Check the encoded data set is complete and parse only the fields the index needs."""
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
        _walk(encoded, 0, len(encoded), implicit, little, stop_at=None, pixel_at=pixel_at)
        # Copy only the header into the parser, never the pixel data.
        fp = io.BytesIO(encoded[:pixel_at[0]] if pixel_at else encoded)
        return read_dataset(fp, implicit, little, stop_when=_before_pixels, specific_tags=HEADER_TAGS)
    except Unparseable:
        raise
    except Exception as err:  # pydicom raises many kinds on garbage
        raise Unparseable(f"{type(err).__name__}") from None


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
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
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

    header: Dataset
    transfer_syntax: str
    stored: store.StoredFile
    calling_ae: str
    called_ae: str
    outcome: str = ""  # new | same | kept_first | replaced
    old_relpath: str = ""
    kept_relpath: str = ""


def _get_or_create(session: Session, model: Any, where: Any, make: Callable[[], Any]) -> Any:
    obj = session.scalar(select(model).where(where))
    if obj is not None:
        return obj
    if session.get_bind().dialect.name == "sqlite":
        # SQLite writers are serialised by BEGIN IMMEDIATE: nobody can insert it meanwhile.
        obj = make()
        session.add(obj)
        session.flush()
        return obj
    try:
        with session.begin_nested():
            obj = make()
            session.add(obj)
            session.flush()
        return obj
    except IntegrityError:
        # Another receiver process created it a moment ago.
        return session.scalar(select(model).where(where))


def index_arrival(session: Session, arrival: Arrival, policy: str) -> None:
    """Record one arrival in the index (in the caller's transaction); sets ``arrival.outcome``."""
    ds, stored = arrival.header, arrival.stored
    existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
    now = utcnow()
    if existing is not None:
        if existing.sha256 == stored.sha256:
            arrival.outcome = "same"
        elif policy == "keep_first":
            arrival.outcome = "kept_first"
            arrival.kept_relpath = existing.path
        else:
            arrival.outcome = "replaced"
            arrival.old_relpath = existing.path
            existing.path, existing.size_bytes, existing.sha256 = stored.relpath, stored.size_bytes, stored.sha256
            existing.transfer_syntax_uid = arrival.transfer_syntax
            existing.received_at, existing.calling_ae = now, arrival.calling_ae
        return
    patient_id, issuer = _text(ds, "PatientID", 64), _text(ds, "IssuerOfPatientID", 64)
    patient = _get_or_create(
        session, Patient, (Patient.patient_id == patient_id) & (Patient.issuer == issuer),
        lambda: Patient(patient_id=patient_id, issuer=issuer, name=_text(ds, "PatientName", 324),
                        birth_date=_text(ds, "PatientBirthDate", 8), sex=_text(ds, "PatientSex", 16)))
    study = _get_or_create(
        session, Study, Study.study_uid == ds.StudyInstanceUID,
        lambda: Study(study_uid=ds.StudyInstanceUID, patient_pk=patient.id,
                      accession_number=_text(ds, "AccessionNumber", 64),
                      study_date=_text(ds, "StudyDate", 8), study_time=_text(ds, "StudyTime", 16),
                      description=_text(ds, "StudyDescription", 64),
                      referring_physician=_text(ds, "ReferringPhysicianName", 324),
                      study_id=_text(ds, "StudyID", 16), patient_age=_text(ds, "PatientAge", 4),
                      calling_ae=arrival.calling_ae, called_ae=arrival.called_ae,
                      instance_count=0, first_received_at=now, last_received_at=now))
    series = _get_or_create(
        session, Series, Series.series_uid == ds.SeriesInstanceUID,
        lambda: Series(series_uid=ds.SeriesInstanceUID, study_pk=study.id,
                       modality=_text(ds, "Modality", 16), series_number=_int(ds, "SeriesNumber"),
                       description=_text(ds, "SeriesDescription", 64),
                       body_part=_text(ds, "BodyPartExamined", 16),
                       station_name=_text(ds, "StationName", 16),
                       manufacturer=_text(ds, "Manufacturer", 64),
                       slice_thickness=_float(ds, "SliceThickness"),
                       frame_of_reference_uid=_text(ds, "FrameOfReferenceUID", 64),
                       instance_count=0, first_received_at=now, last_received_at=now))
    session.add(Instance(
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_pk=series.id,
        transfer_syntax_uid=arrival.transfer_syntax, path=stored.relpath,
        size_bytes=stored.size_bytes, sha256=stored.sha256,
        instance_number=_int(ds, "InstanceNumber"), number_of_frames=_int(ds, "NumberOfFrames") or 1,
        calling_ae=arrival.calling_ae, received_at=now))
    # Counters and times move with the row in the same transaction: the assembler's quiet timers
    # read last_received_at.
    study.instance_count = (study.instance_count or 0) + 1
    series.instance_count = (series.instance_count or 0) + 1
    study.last_received_at = series.last_received_at = now
    arrival.outcome = "new"


def _begin_write(session: Session) -> None:
    if session.get_bind().dialect.name == "sqlite":
        # Take the write lock up front so concurrent receivers never race on get-or-create.
        session.execute(text("BEGIN IMMEDIATE"))


class GroupCommitter:
    """Commits the index rows of every instance waiting in this process in one transaction.

    Each store handler hands over its Arrival and blocks until the transaction holding it has
    committed (or failed). Under load many arrivals share one commit (one fsync of the WAL);
    alone, an arrival is committed at once. Durability is unchanged: nobody is answered before
    the commit that holds their row.
    """

    def __init__(self, engine: Engine, policy: str, max_batch: int = 64):
        self._sessions = sessionmaker(bind=engine, expire_on_commit=False)
        self._policy = policy
        self._max_batch = max_batch
        self._queue: queue.Queue[tuple[Arrival, threading.Event, list[BaseException]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="index-committer", daemon=True)
        self._thread.start()

    def commit(self, arrival: Arrival) -> None:
        """Index ``arrival`` durably; raises what the database raised."""
        done, errors = threading.Event(), []
        self._queue.put((arrival, done, errors))
        done.wait()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Finish queued work and stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                self._commit_batch([a for a, _, _ in batch])
            except Exception:
                # One bad arrival must not fail the others: retry them one by one.
                for arrival, _, errors in batch:
                    try:
                        self._commit_batch([arrival])
                    except Exception as err:  # handed to the waiting handler
                        errors.append(err)
            for _, done, _ in batch:
                done.set()

    def _commit_batch(self, arrivals: list[Arrival]) -> None:
        for attempt in range(5):
            session = self._sessions()
            try:
                _begin_write(session)
                for arrival in arrivals:
                    index_arrival(session, arrival, self._policy)
                session.commit()
                return
            except OperationalError:
                session.rollback()
                if attempt == 4:
                    raise
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()


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
        self.committer = GroupCommitter(self.engine, self.settings.node.duplicate_policy)
        self._assocs: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()

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

    def on_store(self, event: Any) -> int | Dataset:
        """C-STORE: durable write + index commit, then Success; otherwise a precise failure."""
        if not self._allowed(event.assoc, "store"):
            return NOT_AUTHORIZED
        try:
            return self._store(event)
        except store.OutOfSpace as err:
            log.error("instance refused (A700): %s", err)
            return _status(OUT_OF_RESOURCES, "out of storage space")
        except Exception as err:  # never a traceback: database errors quote row values
            log.error("instance failed: %s", type(err).__name__)
            return _status(PROCESSING_FAILURE, "internal error")

    def _store(self, event: Any) -> int | Dataset:
        with metrics.STAGE_SECONDS.labels("store").time():
            return self._store_timed(event)

    def _store_timed(self, event: Any) -> int | Dataset:
        req = event.request
        sop_class, sop_instance = str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or "")
        if not (store.valid_uid(sop_class) and store.valid_uid(sop_instance)):
            log.warning("instance refused: invalid UID in the C-STORE request")
            return _status(INVALID_UID, "invalid SOP Class or Instance UID")
        name = instance_tag(sop_instance)
        transfer_syntax = str(event.context.transfer_syntax)
        buffer = req.DataSet.getbuffer()
        try:
            try:
                header = read_header(buffer, transfer_syntax)
            except Unparseable as err:
                log.warning("instance %s refused (C000): %s", name, err)
                return _status(CANNOT_UNDERSTAND, f"data set cannot be parsed: {err}")
            problem = _header_problem(header, sop_class, sop_instance)
            if problem:
                log.warning("instance %s refused: %s", name, problem[1])
                return _status(*problem)
            digest = hashlib.sha256(buffer).hexdigest()
            relpath = store.instance_relpath(header.StudyInstanceUID, header.SeriesInstanceUID, sop_instance, digest)
            # The path is a function of the content: a file already there is this very instance
            # (an identical duplicate, or a retry after a crash); the index decides which.
            if store.is_stored(self.root, relpath):
                size = (self.root / relpath).stat().st_size
            else:
                meta = _file_meta(sop_class, sop_instance, transfer_syntax, event.assoc.requestor.ae_title)
                store.ensure_space(self.root, self.reserve, len(meta) + len(buffer))
                size = store.write_durable(self.root, relpath, (meta, buffer))
        finally:
            buffer.release()
        arrival = Arrival(header, transfer_syntax, store.StoredFile(relpath, size, digest),
                          str(event.assoc.requestor.ae_title).strip(), str(event.assoc.acceptor.ae_title).strip())
        try:
            self.committer.commit(arrival)
        except BaseException:
            # Keep the file: a row of an earlier identical copy may point at it. An unreferenced
            # file is harmless; the sender was not answered Success and will retry.
            raise
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(size)
        return self._answer(arrival, name)

    def _answer(self, arrival: Arrival, name: str) -> int | Dataset:
        if arrival.outcome == "kept_first":
            if arrival.stored.relpath != arrival.kept_relpath:
                store.remove_file(self.root, arrival.stored.relpath)
            log.warning("instance %s: duplicate with different content; first copy kept (policy keep_first)", name)
            return _status(WARNING_DUPLICATE_DISCARDED, "duplicate SOP Instance UID with different content: first copy kept")
        if arrival.outcome == "replaced":
            # The new copy is durable and indexed: only now may the old one go.
            if arrival.old_relpath != arrival.stored.relpath:
                store.remove_file(self.root, arrival.old_relpath)
            log.warning("instance %s: duplicate with different content replaced the stored copy (policy replace)", name)
        elif arrival.outcome == "same":
            log.info("instance %s: identical duplicate, nothing changed", name)
        return SUCCESS

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
                                server_class=ReusePortServer)
        ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        return server


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


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
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
