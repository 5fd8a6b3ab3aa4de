"""The receiver: a pynetdicom AE answering C-ECHO and C-STORE under the association policy.

One receiver runs per process (``node.service`` starts several sharing the port). A C-STORE is
answered Success only once the instance is durable: its data set, written to disk while it
arrived, is flushed and *landed* (``node.ingest.store``) or appended to the process's journal
(``node.ingest.journal``). The index row follows within milliseconds: the process's ``Indexer``
(``node.ingest.indexer``) places landed files at their final paths and commits their rows in
batches, and whatever a crash left landed is indexed when the node (or the receiver) starts
again (``node.ingest.recovery``). Nothing answered Success is lost to kill -9 or a power cut;
the index is at most one batch behind the answers. Associations are admitted under
``node.ingest.policy`` and served by ``node.ingest.acceptor`` (pynetdicom with event-driven
reactors and a direct C-STORE path); data sets are checked by ``node.ingest.wire``. Logs carry
no patient data: instances are named by a short hash of their SOP Instance UID.
"""

from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext, build_context
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, bindparam, select

from node.core import audit, metrics
from node.core.dicom import (
    CANNOT_UNDERSTAND,
    INVALID_UID,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    STORAGE_COMMITMENT_PUSH,
    SUCCESS,
    WARNING_ELEMENTS_DISCARDED,
)
from node.core.errors import describe_error
from node.core.settings import Peer, Settings
from node.index import Instance
from node.ingest import acceptor, journal, store
from node.ingest.arrival import Arrival, header_problem, instance_tag
from node.ingest.index_values import NotIndexable, index_values
from node.ingest.index_writer import re_send_corrections
from node.ingest.indexer import IndexBacklog, Indexer
from node.ingest.policy import (
    AssociationSlots,
    PendingConnections,
    ReportThrottle,
    address_allowed,
    listed_networks,
    tls_context,
)
from node.ingest.recovery import recover_journal, recover_landed
from node.ingest.volume_stream import VolumeStreamer
from node.ingest.wire import TooLarge, Unparseable, file_meta, read_header

log = logging.getLogger("ainode.receiver")
security_log = logging.getLogger("ainode.security")

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
# Every storage SOP class of the standard that pynetdicom knows (its full storage list, not the
# 120 classes of StoragePresentationContexts that fit one requestor's 128 contexts): an
# acceptor may support any number. docs/conformance.md lists them (tests/receiver/test_sop_classes.py).
STORAGE_SOP_CLASSES = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
# The standard gives the storage SOP classes of composite IODs UIDs under this root (PS3.6 Annex
# A); ``node.unknown_storage_classes: standard`` accepts the ones newer than pynetdicom's list.
STANDARD_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
_UNKNOWN: Any = object()  # no index lookup was made yet
_SPILL_AT = 16 * 1024 * 1024  # larger data sets are received straight into a file
_JOURNAL_RETRY_S = 30.0  # how often an unusable journal is tried again (on the next C-STORE)


@dataclass
class _AssociationState:
    peer: Peer | None
    column: int


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT, so several processes share the port.

    ``admit`` (the receiver's) decides in the accept loop whether a new connection may wait to
    associate; one it refuses is closed before any thread is started for it.
    """

    admit: Callable[[Any], bool] | None = None

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
        # No read blocks forever: until the A-ASSOCIATE-RQ is in, the ARTIM time (the acceptor's
        # ACSE timeout; node.ingest.acceptor narrows it to what is left of it for each read).
        client.settimeout(self.ae.acse_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:  # noqa: D102 - socketserver hook
        return self.admit is None or self.admit(client_address)


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
    # The UPS Task Manager (node.workflow.scp, handed over by node.service): its SOP classes and
    # handlers. N-CREATE and N-SET are shared with MPPS: each goes by its presentation context.
    ups_sop_classes: tuple[str, ...] = ()
    ups_handlers: list[tuple[Any, Callable[..., Any]]] = field(default_factory=list)
    # Called when a study may have just become complete (the indexer committed what an ended
    # association left): the node wakes its assembler with it. None: nobody to tell.
    study_may_be_complete: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.settings.storage.path)
        self.reserve = int(self.settings.storage.min_free_bytes)
        self.space = store.SpaceGuard(self.root, self.reserve)
        self.prefix = f"r{self.row}-"  # this process's temp and landed files
        self.policy = self.settings.node.duplicate_policy
        # Pixel data decoded once, after the answer, into per-series volumes (node.core.volumes).
        self.volume_streamer = VolumeStreamer(self.reserve) if self.settings.storage.stream_volumes else None
        self.indexer = Indexer(
            self.engine,
            self.root,
            self.policy,
            prefix=self.prefix,
            on_indexed=self.volume_streamer.submit if self.volume_streamer else None,
            study_may_be_complete=self.study_may_be_complete,
        )
        self._lookup = _ShaLookup(self.engine)
        self.journal: journal.Journal | None = None
        self.journal_path = self.root / journal.FOLDER / f"{self.prefix}journal.wal"
        self.journal_problem = "not opened yet"
        self._journal_tried = float("-inf")
        self._journal_lock = threading.Lock()
        self.dirsync = store.DirSync()
        self._assocs: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        node = self.settings.node
        # ARTIM closes every pending connection; one older than twice that lost its end event.
        self.pending = PendingConnections(
            node.max_pending_per_address,
            node.max_pending_connections,
            listed_networks(self.settings.peers),
            expire_s=2 * node.artim_timeout_s + 5,
        )
        self._refusals = ReportThrottle()

    def recover(self) -> int:
        """Open this process's journal and index what a predecessor answered but did not index
        (normally nothing: the node indexes everything at start, before receivers run)."""
        store.prepare_root(self.root, self.prefix)
        found = self._open_journal()
        try:
            return found + recover_landed(self.indexer, self.settings.node.ae_title, self.prefix)
        except Exception as err:
            log.error("indexing landed instances failed (%s); retrying in the background", describe_error(err))
            return found + recover_landed(self.indexer, self.settings.node.ae_title, self.prefix, synchronous=False)

    def _open_journal(self) -> int:
        """Open the journal and index the records it holds; how many it held.

        The journal is never left off quietly: when it cannot be preallocated within the free
        space less the reserve, or cannot be opened, this is logged as an error and shown to the
        operator (``node.ingest.quarantine.alerts``), and C-STOREs are refused with A700 until a
        later try succeeds. Records waiting for a database that does not answer stay in the
        journal and are indexed in the background as soon as it does.
        """
        path, called = self.journal_path, self.settings.node.ae_title
        self._journal_tried = time.monotonic()
        try:
            problem = journal.room_to_create(path, journal.DEFAULT_SIZE, store.free_bytes(self.root), self.reserve)
            if problem is None:
                jrnl, found, left = recover_journal(self.indexer, called, path)
        except OSError as err:
            problem = f"cannot be opened: {err.strerror or type(err).__name__}"
        except store.OutOfSpace as err:  # no room to quarantine a record it holds
            problem = f"its records cannot be recovered: {err}"
        if problem is not None:
            if problem != self.journal_problem:
                log.error("journal %s unavailable, instances are refused (A700) until it is: %s", path.name, problem)
                journal.mark_unavailable(path, problem)
            self.journal_problem = problem
            return 0
        for arrival in left:
            self.indexer.reserve(timeout=3600)
            self.indexer.submit(arrival)
        if left:
            log.error(
                "%d instance(s) in journal %s wait for the database; indexed as soon as it answers",
                len(left),
                path.name,
            )
        journal.mark_available(path)
        self.journal, self.journal_problem = jrnl, ""
        return found

    def _journal_ready(self) -> bool:
        """The journal is open (trying again now and then when it could not be used)."""
        if self.journal is not None:
            return True
        with self._journal_lock:
            if self.journal is None and time.monotonic() - self._journal_tried >= _JOURNAL_RETRY_S:
                try:
                    self._open_journal()
                except Exception as err:  # the database is down while indexing its records
                    log.error("journal %s not reopened: %s", self.journal_path.name, type(err).__name__)
        return self.journal is not None

    # -- connections and association events

    def admit_connection(self, client_address: Any) -> bool:
        """A new connection (in the accept loop): pending until it associates, or refused and
        closed at once when its address, or strangers in total, are at their pending limit."""
        address, port = str(client_address[0]), int(client_address[1])
        refused = self.pending.admit(address, port)
        if refused is None:
            return True
        node = self.settings.node
        if refused == "address":
            metrics.PENDING_CLOSED.labels("address_limit").inc()
            why = f"per-address limit ({node.max_pending_per_address}) reached"
        else:
            metrics.PENDING_CLOSED.labels("total_limit").inc()
            why = f"pending connection limit ({node.max_pending_connections}) reached"
        held = self._refusals.due((address, refused))
        if held is not None:  # the first in a while from this address, for this reason
            more = f" ({held} more since the last report)" if held else ""
            security_log.warning("pending connection from %s refused: %s%s", address, why, more)
            audit.security_alert(
                audit.NODE_AUTHENTICATION,
                user=address,
                address=address,
                outcome=audit.MINOR_FAILURE,
                detail=f"connection closed before association: {why}{more}",
            )
        return False

    def _settle(self, assoc: Any) -> None:
        info = assoc.requestor.address_info
        if info is not None:
            self.pending.settle(str(info.address), int(info.port))

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
            security_log.info(
                "association from unknown calling AE %r at %s accepted (accept_unknown_peers)", calling, address
            )
        column = self.settings.peers.index(peer) if peer is not None else len(self.settings.peers)
        peer_limit = peer.max_associations if peer and peer.max_associations else node.max_associations_per_peer
        refused = self.slots.acquire(self.row, column, peer_limit, node.max_associations)
        if refused:
            log.warning("association from %r refused: %s association limit reached", calling, refused)
            return self._reject(assoc, 0x02, 0x03, 0x02)  # transient, local limit exceeded
        with self._lock:
            self._assocs[id(assoc)] = _AssociationState(peer, column)
        self._settle(assoc)  # an association now: its slot counts it, no longer pending
        metrics.ASSOCIATIONS.labels("accepted").inc()
        self._offer_unknown_storage(assoc)

    def _offer_unknown_storage(self, assoc: Any) -> None:
        """Support the requested standard storage classes newer than pynetdicom's list (policy).

        Only on the fast path: pynetdicom's own C-STORE service knows no class beyond its list.
        """
        if self.settings.node.unknown_storage_classes != "standard" or not acceptor.SUPPORTED:
            return
        supported: list[PresentationContext] = assoc.acceptor.supported_contexts
        known = {str(cx.abstract_syntax) for cx in supported}
        extra = sorted(
            {
                uid
                for uid in (str(cx.abstract_syntax) for cx in assoc.requestor.requested_contexts)
                if uid not in known and uid.startswith(STANDARD_STORAGE_ROOT) and store.valid_uid(uid)
            }
        )
        if extra:
            log.info("storage SOP classes beyond the known list offered (unknown_storage_classes): %s", extra)
            assoc.acceptor.supported_contexts = supported + [build_context(uid, TRANSFER_SYNTAXES) for uid in extra]

    def _reject(self, assoc: Any, result: int, source: int, diagnostic: int) -> None:
        metrics.ASSOCIATIONS.labels("rejected").inc()
        if result == 0x01:  # permanent: a peer we do not know (limits are transient, not security)
            audit.security_alert(
                audit.NODE_AUTHENTICATION,
                user=str(assoc.requestor.primitive.calling_ae_title).strip(),
                address=str(assoc.requestor.address),
                outcome=audit.MINOR_FAILURE,
                detail="association rejected: calling AE title or address not allowed",
            )
        assoc.acse.send_reject(result, source, diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_closed(self, event: Any) -> None:
        """Give back the association's slot, or the connection's pending place."""
        self._settle(event.assoc)
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
        if state is not None:
            self.slots.release(self.row, state.column)
            self.indexer.no_more_coming()

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

    # C-STORE arrives on the fast path (node.ingest.acceptor): open_sink when the command is in, then
    # store when the data set is complete. on_store serves what pynetdicom hands over instead.

    def open_sink(self, assoc: Any, req: acceptor.StoreRequest) -> Any:
        """Where a C-STORE's data set goes while it arrives: a temp file, or a refusal."""
        if not self._allowed(assoc, "store"):
            return _Refusal(NOT_AUTHORIZED)
        if not (store.valid_uid(req.sop_class_uid) and store.valid_uid(req.sop_instance_uid)):
            return _Refusal(
                INVALID_UID, "invalid SOP Class or Instance UID", "instance refused: invalid UID in the C-STORE request"
            )
        context = acceptor.accepted_context(assoc, req.context_id)
        if context is None:
            return _Refusal(PROCESSING_FAILURE, "no such presentation context")
        if req.sop_class_uid != str(context.abstract_syntax):
            # A C-STORE on a presentation context is for the context's abstract syntax (PS3.7,
            # PS3.8 7.1.1.13); a SOP Class the association never negotiated is refused with the
            # general status 0122 (Refused: SOP Class not supported). A data set that differs
            # from its command is A900 (header_problem).
            return _Refusal(
                SOP_CLASS_NOT_SUPPORTED,
                "SOP Class differs from the presentation context",
                "instance refused (0122): SOP Class UID differs from the presentation context's abstract syntax",
            )
        return self._open_buffer(
            req.sop_class_uid, req.sop_instance_uid, str(context.transfer_syntax[0]), assoc.requestor.ae_title
        )

    def _open_buffer(self, sop_class: str, sop_instance: str, transfer_syntax: str, sender_ae: str) -> Any:
        """A buffer for one data set (journal and space checked), or a refusal."""
        if not self._journal_ready():
            return _Refusal(
                OUT_OF_RESOURCES,
                "journal unavailable: see the node's alerts",
                f"instance refused (A700): journal {self.journal_path.name} unavailable ({self.journal_problem})",
                error=True,
            )
        try:
            self.space.check()
            meta = file_meta(sop_class, sop_instance, transfer_syntax, sender_ae)
            spill_at = self.journal.max_payload - len(meta)  # type: ignore[union-attr]
            sink = store.DataSetBuffer(self.root, self.prefix, meta, min(spill_at, _SPILL_AT))
        except store.OutOfSpace as err:
            return _Refusal(OUT_OF_RESOURCES, "out of storage space", f"instance refused (A700): {err}", error=True)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                return _Refusal(
                    OUT_OF_RESOURCES, "out of storage space", "instance refused (A700): disk full", error=True
                )
            return _Refusal(PROCESSING_FAILURE, "internal error", f"instance failed: {type(err).__name__}", error=True)
        # What the index holds for this UID, looked up while the data set is still arriving.
        sink.known_sha = self._known_sha(sop_instance)
        return sink

    def store_retrieved(
        self, source_ae: str, sop_class: str, sop_instance: str, transfer_syntax: str, data_set: bytes
    ) -> int | tuple[int, str]:
        """An instance the node retrieved itself (a C-GET sub-operation, a WADO-RS part): the same
        checks, durability and index row as a C-STORE, ``source_ae`` recorded as its sender.
        Returns the answer a C-STORE would get (status, or status and comment)."""
        if not (store.valid_uid(sop_class) and store.valid_uid(sop_instance)):
            return INVALID_UID, "invalid SOP Class or Instance UID"
        sink = self._open_buffer(sop_class, sop_instance, transfer_syntax, source_ae)
        if isinstance(sink, _Refusal):
            return sink.answer()
        sink.write(data_set)
        parties = _Parties(_Party(source_ae), _Party(self.settings.node.ae_title))
        with metrics.STAGE_SECONDS.labels("store").time():
            return self._finish(parties, sop_class, sop_instance, transfer_syntax, sink)

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

    def _finish(
        self, assoc: Any, sop_class: str, sop_instance: str, transfer_syntax: str, sink: Any
    ) -> int | tuple[int, str]:
        try:
            return self._land(assoc, sop_class, sop_instance, transfer_syntax, sink)
        except store.OutOfSpace as err:
            log.error("instance refused (A700): %s", err)
            return OUT_OF_RESOURCES, "out of storage space"
        except IndexBacklog as err:
            log.error("instance refused (A700): %s", err)
            return OUT_OF_RESOURCES, "index backlog"
        except Exception as err:  # never a traceback: database errors quote row values
            log.error("instance failed: %s", describe_error(err))
            return PROCESSING_FAILURE, "internal error"
        finally:
            sink.discard()  # nothing left behind unless it was landed

    def _land(
        self, assoc: Any, sop_class: str, sop_instance: str, transfer_syntax: str, sink: Any
    ) -> int | tuple[int, str]:
        """Check the data set, make it durable (journal record, or landed file), hand it to the
        Indexer. Returns the answer; raises OutOfSpace, IndexBacklog and unexpected errors."""
        name = instance_tag(sop_instance)
        if isinstance(sink, store.DataSetBuffer) and sink.file is not None:
            sink = sink.file  # spilled: a large instance goes the per-file way
        if sink.error is not None:
            raise sink.error
        limit = int(self.settings.node.max_instance_bytes)
        if sink.data_len > limit:
            log.warning("instance %s refused (A700): data set of %d bytes, over %d", name, sink.data_len, limit)
            return OUT_OF_RESOURCES, "data set larger than the node's maximum instance size"
        in_memory = isinstance(sink, store.DataSetBuffer)
        data = sink.data() if in_memory else None
        try:
            scratch = self._scratch
            if in_memory:
                header = read_header(memoryview(data), transfer_syntax, limit, scratch)  # type: ignore[arg-type]
            else:
                with sink.data_set_view() as view:
                    header = read_header(view, transfer_syntax, limit, scratch)
        except Unparseable as err:
            log.warning("instance %s refused (C000): %s", name, err)
            return CANNOT_UNDERSTAND, f"data set cannot be parsed: {err}"
        except TooLarge as err:
            # PS3.4 B.2.3: A700 Refused, Out of Resources. The encoding may well be valid
            # (C000 would say it is not): it is larger than this node takes. Nothing is written.
            log.warning("instance %s refused (A700): %s", name, err)
            return OUT_OF_RESOURCES, "data set larger than the node's maximum instance size"
        problem = header_problem(header, sop_class, sop_instance)
        if problem:
            log.warning("instance %s refused: %s", name, problem[1])
            return problem
        try:  # what the index will hold, fitted to its columns now: never Success and unindexed
            values = index_values(header)
        except NotIndexable as err:
            log.warning("instance %s refused (C000): %s", name, err)
            return CANNOT_UNDERSTAND, f"values cannot be indexed: {err}"
        sha = None
        existing = self._known_sha(sop_instance, sink.known_sha)
        if existing is not None:  # a duplicate (rare): only now is the content hash needed
            sha = sink.sha256
            if existing == sha:
                log.info("instance %s: identical duplicate, nothing changed", name)
                return SUCCESS
            if self.policy == "keep_first" and not self._corrects(header):
                log.warning("instance %s: duplicate with different content; first copy kept (policy keep_first)", name)
                return WARNING_ELEMENTS_DISCARDED, "duplicate SOP Instance UID with different content: first copy kept"
        # The reserve still holds with this file written and every journal record still to be
        # placed at its final path (each one a file the size of its record).
        self.space.check((sink.size if in_memory else 0) + self.journal.live_bytes())  # type: ignore[union-attr]
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
        self.indexer.submit(
            Arrival(
                header,
                transfer_syntax,
                sink.size,
                len(sink.meta) if in_memory and record else sink.meta_len,
                str(assoc.requestor.ae_title).strip(),
                str(assoc.acceptor.ae_title).strip(),
                landed=landed,
                record=record,
                sha256=record.sha256 if record else sha,
                values=values,
            )
        )
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(sink.size)
        return SUCCESS

    def _corrects(self, header: Any) -> bool:
        """Whether a re-send with other content corrects the patient's or the order's identification
        (then it is stored and the Indexer replaces the copy; see index_writer.corrected_attributes).
        Unknown (database down) counts as a correction: the Indexer decides with the index."""
        try:
            with self.engine.connect() as conn:
                return bool(re_send_corrections(conn, header, self.root)[1])
        except Exception as err:  # noqa: BLE001 - the Indexer applies the policy with the index
            log.warning("index lookup failed (%s); duplicate policy applied at indexing", describe_error(err))
            return True

    def _scratch(self) -> BinaryIO:
        """An unnamed temporary file for a large inflated data set (gone when closed)."""
        return tempfile.TemporaryFile(dir=self.root / store.INCOMING, prefix=self.prefix)

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
            log.warning("index lookup failed (%s); duplicate policy applied at indexing", describe_error(err))
            return None

    # -- the AE

    def build_ae(self) -> AE:
        """The pynetdicom AE with our contexts, timeouts and PDU size."""
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.require_called_aet = True
        # The real limits are AssociationSlots' (total, per peer, across processes) and the
        # pending connections' (PendingConnections). pynetdicom counts every connection's thread,
        # pending and ending ones included: set above what those limits let through, so that it
        # never refuses a peer because strangers wait.
        ae.maximum_associations = node.max_associations + node.max_pending_connections + 64
        # An acceptor's ACSE timeout is its ARTIM timer: the wait for the A-ASSOCIATE-RQ, from
        # accept (node.ingest.acceptor), and for the peer to close after a reject.
        ae.acse_timeout = node.artim_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        if self.mpps_handlers:
            ae.add_supported_context(ModalityPerformedProcedureStep, TRANSFER_SYNTAXES[:4])
        for sop_class in self.ups_sop_classes if self.ups_handlers else ():
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES[:4])
        if self.commitment_handlers:
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH, TRANSFER_SYNTAXES[:4], scu_role=False, scp_role=True)
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """Every event handler the listener binds."""
        # pynetdicom binds one handler per DIMSE event: MPPS and UPS share N-CREATE and N-SET.
        routes: dict[Any, list[tuple[tuple[str, ...], Callable[..., Any]]]] = {}
        mpps_classes = (str(ModalityPerformedProcedureStep),)
        for event, handler in self.mpps_handlers:
            routes.setdefault(event, []).append((mpps_classes, self._only_if_allowed("mpps", handler)))
        for event, handler in self.ups_handlers:
            guard = self._find_only_if_allowed if event is evt.EVT_C_FIND else self._only_if_allowed
            routes.setdefault(event, []).append((self.ups_sop_classes, guard("ups", handler)))
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            *[(event, _by_sop_class(choices)) for event, choices in routes.items()],
            *self.commitment_handlers,
        ]

    def _find_only_if_allowed(self, action: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``_only_if_allowed`` for a C-FIND handler (a generator of answers)."""

        def guarded(event: Any, *args: Any) -> Any:
            if not self._allowed(event.assoc, action):
                security_log.warning(
                    "%s refused: calling AE %r is not allowed it", action, event.assoc.requestor.ae_title
                )
                yield NOT_AUTHORIZED, None
                return
            yield from handler(event, *args)

        return guarded

    def _only_if_allowed(self, action: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a DIMSE-N handler so a peer without ``action`` in its allow list is refused."""

        def guarded(event: Any, *args: Any) -> Any:
            if not self._allowed(event.assoc, action):
                security_log.warning(
                    "%s refused: calling AE %r is not allowed it", action, event.assoc.requestor.ae_title
                )
                return NOT_AUTHORIZED, None
            return handler(event, *args)

        return guarded

    def start(self) -> ReusePortServer:
        """Bind the port (shared with the other receivers) and serve on a background thread."""
        node = self.settings.node
        ae = self.build_ae()
        server = ae.make_server(
            (node.host, node.port),
            ae_title=node.ae_title,
            ssl_context=tls_context(self.settings),
            evt_handlers=self.handlers(),
            server_class=ReusePortServer,
            **({"request_handler": acceptor.request_handler_class(self)} if acceptor.SUPPORTED else {}),
        )
        server.admit = self.admit_connection
        acceptor.track_server(ae, server)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        return server


def _by_sop_class(choices: list[tuple[tuple[str, ...], Callable[..., Any]]]) -> Callable[..., Any]:
    """One handler for a DIMSE event that several services share: the one serving the request's
    presentation context (its abstract syntax)."""
    if len(choices) == 1:
        return choices[0][1]

    def route(event: Any, *args: Any) -> Any:
        abstract = str(event.context.abstract_syntax)
        for sop_classes, handler in choices:
            if abstract in sop_classes:
                return handler(event, *args)
        return SOP_CLASS_NOT_SUPPORTED, None

    return route


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
        self._sqlite_path = (
            database if engine.dialect.name == "sqlite" and database not in (None, "", ":memory:") else None
        )
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
                self._sqlite = sqlite3.connect(
                    self._sqlite_path, timeout=30, check_same_thread=False, isolation_level=None
                )
            try:
                row = self._sqlite.execute(self._sql, (sop_instance,)).fetchone()  # type: ignore[arg-type]
            except sqlite3.Error:
                self._sqlite.close()  # open a fresh one next time
                self._sqlite = None
                raise
        return row[0] if row else None


@dataclass
class _Party:
    ae_title: str


@dataclass
class _Parties:
    """Who sent and who received an instance the node retrieved itself (an association's sides)."""

    requestor: _Party
    acceptor: _Party


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


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
