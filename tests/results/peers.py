"""Real peers for the delivery tests: Orthanc on free ports, and small pynetdicom SCPs."""

from __future__ import annotations

import base64
import json
import select
import socket
import ssl
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from tests.helpers import free_port, port_open, wait_for


@dataclass
class Orthanc:
    """An Orthanc PACS on loopback with its own configuration and storage in a temp folder."""

    workdir: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    # Known modalities (name -> (AE, port)), e.g. where Storage Commitment reports are sent.
    modalities: dict = field(default_factory=dict)
    # More configuration (e.g. LuaScripts), merged over the defaults.
    extra_config: dict = field(default_factory=dict)
    # The DICOMweb plugin (Debian's orthanc-dicomweb) at /dicom-web/.
    dicomweb: bool = False
    # HTTPS with a self-signed certificate made here (its own CA: ``ca_file``), terminated by a
    # ``TlsTerminator`` in front of Orthanc's HTTP port: Debian bookworm's Orthanc 1.10.1 with
    # libcivetweb1 1.15 crashes on the first HTTPS request when "SslEnabled" is set (a civetweb
    # worker calls a NULL function pointer), and a TLS proxy in front of Orthanc is also how it is
    # usually deployed.
    https: bool = False
    https_port: int = field(default_factory=free_port)
    _tls: "TlsTerminator | None" = None
    # Users for HTTP basic authentication (user -> password); none: no authentication.
    users: dict = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.workdir / "orthanc.crt"

    @property
    def base_url(self) -> str:
        if self.https:
            return f"https://127.0.0.1:{self.https_port}"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def key_file(self) -> Path:
        return self.workdir / "orthanc.key"

    def make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 (kept across restarts: the node trusts it)."""
        key = self.key_file
        if self.ca_file.exists():
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
            + ["-keyout", str(key), "-out", str(self.ca_file)],
            check=True,
            capture_output=True,
        )

    def write_config(self) -> Path:
        config = {
            "Name": "ainode-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomServerEnabled": True,
            "Plugins": [],
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "HttpDescribeErrors": True,
            "DicomModalities": {
                name: {"AET": aet, "Host": "127.0.0.1", "Port": port} for name, (aet, port) in self.modalities.items()
            },
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.dicomweb:
            config["Plugins"] = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.https:
            self.make_certificate()
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = dict(self.users)
        config.update(self.extra_config)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        return path

    def start(self) -> "Orthanc":
        config = self.write_config()
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(config)], stdout=log, stderr=subprocess.STDOUT)
        ok = wait_for(lambda: port_open(self.http_port) and port_open(self.dicom_port), timeout=60)
        assert ok, (self.workdir / "orthanc.log").read_text()[-2000:]
        if self.https and self._tls is None:
            self._tls = TlsTerminator(self.https_port, self.http_port, self.ca_file, self.key_file)
        return self

    def stop(self, keep_tls: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        wait_for(lambda: not port_open(self.dicom_port), timeout=30)
        if self._tls is not None and not keep_tls:
            self._tls.stop()
            self._tls = None

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.base_url + path)
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.https else None
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def instances(self) -> list[str]:
        return self.get_json("/instances")

    def instance_tags(self, orthanc_id: str) -> dict:
        return self.get_json(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")


class TlsTerminator:
    """HTTPS on ``port`` in front of a plain-HTTP server on ``target_port`` (loopback), like nginx.

    Each connection: TLS handshake, then bytes copied both ways until either side closes. With the
    server behind it down, the connection is closed after the handshake (as a proxy without an
    upstream does).
    """

    def __init__(self, port: int, target_port: int, certificate: Path, key: Path):
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certificate), str(key))
        self.listener = socket.create_server(("127.0.0.1", port))
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # e.g. a client that does not trust the certificate
            conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            tls.close()
            return
        with tls, upstream:
            self._pipe(tls, upstream)

    @staticmethod
    def _pipe(tls: ssl.SSLSocket, upstream: socket.socket) -> None:
        while True:
            readable = [tls] if tls.pending() else select.select([tls, upstream], [], [], 60)[0]
            if not readable:
                return
            for side in readable:
                other = upstream if side is tls else tls
                try:
                    data = side.recv(65536)
                    if not data:
                        return
                    other.sendall(data)
                except OSError:
                    return

    def stop(self) -> None:
        self._running = False
        self.listener.close()


class StoreSCP:
    """A pynetdicom storage SCP that answers statuses from a script, then Success.

    ``statuses`` is consumed one per C-STORE (e.g. [0xA700] = first answer Out of Resources).
    ``sop_classes`` limits what it accepts (others get their presentation context rejected).
    """

    def __init__(
        self, sop_classes: list[str], statuses: list[int] | None = None, aet: str = "TESTSCP", delay_s: float = 0.0
    ):
        self.port = free_port()
        self.delay_s = delay_s  # a slow PACS: time spent on each C-STORE before answering
        self.aet = aet
        self.statuses = list(statuses or [])
        self.received: list[str] = []
        self.answers: list[int] = []
        ae = AE(ae_title=aet)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server = None

    def _on_store(self, event):  # noqa: ANN001
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 0x0000
        self.answers.append(status)
        if status == 0x0000:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def start(self) -> "StoreSCP":
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()


class StowServer:
    """A minimal STOW-RS endpoint (POST /dicom-web/studies) answering a fixed status and DICOM JSON body.

    Only for the answers Orthanc cannot be made to give (503, 429, 202 and 409 with a Failed SOP
    Sequence); real delivery is tested against Orthanc's DICOMweb plugin.
    """

    def __init__(self, answer: int = 200, body: dict | None = None):
        self.port = free_port()
        self.answer = answer
        self.body = json.dumps(body or {}).encode()
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append(body)
                self.send_response(outer.answer)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
