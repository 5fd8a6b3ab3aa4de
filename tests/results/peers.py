"""Real peers for the delivery tests: Orthanc on free ports, and small pynetdicom SCPs."""

from __future__ import annotations

import json
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
        config.update(self.extra_config)
        path = self.workdir / "orthanc.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return path

    def start(self) -> "Orthanc":
        config = self.write_config()
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(config)], stdout=log, stderr=subprocess.STDOUT)
        ok = wait_for(lambda: port_open(self.http_port) and port_open(self.dicom_port), timeout=60)
        assert ok, (self.workdir / "orthanc.log").read_text()[-2000:]
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        wait_for(lambda: not port_open(self.dicom_port), timeout=30)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def instances(self) -> list[str]:
        return self.get_json("/instances")

    def instance_tags(self, orthanc_id: str) -> dict:
        return self.get_json(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")


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
    """A minimal STOW-RS endpoint (POST /dicom-web/studies) that keeps what it receives."""

    def __init__(self, answer: int = 200):
        self.port = free_port()
        self.answer = answer
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append(body)
                self.send_response(outer.answer)
                self.send_header("Content-Type", "application/dicom+json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
