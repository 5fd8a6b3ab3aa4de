"""The ``hl7`` sender: one ORU^R01 (HL7 v2.5.1) per report, over MLLP, waiting for each ACK.

The message is built with hl7apy (its v2.5.1 structures, validated before sending): MSH, PID,
ORC/OBR linked to the order by accession number or requested procedure ID, TQ1 priority STAT
when a finding is critical, one OBX per finding, evaluation and measurement (CWE with the SR's
codes, NM with UCUM units, OBX-8 "AA" when critical), and OBX references to the Study Instance
UID and the SR. OBR-25 is "P" (preliminary), or "C" when the result corrects an earlier one.

The ACK decides the outcome: AA/CA delivered; AR/CR refused for good; AE/CE retried up to
``ris.max_refusals`` attempts, then failed with the peer's text. No answer or no connection is a
link failure (retried with backoff, circuit breaker).
"""

from __future__ import annotations

import socket
import ssl
from datetime import datetime, timezone

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from node.core.settings import Destination, Settings
from node.dispatch.link import LinkDown, Outcome, Progress, tls_context
from node.dispatch.report import Code, Group, Person, Report, Unbuildable, send_reports
from node.dispatch.table import DELIVERED, FAILED, PENDING, Delivery

START, END = b"\x0b", b"\x1c\x0d"
# HL7 v2 delimiters: a value must not carry them unescaped (HL7 v2.5.1 section 2.7).
ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
SEX = {"M": "M", "F": "F", "O": "O"}
# Coding systems: HL7 table 0396 names them the way DICOM does (SCT, LN, DCM, UCUM).
STUDY_UID_CODE = "110180^Study Instance UID^DCM"
SR_UID_CODE = "SR-UID^SR SOP Instance UID^99AINODE"


def escape(text: str) -> str:
    """A value safe inside one HL7 component: delimiters escaped, line breaks as spaces."""
    for raw, escaped in ESCAPES:
        text = text.replace(raw, escaped)
    return " ".join(text.splitlines())


def cwe(code: Code) -> str:
    """A CWE/CE field: identifier^text^coding system."""
    return f"{escape(code.value)}^{escape(code.meaning)}^{escape(code.scheme)}"


def xpn(person: Person) -> list[str]:
    """PID-5 repetitions, one per name group (XPN.8: A alphabetic, I ideographic, P phonetic)."""
    repetitions = []
    for representation, parts in person.groups.items():
        family, given, middle, prefix, suffix = (escape(p) for p in parts)
        repetitions.append(f"{family}^{given}^{middle}^{suffix}^{prefix}^^L^{representation}")
    return repetitions


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def _observation(message_group, set_id: int, value_type: str, code: str, value: str, report: Report, **extra: str):
    obx = message_group.add_group("ORU_R01_OBSERVATION").obx
    obx.obx_1, obx.obx_2, obx.obx_3, obx.obx_5 = str(set_id), value_type, code, value
    obx.obx_11 = "C" if report.correction else "P"
    if report.content_datetime:
        obx.obx_14 = report.content_datetime
    for name, text in extra.items():
        setattr(obx, name, text)
    return obx


def _group_observations(order, report: Report, group: Group, sub_id: int, set_id: int) -> int:
    flag = {"obx_8": "AA"} if group.critical else {}
    sub = {"obx_4": str(sub_id)}
    if group.finding is not None:
        set_id += 1
        _observation(order, set_id, "CWE", "121071^Finding^DCM", cwe(group.finding), report, **sub, **flag)
    for concept, value in group.evaluations:
        set_id += 1
        _observation(order, set_id, "CWE", cwe(concept), cwe(value), report, **sub, **flag)
    for quantity in group.quantities:
        set_id += 1
        unit = cwe(quantity.unit)
        _observation(
            order, set_id, "NM", cwe(quantity.name), f"{quantity.value:.6g}", report, obx_6=unit, **sub, **flag
        )
    return set_id


def build_oru(report: Report, dest: Destination, control_id: str) -> str:
    """The ORU^R01 for one report, as ER7 text (segments separated by CR), validated by hl7apy."""
    ris = dest.ris
    msg = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    _msh(msg, dest, "ORU^R01^ORU_R01", control_id)
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    _patient(result.add_group("ORU_R01_PATIENT").pid, report)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    placer = escape(report.order_number(ris.order_number))
    order.orc.orc_1, order.orc.orc_3 = "RE", f"{report.report_id}^{escape(ris.sending_application)}"
    if placer:
        order.orc.orc_2 = placer
    if report.critical():
        order.add_group("ORU_R01_TIMING_QTY").tq1.tq1_9 = "S^Stat^HL70485"
    obr = order.obr
    obr.obr_1 = "1"
    if placer:
        obr.obr_2 = placer
    obr.obr_3 = f"{report.report_id}^{escape(ris.sending_application)}"
    obr.obr_4 = f"{escape(report.analysis or 'ai-analysis')}^{escape(report.algorithm or report.analysis)}^99AINODE"
    if report.study_datetime:
        obr.obr_7 = report.study_datetime
    obr.obr_22, obr.obr_24, obr.obr_25 = _now(), "RAD", "C" if report.correction else "P"
    set_id = 0
    set_id += 1
    _observation(order, set_id, "ST", STUDY_UID_CODE, report.study_instance_uid, report)
    set_id += 1
    _observation(order, set_id, "ST", SR_UID_CODE, report.sr_sop_instance_uid, report)
    for index, group in enumerate(report.groups, start=1):
        set_id = _group_observations(order, report, group, index, set_id)
    msg.validate()
    return msg.to_er7()


def _msh(msg: Message, dest: Destination, message_type: str, control_id: str) -> None:
    ris = dest.ris
    msg.msh.msh_3, msg.msh.msh_4 = escape(ris.sending_application), escape(ris.sending_facility)
    msg.msh.msh_5, msg.msh.msh_6 = escape(ris.receiving_application), escape(ris.receiving_facility)
    msg.msh.msh_7, msg.msh.msh_9, msg.msh.msh_10 = _now(), message_type, control_id
    msg.msh.msh_11, msg.msh.msh_18 = "P", "UNICODE UTF-8"


def _patient(pid, report: Report) -> None:  # type: ignore[no-untyped-def]
    """PID: identifier with issuer, every name group, birth date, sex (PID-5 is required: an
    unnamed patient gets an empty name)."""
    pid.pid_1 = "1"
    pid.pid_3 = f"{escape(report.patient_id)}^^^{escape(report.issuer_of_patient_id)}^MR"
    for repetition in xpn(report.patient_name) or ["^^^^^^U"]:
        pid.add_field("pid_5").value = repetition
    if report.birth_date:
        pid.pid_7 = report.birth_date
    pid.pid_8 = SEX.get(report.sex, "U")


def build_priority_update(report: Report, dest: Destination, control_id: str) -> str | None:
    """An OMG^O19 change-order asking the RIS to make the report's order STAT (None without an
    order number to name it by)."""
    placer = escape(report.order_number(dest.ris.order_number))
    if not placer:
        return None
    msg = Message("OMG_O19", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    _msh(msg, dest, "OMG^O19^OMG_O19", control_id)
    _patient(msg.add_group("OMG_O19_PATIENT").pid, report)
    order = msg.add_group("OMG_O19_ORDER")
    order.orc.orc_1, order.orc.orc_2 = "XO", placer
    order.orc.orc_16 = "CRIT^Critical AI finding^99AINODE"
    order.add_group("OMG_O19_TIMING").tq1.tq1_9 = "S^Stat^HL70485"
    order.obr.obr_1, order.obr.obr_2 = "1", placer
    order.obr.obr_4 = (
        f"{escape(report.analysis or 'ai-analysis')}^{escape(report.algorithm or report.analysis)}^99AINODE"
    )
    msg.validate()
    return msg.to_er7()


def exchange(dest: Destination, message: str) -> str:
    """Send one message framed by MLLP and return the ACK's text (LinkDown when none comes)."""
    timeout = dest.ris.answer_timeout_s
    try:
        raw = socket.create_connection((dest.host, dest.port), timeout=timeout)
    except OSError as err:
        raise LinkDown(f"MLLP connection to {dest.host}:{dest.port} failed: {err}") from None
    with raw:
        conn: socket.socket = raw
        if dest.tls.enabled:
            conn = tls_context(dest).wrap_socket(raw, server_hostname=dest.host)
        try:
            conn.sendall(START + message.encode("utf-8") + END)
            answer = b""
            while END not in answer:
                chunk = conn.recv(65536)
                if not chunk:
                    raise LinkDown("the RIS closed the connection before its ACK")
                answer += chunk
        except (OSError, ssl.SSLError) as err:
            raise LinkDown(f"no ACK from {dest.host}:{dest.port}: {err}") from None
    return answer[answer.find(START) + 1 : answer.find(END)].decode("utf-8", errors="replace")


def ack_outcome(ack_text: str, control_id: str, attempts: int, dest: Destination) -> Outcome:
    """Delivered, retried or failed, by the ACK's MSA-1; the peer's text kept as the reason."""
    try:
        ack = parse_message(ack_text.replace("\n", "\r"), find_groups=False)
        code, acked = ack.msa.msa_1.value, ack.msa.msa_2.value
        text = ack.msa.msa_3.value if ack.msa.msa_3 else ""
        if not text and ack.children.get("ERR"):
            text = ack.children.get("ERR")[0].to_er7()
    except Exception as err:  # noqa: BLE001 - any unreadable answer is the peer's fault, reported as such
        return Outcome(PENDING, "bad-ack", f"unreadable ACK: {err}")
    if acked and acked != control_id:
        return Outcome(PENDING, code, f"ACK for another message ({acked})")
    if code in ("AA", "CA"):
        return Outcome(DELIVERED, code)
    reason = f"RIS answered {code}: {text}".strip()
    if code in ("AR", "CR") or attempts >= dest.ris.max_refusals:
        return Outcome(FAILED, code, reason)
    return Outcome(PENDING, code, reason)


def raise_priority(report: Report, dest: Destination, control_id: str) -> str:
    """Send the change-order after a critical ORU was accepted; what came of it, as a note on the
    delivered row (the report itself is delivered either way)."""
    try:
        message = build_priority_update(report, dest, control_id)
        if message is None:
            return "no order number: priority not raised"
        answer = ack_outcome(exchange(dest, message), control_id, dest.ris.max_refusals, dest)
    except LinkDown as err:
        return f"priority update not sent: {err}"
    except Exception as err:  # noqa: BLE001 - the report was delivered; the note says what failed
        return f"priority update not built: {type(err).__name__}: {err}"
    return "priority raised to STAT" if answer.result == DELIVERED else f"priority update refused: {answer.reason}"


def send_hl7_batch(
    dest: Destination, rows: list[Delivery], settings: Settings, progress: Progress | None = None
) -> dict[int, Outcome]:
    """The ``hl7`` sender: an ORU per SR row (critical ones first), one connection each, ACK awaited."""

    def send(row: Delivery, report: Report) -> Outcome:
        control_id = f"{row.id}-{row.attempts}"
        try:
            message = build_oru(report, dest, control_id)
        except Exception as err:  # noqa: BLE001 - this report cannot be expressed: say why, send the rest
            raise Unbuildable(f"ORU not built: {type(err).__name__}: {err}") from err
        outcome = ack_outcome(exchange(dest, message), control_id, row.attempts, dest)
        if outcome.result == DELIVERED and report.critical() and dest.ris.priority_update:
            outcome.reason = raise_priority(report, dest, f"{control_id}-P")
        return outcome

    return send_reports(rows, settings, progress, send)
