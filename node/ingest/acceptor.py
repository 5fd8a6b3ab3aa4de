"""pynetdicom's association acceptor, tuned for ingest: event-driven, streaming, few copies.

pynetdicom (3.0) runs each association as two polling loops that sleep 1 ms whenever they find
nothing to do, copies every received PDU several times, collects a C-STORE data set in memory,
and encodes each C-STORE response through pydicom (about 1 ms of CPU). With one association a
sender waits for every answer, so those costs add up to most of the time per instance. This
module keeps pynetdicom for everything it does well (association negotiation, the state
machine, every DIMSE service) and replaces only the hot paths, for associations accepted by
our listener:

- the DUL reactor waits in ``poll()`` on the socket and on a wake-up socket that is written
  when the association has something to send, instead of sleeping 1 ms per idle loop;
- the association reactor waits on an event the DUL sets after every state-machine action;
- P-DATA-TF PDUs are read with ``recv_into`` into one buffer and split into PDVs as
  memoryviews (one copy from the kernel instead of five);
- a C-STORE data set is handed fragment by fragment to a *sink* (``sink_factory``) as it
  arrives, so the receiver writes it to disk while the rest is still on the wire and never
  holds a large instance in memory;
- a plain C-STORE Success response is encoded directly (the command set is seven fixed
  elements); everything else goes through pynetdicom.

This is the one place in ainode that touches pynetdicom internals: the subclasses override
private pynetdicom methods and attributes, and the receiver reaches the rest it needs
(``accepted_context``, ``track_server``) through this module. Those internals are pynetdicom
3.0.x's: pynetdicom is pinned to 3.0.x in pyproject.toml, and ``SUPPORTED`` below guards the
version at run time (with any other version the receiver serves through plain pynetdicom:
slower, same answers). Every receiver test runs through this module.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, Protocol

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.core import audit, metrics
from node.core.errors import describe_error

LOGGER = logging.getLogger("ainode.acceptor")

# The private pynetdicom methods overridden here are those of 3.0.x: with any other version the
# receiver falls back to plain pynetdicom (slower, same answers).
SUPPORTED = pynetdicom.__version__.startswith("3.0.")

# How long a reactor waits before re-checking its timers when nothing wakes it (seconds). The
# ARTIM and network idle timers are seconds long, so this only bounds their precision.
_IDLE_WAIT_S = 0.05
_PDATA_TF = 0x04
# A PDU body is read into a buffer of at most this size first, grown only as bytes arrive.
_FIRST_READ = 1 << 20
# The largest PDU (length field, PS3.8 9.3.1) accepted of each kind other than P-DATA-TF. An
# A-ASSOCIATE-RQ holds at most 128 presentation contexts (odd IDs 1-255) and one user
# information item: 1 MiB fits 128 contexts of 16 transfer syntaxes with 64-character UIDs and
# a large user identity many times over. Release, abort and reject PDUs are 4 bytes long.
_ASSOCIATE_MAX = 1 << 20
_OTHER_PDU_MAX = {0x01: _ASSOCIATE_MAX, 0x02: _ASSOCIATE_MAX, 0x03: 64, 0x05: 64, 0x06: 64, 0x07: 64}
# With max_pdu_bytes 0 (no limit announced) a P-DATA-TF is still read whole into memory: this
# bounds it.
_UNLIMITED_PDATA_MAX = 256 << 20
# PS3.8 9.3.8: A-ABORT from the service provider (source 2), invalid PDU parameter value (6).
_ABORT_INVALID_PARAMETER = 0x06
_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class DataSetSink(Protocol):
    """Where the fragments of one C-STORE data set go as they arrive (see ``sink_factory``)."""

    def write(self, data: memoryview) -> None:
        """Take the next fragment (valid only during the call)."""

    def discard(self) -> None:
        """The message will never complete (association ended): drop what was written."""


class _PDV:
    __slots__ = ("presentation_context_id", "presentation_data_value")

    def __init__(self, context_id: int, value: memoryview):
        self.presentation_context_id = context_id
        self.presentation_data_value = value


class _PDataTF:
    """A received P-DATA-TF PDU whose PDVs are views into the receive buffer."""

    __slots__ = ("presentation_data_value_items",)

    def __init__(self, items: list[_PDV]):
        self.presentation_data_value_items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # Straight into the attribute: pynetdicom's setter insists on bytes, these are views.
        primitive._presentation_data_value_list = [
            [item.presentation_context_id, item.presentation_data_value] for item in self.presentation_data_value_items
        ]
        return primitive


def _split_pdvs(body: memoryview) -> list[_PDV] | None:
    """PDV items of a P-DATA-TF body (PS3.8 9.3.5.1); None when they do not tile it exactly."""
    items, offset, end = [], 0, len(body)
    while offset < end:
        if offset + 6 > end:
            return None
        length = struct.unpack_from(">I", body, offset)[0]
        if length < 2 or offset + 4 + length > end:
            return None
        items.append(_PDV(body[offset + 4], body[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return items or None


class FastSocket(AssociationSocket):
    """AssociationSocket whose reads fill one buffer (``recv_into``) instead of 4 KiB pieces,
    and whose sends are serialised, so the association thread may send a C-STORE response
    itself while the DUL thread could be sending too (an abort).

    Every read has a deadline: ``deadline`` (monotonic seconds, the ARTIM timer's end) until
    the A-ASSOCIATE-RQ has arrived, however slowly its bytes come; then the socket's timeout
    (the network timeout: no byte for that long in the middle of a PDU). A read past its
    deadline raises TimeoutError.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_lock = threading.Lock()
        self.deadline: float | None = None

    def send(self, bytestream: bytes) -> None:  # noqa: D102
        with self._send_lock:
            super().send(bytestream)

    def recv_exact(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only when the peer closed the connection).

        The buffer grows as bytes arrive (at most doubling, from ``_FIRST_READ``), never to a
        length the peer only claimed: a header that promises gigabytes costs what was sent.
        """
        sock = self.socket
        deadline = self.deadline
        buf = bytearray(min(nr_bytes, _FIRST_READ))
        view, got = memoryview(buf), 0
        try:
            while got < nr_bytes:
                if got == len(buf):  # full and more to come: grow (no view may be held meanwhile)
                    view.release()
                    buf.extend(bytes(min(nr_bytes - got, got)))
                    view = memoryview(buf)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("ARTIM expired")
                    sock.settimeout(left)  # type: ignore[union-attr]
                n = sock.recv_into(view[got:], len(buf) - got)  # type: ignore[union-attr]
                if not n:
                    break
                got += n
        finally:
            view.release()
        if got < len(buf):
            del buf[got:]
        return buf

    def recv(self, nr_bytes: int) -> bytearray:  # noqa: D102 - same contract as pynetdicom's
        return self.recv_exact(nr_bytes)

    def associating(self, idle_timeout: float | None) -> None:
        """The A-ASSOCIATE-RQ is in: reads now wait at most ``idle_timeout`` for each byte."""
        self.deadline = None
        sock = self.socket
        if sock is not None:
            try:
                sock.settimeout(idle_timeout or None)
            except OSError:  # closed meanwhile
                pass


class FastDUL(DULServiceProvider):
    """The DUL reactor, woken by socket data or by something to send instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller: Any = None
        self._polled_fd = -1
        # The longest P-DATA-TF accepted (PDU length field): set from our announced maximum.
        self.pdata_max = _UNLIMITED_PDATA_MAX

    # -- waking

    def wake(self) -> None:
        """Make the reactor look at its queues now."""
        try:
            self._wake_w.send(b"\x00")
        except OSError:  # full (a wake-up is pending anyway) or closed (reactor ended)
            pass

    def send_pdu(self, primitive: Any) -> None:  # noqa: D102
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:  # noqa: D102
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:  # noqa: D102
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
            while self.is_alive():
                time.sleep(0.0005)
            return True
        return False

    def _wait(self) -> None:
        """Block until the socket is readable, a wake-up arrives, or ``_IDLE_WAIT_S`` passes."""
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        fd = sock.fileno()
        if fd < 0:
            time.sleep(self._run_loop_delay)
            return
        if fd != self._polled_fd:
            self._poller = select.poll()
            self._poller.register(fd, _POLL_IN)
            self._poller.register(self._wake_r.fileno(), select.POLLIN)
            self._polled_fd = fd
        try:
            ready = self._poller.poll(_IDLE_WAIT_S * 1000)
        except OSError:
            return
        if any(fd_ == self._wake_r.fileno() for fd_, _ in ready):
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def _left_waiting_state(self, before: str) -> None:
        """After an event in Sta2 (awaiting the A-ASSOCIATE-RQ) or Sta13 (awaiting the close)."""
        after = self.state_machine.current_state
        if after == before:
            return
        if after == "Sta1":
            # Closed before anything was asked: the association thread waits for the request
            # (pynetdicom's acceptor loop, for its ACSE timeout). None ends that wait now.
            self.to_user_queue.put(None)  # type: ignore[arg-type]
        elif before == "Sta2" and isinstance(self.socket, FastSocket):
            self.socket.associating(self.assoc.network_timeout)

    def _artim_expired(self) -> None:
        """A connection that has not sent its A-ASSOCIATE-RQ within the ARTIM time: closed."""
        metrics.PENDING_CLOSED.labels("artim").inc()
        LOGGER.warning(
            "connection from %s: no A-ASSOCIATE-RQ within %g s (ARTIM): connection closed",
            self.assoc.requestor.address,
            self.artim_timer.timeout,
        )

    def _read_timed_out(self, sock: FastSocket) -> None:
        """A read past its deadline: ARTIM (no whole A-ASSOCIATE-RQ yet) or the network timeout
        (a PDU stopped in the middle). The connection is closed (Evt17)."""
        if sock.deadline is not None:  # still waiting for the request (Evt5 may even be queued)
            self._artim_expired()
        else:
            LOGGER.error(
                "network timeout: no data from %s for %g s in the middle of a PDU: connection closed",
                self.assoc.requestor.address,
                self.assoc.network_timeout or 0,
            )
        sock.close()

    def _notify_assoc(self) -> None:
        wake = getattr(self._assoc, "_wake", None)
        if wake is not None:
            wake.set()

    # -- the reactor (pynetdicom's loop, with _wait() instead of a 1 ms sleep)

    def run_reactor(self) -> None:  # noqa: D102
        try:
            self._reactor()
        finally:
            self._notify_assoc()
            self._wake_r.close()
            self._wake_w.close()

    def _reactor(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                if self.state_machine.current_state == "Sta2":
                    self._artim_expired()
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                LOGGER.error("exception in the DUL reactor, aborting the association: %s", type(exc).__name__)
                LOGGER.debug("DUL reactor exception", exc_info=True)
                self._abort_after_exception()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            before = self.state_machine.current_state
            try:
                self.state_machine.do_action(event)
            except Exception as exc:  # an event with no transition in this state, or its action failing
                LOGGER.error("%s: %s in state %s, aborting the association", type(exc).__name__, event, before)
                LOGGER.debug("state machine exception", exc_info=True)
                self._abort_after_exception()
                return
            if before in ("Sta2", "Sta13"):
                self._left_waiting_state(before)
            if event != "Evt10":  # P-DATA wakes the association only with a complete message
                self._notify_assoc()
            idle = False

    def _abort_after_exception(self) -> None:
        """End the association after an exception in the reactor (pynetdicom failing on a
        malformed command set, say): A-ABORT, close the connection, and report it closed.

        The reactor stops here, so the state machine never sees the connection close: the
        connection-closed event (EVT_CONN_CLOSE) is triggered here, as the state machine's
        actions do, or the receiver would never give back the association's slot (every slot
        lost this way was lost until a restart) nor the connection's pending place.
        """
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        sock = self.socket
        try:
            sock.send(abort_pdu.encode())  # type: ignore[union-attr]
        except Exception:
            pass
        assoc = self.assoc
        assoc.is_aborted = True
        assoc.is_established = False
        assoc._kill = True
        self._kill_thread = True
        if sock is not None:
            sock.close()
        info = assoc.requestor.address_info
        if info is not None:
            evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": info.as_tuple})

    # -- reading PDUs

    def _read_pdu_data(self) -> None:  # noqa: D102
        sock = self.socket
        if not isinstance(sock, FastSocket) or self._pdu_events_bound():
            return super()._read_pdu_data()
        try:
            header = sock.recv_exact(6)
        except TimeoutError:
            return self._read_timed_out(sock)
        except OSError:
            LOGGER.error("connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type != _PDATA_TF:
            return self._read_other_pdu(sock, header, pdu_type, length)
        if length > self.pdata_max:
            return self._refuse_length(sock, pdu_type, length, self.pdata_max)
        try:
            body = sock.recv_exact(length)
        except TimeoutError:
            return self._read_timed_out(sock)
        except OSError:
            LOGGER.error("connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            LOGGER.error("the received PDU is shorter than expected (%d of %d bytes)", len(body), length)
            self.event_queue.put("Evt17")
            return
        items = _split_pdvs(memoryview(body))
        if items is None:
            LOGGER.error("unable to decode a P-DATA-TF PDU")
            self.event_queue.put("Evt19")
            return
        pdu = _PDataTF(items)
        if (
            self.state_machine.current_state == "Sta6"
            and self.event_queue.empty()
            and not self.assoc._handlers.get(evt.EVT_FSM_TRANSITION)
        ):
            # Evt10 in Sta6 is DT-2 (hand the data to DIMSE), staying in Sta6: do it here
            # instead of through two queues and the state machine, once per PDU.
            self.assoc.dimse.receive_primitive(pdu.to_primitive())
            return
        self.event_queue.put("Evt10")
        self._recv_pdu.put(pdu)  # type: ignore[arg-type]

    def _pdu_events_bound(self) -> bool:
        handlers = self.assoc._handlers
        return bool(handlers.get(evt.EVT_DATA_RECV) or handlers.get(evt.EVT_PDU_RECV))

    def _read_other_pdu(self, sock: FastSocket, header: bytearray, pdu_type: int, length: int) -> None:
        # Association, release and abort PDUs: rare and small, decoded by pynetdicom.
        if pdu_type not in (0x01, 0x02, 0x03, 0x05, 0x06, 0x07):
            LOGGER.error("unknown PDU type received 0x%02X", pdu_type)
            self.event_queue.put("Evt19")
            return
        if length > _OTHER_PDU_MAX[pdu_type]:
            return self._refuse_length(sock, pdu_type, length, _OTHER_PDU_MAX[pdu_type])
        try:
            body = sock.recv_exact(length)
        except TimeoutError:
            return self._read_timed_out(sock)
        except OSError:
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception:
            LOGGER.error("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _refuse_length(self, sock: FastSocket, pdu_type: int, length: int, limit: int) -> None:
        """A PDU longer than we accept: nothing of it is read. A-ABORT (PS3.8 9.3.8: service
        provider, invalid PDU parameter value), close the connection (Evt17: the state machine
        ends the association as for any lost connection), log and audit it."""
        assoc = self.assoc
        address = str(assoc.requestor.address or "")
        established = self.state_machine.current_state != "Sta2"
        calling = str(assoc.requestor.ae_title).strip() if established else ""
        LOGGER.error(
            "PDU of type 0x%02X claiming %d bytes from %s refused (limit %d): association aborted",
            pdu_type,
            length,
            address,
            limit,
        )
        audit.security_alert(
            audit.NODE_AUTHENTICATION,
            user=calling or address,
            address=address,
            outcome=audit.MINOR_FAILURE,
            detail=f"PDU type 0x{pdu_type:02X} of {length} bytes refused (limit {limit}): association aborted",
        )
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = _ABORT_INVALID_PARAMETER
        try:
            sock.send(abort_pdu.encode())
        except Exception:
            pass
        sock.close()  # queues Evt17


# --- DIMSE ------------------------------------------------------------------------------------

_ELEMENT_HEAD = struct.Struct("<HHI")
_CSTORE_RQ, _CSTORE_RSP, _NO_DATA_SET = 0x0001, 0x8001, 0x0101
# The longest command set accepted. Command sets (PS3.7 9.3, 10.3) are a few hundred bytes; the
# longest a peer may legitimately send is an N-GET's Attribute Identifier List, 4 bytes a tag.
# Fragments of a command set are collected in memory: without a bound a peer sending command
# fragments without end grew the receiver by every byte (found by fuzzing).
COMMAND_MAX = 64 * 1024


# The most bytes of one message that pynetdicom assembles in memory: the messages the fast path
# does not stream (C-ECHO, MPPS, storage commitment reports: kilobytes) and C-STOREs whose
# command set it cannot parse (a UID that is not ASCII, say; sane peers never send them). Without
# a bound such a C-STORE's data set was held whole in memory, however long (found by fuzzing).
PYNETDICOM_MESSAGE_MAX = 16 * 1024 * 1024


class CommandTooLong(Exception):
    """A command set longer than COMMAND_MAX: the association is aborted."""


class MessageTooLong(Exception):
    """A message for pynetdicom longer than PYNETDICOM_MESSAGE_MAX: the association is aborted."""


class StoreRequest:
    """A C-STORE-RQ decoded on the fast path; its data set went to ``sink`` as it arrived."""

    __slots__ = (
        "message_id",
        "sop_class_uid",
        "sop_instance_uid",
        "priority",
        "move_originator_ae",
        "move_originator_message_id",
        "context_id",
        "sink",
    )
    msg_type = "C-STORE"

    def __init__(self) -> None:
        self.message_id = 0
        self.sop_class_uid = self.sop_instance_uid = ""
        self.priority = 0
        self.move_originator_ae: str | None = None
        self.move_originator_message_id: int | None = None
        self.context_id = 0
        self.sink: DataSetSink | None = None


class StoreService(Protocol):
    """What the fast path calls for C-STORE (the receiver implements it)."""

    def open_sink(self, assoc: Association, request: StoreRequest) -> DataSetSink | None:
        """Where the request's data set goes (None: let pynetdicom handle this request)."""

    def store(self, assoc: Association, request: StoreRequest, context: Any) -> int | tuple[int, str]:
        """The complete request: return the status (and an error comment)."""


def _text(value: bytes) -> str | None:
    try:
        return value.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None


def parse_store_request(command: bytes, context_id: int) -> StoreRequest | None:
    """A C-STORE-RQ command set (implicit VR LE, PS3.7 9.3.1.1), or None for anything else."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = _ELEMENT_HEAD.unpack_from(command, pos)
        pos += 8
        if group != 0x0000 or pos + length > end or elem in fields:
            return None
        fields[elem] = command[pos : pos + length]
        pos += length

    def u16(elem: int) -> int | None:
        value = fields.get(elem)
        return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None

    if u16(0x0100) != _CSTORE_RQ or u16(0x0800) in (None, _NO_DATA_SET):
        return None
    known = {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}
    if not fields.keys() <= known or u16(0x0110) is None:
        return None
    req = StoreRequest()
    req.message_id = u16(0x0110)  # type: ignore[assignment]
    req.priority = u16(0x0700) or 0
    sop_class, sop_instance = _text(fields.get(0x0002, b"")), _text(fields.get(0x1000, b""))
    if sop_class is None or sop_instance is None:
        return None
    req.sop_class_uid, req.sop_instance_uid = sop_class, sop_instance
    if 0x1030 in fields:
        req.move_originator_ae = _text(fields[0x1030])
    req.move_originator_message_id = u16(0x1031)
    req.context_id = context_id
    return req


def _element(elem: int, value: bytes) -> bytes:
    return _ELEMENT_HEAD.pack(0x0000, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(
    message_id: int, sop_class: str | None, sop_instance: str | None, status: int, comment: str | None = None
) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2), implicit VR little endian."""
    elements = []
    if sop_class:
        elements.append(_element(0x0002, _ui(sop_class)))
    elements += [
        _element(0x0100, struct.pack("<H", _CSTORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if comment:
        raw = comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x0902, raw + b" " if len(raw) % 2 else raw))
    if sop_instance:
        elements.append(_element(0x1000, _ui(sop_instance)))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _uid_or_none(uid: str) -> str | None:
    # Never echo a malformed UID back (a peer's "../x" stays out of our answers).
    if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid):
        return None
    return uid


class FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider: C-STORE requests decoded and streamed directly, the rest by pynetdicom."""

    def __init__(self, assoc: Association, service: StoreService | None = None) -> None:
        super().__init__(assoc)
        self._service = service
        self._command = bytearray()
        self._store: StoreRequest | None = None
        self._handed = 0  # bytes of the message pynetdicom is assembling

    # -- receiving

    def receive_primitive(self, primitive: P_DATA) -> None:  # noqa: D102
        if self._service is None:
            super().receive_primitive(primitive)
            if self.message is None:
                self.assoc._wake.set()
            return
        for context_id, data in primitive.presentation_data_value_list:
            if self.message is not None:  # pynetdicom is assembling this message
                self._to_pynetdicom(context_id, data)
                continue
            header = data[0]
            if header & 1:  # a command fragment
                if self._store is not None:  # a new command inside a data set: not ours to judge
                    self._give_up_store()
                if len(self._command) + len(data) - 1 > COMMAND_MAX:
                    self._command.clear()
                    LOGGER.error(
                        "command set from %s longer than %d bytes: association aborted",
                        self.assoc.requestor.address,
                        COMMAND_MAX,
                    )
                    raise CommandTooLong(f"command set over {COMMAND_MAX} bytes")
                self._command += data[1:]
                if header & 2:
                    self._command_complete(context_id)
                continue
            store = self._store
            if store is None:  # data without a command: let pynetdicom deal with it
                self._to_pynetdicom(context_id, data)
                continue
            store.sink.write(data[1:])  # type: ignore[union-attr]
            if header & 2:
                self._store = None
                self.msg_queue.put((store.context_id, store))  # type: ignore[arg-type]
                self.assoc._wake.set()

    def _command_complete(self, context_id: int) -> None:
        command = bytes(self._command)
        self._command.clear()
        req = None
        if not self.assoc._handlers.get(evt.EVT_DIMSE_RECV):
            req = parse_store_request(command, context_id)
        if req is not None:
            req.sink = self._service.open_sink(self.assoc, req)  # type: ignore[union-attr]
        if req is None or req.sink is None:
            self._to_pynetdicom(context_id, b"\x03" + command)
            return
        self._store = req

    def _to_pynetdicom(self, context_id: int, data: Any) -> None:
        self._handed += len(data)
        if self._handed > PYNETDICOM_MESSAGE_MAX:
            self._handed, self.message = 0, None  # what pynetdicom assembled is dropped
            LOGGER.error(
                "message from %s for pynetdicom longer than %d bytes: association aborted",
                self.assoc.requestor.address,
                PYNETDICOM_MESSAGE_MAX,
            )
            raise MessageTooLong(f"message over {PYNETDICOM_MESSAGE_MAX} bytes")
        single = P_DATA()
        single._presentation_data_value_list = [[context_id, data]]
        super().receive_primitive(single)
        if self.message is None:  # complete: queued for the association (or served)
            self._handed = 0
            self.assoc._wake.set()

    def _give_up_store(self) -> None:
        store, self._store = self._store, None
        if store is not None and store.sink is not None:
            store.sink.discard()

    def discard_partial(self) -> None:
        """The association ended: drop data sets still arriving or never served."""
        self._give_up_store()
        while True:
            try:
                _, msg = self.msg_queue.get(block=False)
            except queue.Empty:
                return
            if isinstance(msg, StoreRequest) and msg.sink is not None:
                msg.sink.discard()

    # -- sending

    def send_store_response(self, req: StoreRequest, status: int, comment: str | None = None) -> None:
        """Answer a fast-path C-STORE."""
        command = encode_store_response(
            req.message_id, _uid_or_none(req.sop_class_uid), _uid_or_none(req.sop_instance_uid), status, comment
        )
        # A peer's maximum PDU of under ~200 bytes is allowed but absurd: pynetdicom fragments.
        limit = self.maximum_pdu_size
        if limit and len(command) + 7 > limit:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = req.message_id
            rsp.AffectedSOPClassUID = _uid_or_none(req.sop_class_uid)
            rsp.AffectedSOPInstanceUID = _uid_or_none(req.sop_instance_uid)
            rsp.Status = status
            rsp.ErrorComment = comment
            return super().send_msg(rsp, req.context_id)
        if not self._send_direct(req.context_id, command):
            pdata = P_DATA()
            pdata.presentation_data_value_list = [[req.context_id, b"\x03" + command]]
            self.dul.send_pdu(pdata)

    def _send_direct(self, context_id: int, command: bytes) -> bool:
        """Send a one-PDV P-DATA-TF from this thread: what the DUL would do in state Sta6
        (DT-1), without waking it. Only when nothing else waits to be sent, so order holds."""
        dul, sock = self.dul, self.dul.socket
        if not isinstance(sock, FastSocket) or dul.state_machine.current_state != "Sta6":
            return False
        if not dul.to_provider_queue.empty() or self.assoc._handlers.get(evt.EVT_PDU_SENT):
            return False
        item_len = 2 + len(command)  # context ID + message control header + fragment
        pdu = struct.pack(">BBIIBB", _PDATA_TF, 0, 4 + item_len, item_len, context_id, 0x03) + command
        sock.send(pdu)
        return True


# --- the association --------------------------------------------------------------------------


class FastAssociation(Association):
    """An acceptor association using FastDUL/FastDIMSE and an event-driven reactor."""

    def __init__(self, ae: Any, mode: str, service: StoreService | None = None) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        self._service = service
        self.dul = FastDUL(self)
        self.dimse = FastDIMSE(self, service)
        # The timeout setters reach into the DUL's timers: apply them to the new DUL.
        self.acse_timeout = self.ae.acse_timeout
        self.connection_timeout = self.ae.connection_timeout
        self.dimse_timeout = self.ae.dimse_timeout
        self.network_timeout = self.ae.network_timeout

    def kill(self) -> None:  # noqa: D102 - pynetdicom's, with a short wait for the DUL
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        self._wake.set()
        self.dul.wake()  # type: ignore[attr-defined]
        while self.dul.is_alive() and not self.dul.stop_dul():
            time.sleep(0.001)
        self.dimse.discard_partial()  # type: ignore[attr-defined]

    def _run_reactor(self) -> None:  # noqa: D102 - pynetdicom's loop, woken instead of polling
        self._is_paused = False
        wake = self._wake
        while not self._kill:
            wake.wait(_IDLE_WAIT_S)
            wake.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            while True:  # serve every message that is waiting
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                if isinstance(msg, StoreRequest):
                    self._serve_store(msg, context_id)  # type: ignore[arg-type]
                else:
                    self._serve_request(msg, context_id)  # type: ignore[arg-type]
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOGGER.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
        # Ended by the DUL (an exception there): a data set still arriving is not left behind.
        self.dimse.discard_partial()  # type: ignore[attr-defined]

    def _serve_store(self, req: StoreRequest, context_id: int) -> None:
        """A fast-path C-STORE: pynetdicom's checks, the service's answer, our encoding."""
        if self._sent_release:
            LOGGER.warning("C-STORE received during association release, ignoring")
            req.sink.discard()  # type: ignore[union-attr]
            return
        context = self._accepted_cx.get(context_id)
        if context is None:
            LOGGER.info("received a DIMSE message with invalid or rejected context ID %d", context_id)
            req.sink.discard()  # type: ignore[union-attr]
            self.abort()
            return
        comment = None
        try:
            answer = self._service.store(self, req, context)  # type: ignore[union-attr]
            status, comment = answer if isinstance(answer, tuple) else (answer, None)
        except Exception as exc:
            LOGGER.error("C-STORE handler failed: %s", describe_error(exc))
            req.sink.discard()  # type: ignore[union-attr]
            status = 0xC211  # pynetdicom's answer when a handler raises
        if not self.is_established:
            return
        self.dimse.send_store_response(req, status, comment)  # type: ignore[attr-defined]


class FastRequestHandler(RequestHandler):
    """Request handler creating FastAssociations (pass as ``request_handler`` to make_server)."""

    service: StoreService | None = None

    def _create_association(self) -> Association:  # noqa: D102 - pynetdicom's, with our classes
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR, type(self).service)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = FastSocket(assoc, client_socket=self.request)
        if self.ae.acse_timeout:  # the acceptor's ACSE timeout is its ARTIM timer, from accept
            sock.deadline = time.monotonic() + self.ae.acse_timeout
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        if self.ae.maximum_pdu_size:  # what we announce; 6 bytes of slack for peers that count the header
            assoc.dul.pdata_max = self.ae.maximum_pdu_size + 6  # type: ignore[attr-defined]
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def request_handler_class(service: StoreService | None) -> type[FastRequestHandler]:
    """A FastRequestHandler subclass bound to ``service`` (None: every request via pynetdicom)."""
    return type("BoundFastRequestHandler", (FastRequestHandler,), {"service": service})


def accepted_context(assoc: Association, context_id: int) -> Any:
    """The presentation context accepted under ``context_id`` (None if there is none)."""
    return assoc._accepted_cx.get(context_id)


def track_server(ae: Any, server: Any) -> None:
    """Register a server from ``ae.make_server`` with its AE, as ``AE.start_server`` does, so that
    ``ae.shutdown()`` stops it too."""
    ae._servers.append(server)
