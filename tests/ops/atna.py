"""What an IHE ATNA Audit Record Repository does with the node's messages, for the tests: the
DICOM audit message schema (PS3.15 A.5.1, ``audit_message.rng``) and an RFC 5425 syslog
receiver over TLS that parses the octet-counted frames and the RFC 5424 header."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lxml import etree

SCHEMA = Path(__file__).with_name("audit_message.rng")
# RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA [MSG]
HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    rb"(?P<sd>-|\[.*?\]) (?P<msg>.*)",
    re.DOTALL,
)
BOM = b"\xef\xbb\xbf"


@cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def schema_errors(xml: str | bytes) -> list[str]:
    """Why ``xml`` is not a valid DICOM audit message ([] when it is)."""
    schema = _schema()
    try:
        document = etree.fromstring(xml.encode("utf-8") if isinstance(xml, str) else xml)
    except etree.XMLSyntaxError as err:
        return [f"not XML: {err}"]
    if schema.validate(document):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]


def assert_valid(xml: str | bytes) -> etree._Element:
    """The parsed message; fails with the schema's reasons when it is not valid."""
    errors = schema_errors(xml)
    assert errors == [], f"{errors}\n{xml!r}"
    return etree.fromstring(xml.encode("utf-8") if isinstance(xml, str) else xml)


@dataclass
class SyslogMessage:
    """One RFC 5424 message as received."""

    pri: int
    hostname: str
    app: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes  # the MSG without its BOM

    @classmethod
    def parse(cls, data: bytes) -> "SyslogMessage":
        match = HEADER.fullmatch(data)
        assert match, f"not an RFC 5424 message: {data[:200]!r}"
        msg = match["msg"]
        assert msg.startswith(BOM), "a UTF-8 MSG starts with the BOM (RFC 5424 6.4)"
        return cls(
            int(match["pri"]),
            match["hostname"].decode(),
            match["app"].decode(),
            match["procid"].decode(),
            match["msgid"].decode(),
            match["sd"].decode(),
            msg[len(BOM) :],
        )


def read_frames(conn: ssl.SSLSocket, on_frame) -> None:  # noqa: ANN001
    """RFC 5425 octet counting: ``MSG-LEN SP SYSLOG-MSG``, until the connection ends."""
    buffer = b""
    while True:
        while b" " not in buffer[:12]:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk
        length_text, _, buffer = buffer.partition(b" ")
        assert length_text.isdigit() and not length_text.startswith(b"0"), f"bad MSG-LEN {length_text!r}"
        length = int(length_text)
        while len(buffer) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return  # a frame cut short: the sender resends it whole
            buffer += chunk
        on_frame(buffer[:length])
        buffer = buffer[length:]


class TlsSyslogReceiver:
    """An RFC 5425 collector on 127.0.0.1:port: TLS with its certificate, and when ``client_ca``
    is given it requires a client certificate signed by that CA (mutual TLS)."""

    def __init__(self, port: int, certificate: Path, key: Path, client_ca: Path | None = None):
        self.port = port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certificate), str(key))
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(str(client_ca))
        self.frames: list[bytes] = []
        self.connections = 0
        self.handshake_failures = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def start(self) -> "TlsSyslogReceiver":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            with self._lock:
                self.handshake_failures += 1
            raw.close()
            return
        with self._lock:
            self.connections += 1
            self._open.append(conn)
        try:
            read_frames(conn, self._frame)
        except OSError:
            pass
        finally:
            conn.close()

    def _frame(self, frame: bytes) -> None:
        with self._lock:
            self.frames.append(frame)

    def messages(self) -> list[SyslogMessage]:
        """Every message received so far, parsed."""
        with self._lock:
            frames = list(self.frames)
        return [SyslogMessage.parse(f) for f in frames]

    def audit_messages(self) -> list[str]:
        """The XML of every message received so far."""
        return [m.msg.decode("utf-8") for m in self.messages()]

    def stop(self) -> None:
        """Close the listening socket and every open connection (the collector goes away)."""
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone leaves the port listening
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            try:  # the TCP connection itself, under the reading thread's TLS
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
