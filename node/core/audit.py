"""The audit trail: DICOM PS3.15 A.5 audit messages (IHE ATNA) written to a file or syslog.

Stages call ``record(...)`` (or the helpers ``application_activity``, ``instances_transferred``,
``security_alert``, ``query``, ``user_authentication``). A call only builds the message and puts
it on a bounded in-memory queue; a background thread writes it to the sink. When the sink is slow
or down (a FIFO nobody reads, an unreachable syslog) the thread keeps retrying the oldest message
and new ones wait in the queue; when the queue is full the newest message is dropped and counted
(``ainode_audit_messages_dropped``). Receiving DICOM therefore never waits on the audit sink.

Messages name AE titles, network addresses, Study Instance UIDs and counts; patient names and IDs
are left out so the audit file may be handled like the other logs.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import queue
import socket
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
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
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
        if self.query_text:
            objects += (
                '<ParticipantObjectIdentification ParticipantObjectID="query" '
                'ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">'
                '<ParticipantObjectIDTypeCode csd-code="110181" codeSystemName="DCM" '
                'originalText="SOP Class UID"/>'
                f"<ParticipantObjectQuery>{_text(self.query_text)}</ParticipantObjectQuery>"
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
            count = f'<ParticipantObjectDetail type="NumberOfInstances" value="{self.instance_count}"/>'
        return (
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(uid)} "
            'ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">'
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


class SyslogSink:
    """RFC 5424 messages over UDP (host:port) or a local datagram socket (e.g. /dev/log)."""

    def __init__(self, address: str, app_name: str = "ainode"):
        self.address = address
        self.app_name = app_name
        self._sock: socket.socket | None = None

    def _target(self) -> Any:
        if self.address.startswith("/"):
            return self.address
        host, _, port = self.address.rpartition(":")
        return (host or "127.0.0.1", int(port or 514))

    def write(self, line: str) -> None:
        target = self._target()
        if self._sock is None:
            family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.settimeout(1.0)
        # PRI 110 = facility 13 (log audit) * 8 + severity 6 (informational); MSGID per RFC 5425 usage.
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        message = f"<110>1 {stamp} {socket.gethostname()} {self.app_name} {os.getpid()} IHE+RFC-3881 - {line}"
        try:
            self._sock.sendto(message.encode("utf-8"), target)
        except OSError as err:
            self.close()
            raise SinkDown(err.strerror or type(err).__name__) from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


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
) -> bool:
    """DICOM Instances Transferred (A.5.3.5): received from a modality (C) or sent to a PACS (R)."""
    parts = [
        Participant(source_ae, not imported, source_host, ROLE_SOURCE),
        Participant(destination_ae, imported, destination_host, ROLE_DESTINATION),
    ]
    return record(
        AuditEvent(
            INSTANCES_TRANSFERRED, "C" if imported else "R", outcome, None, reason, parts, [study_uid], instances
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


def patient_record(*, study_uid: str, attributes: list[str], source_ae: str, node_ae: str = "") -> bool:
    """Patient Record (A.5.3.9), action Update: a re-sent instance corrected the patient's or the
    order's identification. Names the corrected attributes, never their values."""
    detail = "re-send corrected " + ", ".join(attributes) + ": stored copy replaced, study analysed again"
    parts = [Participant(source_ae, True, "", ROLE_SOURCE)]
    if node_ae:
        parts.append(Participant(node_ae, False, socket.gethostname(), ROLE_DESTINATION))
    return record(AuditEvent(PATIENT_RECORD, "U", SUCCESS, None, detail, parts, [study_uid]))


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
