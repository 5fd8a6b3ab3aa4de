"""The audit trail: DICOM PS3.15 A.5 audit messages (IHE ATNA) written to a file or to syslog,
over UDP (RFC 5426) or TLS (RFC 5425, the transport IHE ATNA's Record Audit Event expects).

Stages call ``record(...)`` (or the helpers ``application_activity``, ``instances_transferred``,
``security_alert``, ``query``, ``user_authentication``, ``patient_record``, ``instances_accessed``,
``study_deleted``).
A call only builds the message and puts it on a bounded in-memory queue; a background thread
writes it to the sink. When the sink is slow or down (a FIFO nobody reads, an unreachable syslog
or audit repository) the thread keeps retrying the oldest message and new ones wait in the queue;
when the queue is full the newest message is dropped and counted (``ainode_audit_messages_dropped``).
Receiving DICOM therefore never waits on the audit sink.

Messages name AE titles, network addresses, Study Instance UIDs and counts, and, where PS3.15
A.5.3 asks for one, the Patient (ID and name): the audit trail is the protected record of who
touched whose data, kept apart from the application log, which never holds patient identity.
Messages follow the DICOM audit message schema (PS3.15 A.5.1; checked in the tests).
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from node.core.metrics import AUDIT_DROPPED
from node.core.settings import AuditSettings

log = logging.getLogger("ainode.audit")

QUEUE_SIZE = 10_000
RETRY_S = 1.0

# PS3.16 CID 400-403: event IDs and types (code, meaning).
APPLICATION_ACTIVITY = ("110100", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
PATIENT_RECORD = ("110110", "Patient Record")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = ("110131", "Software Configuration")
RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")
ROLE_SOURCE = ("110153", "Source Role ID")
ROLE_DESTINATION = ("110152", "Destination Role ID")
ROLE_APPLICATION = ("110150", "Application")
# EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8
# EventActionCode: C create, R read, U update, D delete, E execute.
# ParticipantObjectTypeCodeRole (PS3.15 A.5.1.2.2): 1 Patient, 3 Report, 24 Query.
ROLE_PATIENT, ROLE_REPORT, ROLE_QUERY = "1", "3", "24"


@dataclass(frozen=True)
class PatientIdentity:
    """The Patient participant object of a message: Patient ID, its issuer, and name."""

    patient_id: str
    name: str = ""
    issuer: str = ""

    def xml(self) -> str:
        """ParticipantObjectIdentification of a Person in the Patient role; the ID in HL7 CX form
        (ID^^^issuer) as PS3.15 A.5.3 asks, the name as encoded in DICOM (Family^Given)."""
        cx = f"{self.patient_id}^^^{self.issuer}" if self.issuer else self.patient_id
        name = f"<ParticipantObjectName>{_text(self.name)}</ParticipantObjectName>" if self.name else ""
        return (
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(cx)} "
            f'ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="{ROLE_PATIENT}">'
            '<ParticipantObjectIDTypeCode csd-code="2" codeSystemName="RFC-3881" originalText="Patient Number"/>'
            f"{name}</ParticipantObjectIdentification>"
        )


def patient_identity(patient_id: str | None, name: str | None = "", issuer: str | None = "") -> PatientIdentity | None:
    """The Patient participant for these values, or None when the data names no patient."""
    pid, pname, piss = (str(v or "").strip() for v in (patient_id, name, issuer))
    return PatientIdentity(pid, pname, piss) if (pid or pname) else None


@dataclass
class Participant:
    """An ActiveParticipant: who took part (an AE, a process, an API client) and in what role."""

    user_id: str
    requestor: bool
    network_id: str = ""
    role: tuple[str, str] | None = None
    alternative_user_id: str = ""

    def xml(self) -> str:
        net = ""
        if self.network_id:
            kind = "2" if _is_ip(self.network_id) else "1"  # 2 IP address, 1 machine name
            net = f' NetworkAccessPointID={quoteattr(self.network_id)} NetworkAccessPointTypeCode="{kind}"'
        alt = f" AlternativeUserID={quoteattr(self.alternative_user_id)}" if self.alternative_user_id else ""
        role = ""
        if self.role:
            role = (
                f'<RoleIDCode csd-code="{self.role[0]}" codeSystemName="DCM" originalText={quoteattr(self.role[1])}/>'
            )
        return (
            f"<ActiveParticipant UserID={quoteattr(self.user_id)}{alt} "
            f'UserIsRequestor="{str(self.requestor).lower()}"{net}>{role}</ActiveParticipant>'
        )


@dataclass
class AuditEvent:
    """One audit message (PS3.15 A.5.1), rendered as a single line of XML."""

    event_id: tuple[str, str]
    action: str = "E"
    outcome: int = SUCCESS
    event_type: tuple[str, str] | None = None
    outcome_description: str = ""
    participants: list[Participant] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)
    instance_count: int | None = None
    query_text: str = ""
    patients: list[PatientIdentity] = field(default_factory=list)
    when: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def xml(self, source_id: str) -> str:
        """The AuditMessage element (DICOM audit message schema, PS3.15 A.5.1)."""
        etype = ""
        if self.event_type:
            etype = (
                f'<EventTypeCode csd-code="{self.event_type[0]}" codeSystemName="DCM" '
                f"originalText={quoteattr(self.event_type[1])}/>"
            )
        desc = (
            f"<EventOutcomeDescription>{_text(self.outcome_description)}</EventOutcomeDescription>"
            if self.outcome_description
            else ""
        )
        parts = "".join(p.xml() for p in self.participants)
        objects = "".join(self._study_xml(uid) for uid in self.study_uids)
        objects += "".join(p.xml() for p in self.patients)
        if self.query_text:
            # The schema types the query as base64Binary: it keeps the request exactly as sent.
            objects += (
                '<ParticipantObjectIdentification ParticipantObjectID="query" '
                f'ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="{ROLE_QUERY}">'
                '<ParticipantObjectIDTypeCode csd-code="110181" codeSystemName="DCM" '
                'originalText="SOP Class UID"/>'
                f"<ParticipantObjectQuery>{_base64(self.query_text)}</ParticipantObjectQuery>"
                "</ParticipantObjectIdentification>"
            )
        return (
            f'<AuditMessage><EventIdentification EventActionCode="{self.action}" '
            f'EventDateTime="{self.when.isoformat(timespec="milliseconds")}" '
            f'EventOutcomeIndicator="{self.outcome}"><EventID csd-code="{self.event_id[0]}" '
            f'codeSystemName="DCM" originalText={quoteattr(self.event_id[1])}/>{etype}{desc}'
            f"</EventIdentification>{parts}<AuditSourceIdentification AuditSourceID={quoteattr(source_id)}>"
            '<AuditSourceTypeCode csd-code="4"/></AuditSourceIdentification>'
            f"{objects}</AuditMessage>"
        )

    def _study_xml(self, uid: str) -> str:
        count = ""
        if self.instance_count is not None:
            # ParticipantObjectDetail values are base64Binary in the schema.
            count = f'<ParticipantObjectDetail type="NumberOfInstances" value="{_base64(str(self.instance_count))}"/>'
        return (
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(uid)} "
            f'ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="{ROLE_REPORT}">'
            '<ParticipantObjectIDTypeCode csd-code="110180" codeSystemName="DCM" '
            f'originalText="Study Instance UID"/>{count}</ParticipantObjectIdentification>'
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _text(value: str) -> str:
    return escape(value.replace("\n", " "))


def _base64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


# --- sinks -------------------------------------------------------------------------------------


class SinkDown(Exception):
    """The sink cannot take a message now; it is retried later."""


class FileSink:
    """Appends one message per line; a FIFO is opened non-blocking so a missing reader is 'down'."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o640)
            except OSError as err:  # ENXIO: a FIFO without a reader
                raise SinkDown(err.strerror) from None
        try:
            written = os.write(self._fd, data)
        except OSError as err:
            self.close()
            raise SinkDown(err.strerror if err.errno != errno.EAGAIN else "sink full") from None
        if written != len(data):  # a FIFO took part of the line: never leave half a message
            self.close()
            raise SinkDown("short write")

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


# RFC 5424 header fields: PRI 110 = facility 13 (log audit) * 8 + severity 6 (informational);
# MSGID "IHE+RFC-3881" is what IHE ATNA (ITI-20) names for these XML messages.
SYSLOG_PRI = 110
SYSLOG_MSGID = "IHE+RFC-3881"
BOM = "\ufeff"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark


def syslog_message(line: str, app_name: str = "ainode") -> bytes:
    """One RFC 5424 message carrying an audit message: header, no structured data, UTF-8 MSG."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    host = socket.gethostname() or "-"
    return f"<{SYSLOG_PRI}>1 {stamp} {host} {app_name} {os.getpid()} {SYSLOG_MSGID} - {BOM}{line}".encode("utf-8")


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or default_port)


class SyslogSink:
    """RFC 5424 messages over UDP (RFC 5426, host:port) or a local datagram socket (/dev/log)."""

    def __init__(self, address: str, app_name: str = "ainode"):
        self.address = address
        self.app_name = app_name
        self._sock: socket.socket | None = None

    def _target(self) -> Any:
        if self.address.startswith("/"):
            return self.address
        return _host_port(self.address, 514)

    def write(self, line: str) -> None:
        target = self._target()
        if self._sock is None:
            family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.settimeout(1.0)
        try:
            self._sock.sendto(syslog_message(line, self.app_name), target)
        except OSError as err:
            self.close()
            raise SinkDown(err.strerror or type(err).__name__) from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class TlsSyslogSink:
    """RFC 5425: RFC 5424 messages over TLS with octet-counting framing (``LEN SP MSG``).

    The collector's certificate is verified against ``ca_file`` (the system's CAs when None) and
    its host name; ``certificate``/``private_key`` present the node's own certificate (mutual TLS,
    IHE ATNA's Authenticate Node). Any failure (refused, certificate rejected, connection lost)
    is ``SinkDown``: the trail keeps the message and retries it on a new connection. Before each
    message the connection is checked for a close by the collector, so a collector that went
    away is noticed before a message is handed to a dead connection. (TCP acknowledges nothing
    to the application: a message written just as the collector dies can still be lost; RFC
    5425 has no application acknowledgement.)
    """

    CONNECT_TIMEOUT_S = 5.0
    SEND_TIMEOUT_S = 10.0
    # With TLS 1.3 a collector rejects the node's certificate (or its absence) after the node's
    # side of the handshake is done: a new connection waits this long for such a refusal before
    # its first message, so that message is not written into a connection being refused.
    CONFIRM_S = 0.5

    def __init__(
        self,
        address: str,
        ca_file: Path | None = None,
        certificate: Path | None = None,
        private_key: Path | None = None,
        app_name: str = "ainode",
    ):
        self.host, self.port = _host_port(address, 6514)
        self.ca_file, self.certificate, self.private_key = ca_file, certificate, private_key
        self.app_name = app_name
        self._context: ssl.SSLContext | None = None
        self._sock: ssl.SSLSocket | None = None

    def _tls_context(self) -> ssl.SSLContext:
        # Made on first use: a missing or unreadable file is a sink that is down (logged, retried)
        # rather than a node that cannot start.
        if self._context is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file and str(self.ca_file))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.certificate:
                context.load_cert_chain(str(self.certificate), self.private_key and str(self.private_key))
            self._context = context
        return self._context

    def _connect(self) -> ssl.SSLSocket:
        try:
            context = self._tls_context()
            raw = socket.create_connection((self.host, self.port), timeout=self.CONNECT_TIMEOUT_S)
        except OSError as err:
            raise SinkDown(err.strerror or str(err) or type(err).__name__) from None
        try:
            sock = context.wrap_socket(raw, server_hostname=self.host)
        except OSError as err:  # ssl.SSLError, including a certificate that does not verify
            raw.close()
            raise SinkDown(f"TLS: {getattr(err, 'reason', None) or err}") from None
        try:
            sock.settimeout(self.CONFIRM_S)
            closed = sock.recv(4096) == b""
        except (TimeoutError, ssl.SSLWantReadError):
            closed = False  # nothing came back: accepted (TLS session tickets are consumed by recv)
        except OSError as err:  # an alert: certificate required, unknown CA, ...
            sock.close()
            raise SinkDown(f"TLS: {getattr(err, 'reason', None) or err}") from None
        if closed:
            sock.close()
            raise SinkDown("the collector closed the connection after the TLS handshake")
        sock.settimeout(self.SEND_TIMEOUT_S)
        return sock

    def write(self, line: str) -> None:
        message = syslog_message(line, self.app_name)
        frame = str(len(message)).encode("ascii") + b" " + message
        if self._sock is not None and _closed_by_peer(self._sock):
            self.close()
        if self._sock is None:
            self._sock = self._connect()
        try:
            self._sock.sendall(frame)
        except OSError as err:  # a frame cut short is resent whole on the next connection
            self.close()
            raise SinkDown(err.strerror or type(err).__name__) from None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
    """Whether the collector closed the connection (a collector never sends syslog data; what it
    may send, TLS session tickets, is consumed here)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable and not sock.pending():
            return False
        sock.setblocking(False)
        try:
            return sock.recv(4096) == b""
        finally:
            sock.settimeout(TlsSyslogSink.SEND_TIMEOUT_S)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return False
    except (OSError, ValueError):
        return True


class NullSink:
    """Audit switched off (``audit.sink: none``)."""

    def write(self, line: str) -> None:
        return None

    def close(self) -> None:
        return None


# --- the trail -----------------------------------------------------------------------------------


class AuditTrail:
    """A bounded queue of messages and the thread that writes them to the sink."""

    def __init__(self, settings: AuditSettings, source_id: str = "AINODE", queue_size: int = QUEUE_SIZE):
        self.settings = settings
        self.source_id = source_id
        self.sink = make_sink(settings)
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self.dropped = 0
        self.written = 0
        self.sink_down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def record(self, event: AuditEvent) -> bool:
        """Queue a message without ever blocking; False when it had to be dropped."""
        if isinstance(self.sink, NullSink):
            return True
        try:
            self._queue.put_nowait(event.xml(self.source_id))
            return True
        except queue.Full:
            self.dropped += 1
            AUDIT_DROPPED.inc()
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.error("audit sink %s is not keeping up: %d message(s) dropped", self.settings.sink, self.dropped)
            return False

    def pending(self) -> int:
        """Messages waiting for the sink."""
        return self._queue.qsize()

    def _run(self) -> None:
        line: str | None = None
        while not (self._stop.is_set() and line is None and self._queue.empty()):
            if line is None:
                try:
                    line = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            try:
                self.sink.write(line)
            except SinkDown as err:
                if self.sink_down_since is None:
                    self.sink_down_since = time.monotonic()
                    log.warning("audit sink %s unavailable (%s); messages wait in memory", self.settings.sink, err)
                if self._stop.is_set():
                    if self._stop_deadline_passed():
                        break
                    time.sleep(0.1)
                else:
                    self._stop.wait(RETRY_S)
                continue
            except Exception as err:  # noqa: BLE001 - the audit thread must survive anything
                log.error("audit sink error: %s", type(err).__name__)
                time.sleep(RETRY_S)
                continue
            if self.sink_down_since is not None:
                log.info("audit sink %s is back", self.settings.sink)
                self.sink_down_since = None
            self.written += 1
            line = None

    def _stop_deadline_passed(self) -> bool:
        return time.monotonic() > getattr(self, "_deadline", 0.0)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is written (True) or the timeout passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._queue.empty() and self.sink_down_since is None:
                time.sleep(0.05)
                return self._queue.empty()
            time.sleep(0.05)
        return False

    def close(self, timeout: float = 2.0) -> None:
        """Write what can be written within ``timeout`` and stop the thread."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout + RETRY_S + 1)
        self.sink.close()


def make_sink(settings: AuditSettings) -> Any:
    """The sink named by the settings."""
    if settings.sink == "file":
        return FileSink(settings.path)
    if settings.sink == "syslog":
        return SyslogSink(settings.syslog_address)
    if settings.sink == "syslog-tls":
        return TlsSyslogSink(
            settings.syslog_address, settings.tls_ca, settings.tls_certificate, settings.tls_private_key
        )
    return NullSink()


_trail: AuditTrail | None = None
_lock = threading.Lock()


def configure(settings: AuditSettings, source_id: str = "AINODE") -> AuditTrail:
    """Start this process's audit trail (replacing an earlier one)."""
    global _trail
    with _lock:
        if _trail is not None:
            _trail.close(timeout=0.5)
        _trail = AuditTrail(settings, source_id)
        return _trail


def trail() -> AuditTrail | None:
    """This process's audit trail, if configured."""
    return _trail


def record(event: AuditEvent) -> bool:
    """Queue an audit message in this process's trail (a no-op before ``configure``)."""
    current = _trail
    return current.record(event) if current is not None else False


# --- the messages stages send ----------------------------------------------------------------


def application_activity(started: bool, ae_title: str, user: str = "") -> bool:
    """Application Start/Stop of the node (PS3.15 A.5.3.1)."""
    parts = [Participant(ae_title, False, socket.gethostname(), ROLE_APPLICATION)]
    if user:
        parts.append(Participant(user, True))
    return record(
        AuditEvent(
            APPLICATION_ACTIVITY, "E", SUCCESS, APPLICATION_START if started else APPLICATION_STOP, participants=parts
        )
    )


def instances_transferred(
    *,
    imported: bool,
    study_uid: str,
    instances: int,
    source_ae: str,
    source_host: str,
    destination_ae: str,
    destination_host: str = "",
    outcome: int = SUCCESS,
    reason: str = "",
    patient: PatientIdentity | None = None,
) -> bool:
    """DICOM Instances Transferred (A.5.3.5): received from a modality (C) or sent to a PACS (R),
    naming the study and its patient."""
    parts = [
        Participant(source_ae, not imported, source_host, ROLE_SOURCE),
        Participant(destination_ae, imported, destination_host, ROLE_DESTINATION),
    ]
    return record(
        AuditEvent(
            INSTANCES_TRANSFERRED,
            "C" if imported else "R",
            outcome,
            None,
            reason,
            parts,
            [study_uid],
            instances,
            patients=[patient] if patient else [],
        )
    )


def security_alert(
    what: tuple[str, str],
    *,
    user: str,
    address: str = "",
    detail: str = "",
    outcome: int = SUCCESS,
    study_uids: list[str] | None = None,
) -> bool:
    """Security Alert (A.5.3.11): configuration changes, restricted actions, refused peers."""
    return record(
        AuditEvent(
            SECURITY_ALERT, "E", outcome, what, detail, [Participant(user, True, address)], list(study_uids or [])
        )
    )


def patient_record(
    *, study_uid: str, attributes: list[str], source_ae: str, node_ae: str = "", patient: PatientIdentity | None = None
) -> bool:
    """Patient Record (A.5.3.9), action Update: a re-sent instance corrected the patient's or the
    order's identification. Names the corrected attributes, and the patient as now identified."""
    detail = "re-send corrected " + ", ".join(attributes) + ": stored copy replaced, study analysed again"
    parts = [Participant(source_ae, True, "", ROLE_SOURCE)]
    if node_ae:
        parts.append(Participant(node_ae, False, socket.gethostname(), ROLE_DESTINATION))
    return record(
        AuditEvent(
            PATIENT_RECORD, "U", SUCCESS, None, detail, parts, [study_uid], patients=[patient] if patient else []
        )
    )


def instances_accessed(*, user: str, address: str, study_uid: str, patient: PatientIdentity | None = None) -> bool:
    """DICOM Instances Accessed (A.5.3.4), action Read: a user viewed a study's images (the
    dashboard's study page and its key slices)."""
    return record(
        AuditEvent(
            INSTANCES_ACCESSED,
            "R",
            SUCCESS,
            participants=[Participant(user, True, address)],
            study_uids=[study_uid],
            patients=[patient] if patient else [],
        )
    )


def study_deleted(
    *, study_uid: str, instances: int, node_ae: str, reason: str, patient: PatientIdentity | None = None
) -> bool:
    """DICOM Study Deleted (A.5.3.6), action Delete: the node removed a stored study (retention);
    the node's process is the requestor, the study and its patient the objects."""
    return record(
        AuditEvent(
            STUDY_DELETED,
            "D",
            SUCCESS,
            None,
            reason,
            [Participant(node_ae, True, socket.gethostname(), ROLE_APPLICATION)],
            [study_uid],
            instances,
            patients=[patient] if patient else [],
        )
    )


def query(*, user: str, address: str, text: str, outcome: int = SUCCESS) -> bool:
    """Query (A.5.3.10): a search of the node's index through the API."""
    return record(
        AuditEvent(QUERY, "E", outcome, None, "", [Participant(user, True, address, ROLE_SOURCE)], query_text=text)
    )


def user_authentication(*, user: str, address: str, success: bool, reason: str = "invalid or missing token") -> bool:
    """User Authentication (A.5.3.12): an API client presenting (or failing) its credentials;
    ``reason`` says why a failure failed (never the credential itself)."""
    return record(
        AuditEvent(
            USER_AUTHENTICATION,
            "E",
            SUCCESS if success else MINOR_FAILURE,
            LOGIN,
            "" if success else reason,
            [Participant(user, True, address)],
        )
    )
