"""The RIS peers of the tests: python-hl7's MLLP server and Medplum's FHIR router (none written here)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp

from tests.helpers import free_port, wait_for

FHIR_SERVER = Path(__file__).resolve().parents[1] / "peers" / "fhir" / "server.cjs"


class MllpRis:
    """A RIS on MLLP: parses every message with python-hl7 and answers with ``ack_code``."""

    def __init__(self, port: int | None = None, ack_code: str = "AA", ack_text: str = ""):
        # Without a port the server binds port 0 when started and keeps the one the system gave:
        # a port found free and released could be taken by another program meanwhile. Only when
        # ``port`` is asked before the start (a RIS that is down first) is a free one chosen.
        self._port = port
        self.ack_code, self.ack_text = ack_code, ack_text
        self.messages: list[hl7.Message] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    @property
    def port(self) -> int:
        """The RIS's port (the one it was given, or got when it started)."""
        if self._port is None:  # asked before the start: the server will bind this one
            self._port = free_port()
        return self._port

    async def _answer(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(message)
                ack = message.create_ack(self.ack_code)
                if self.ack_text:  # MSA-3, the text message a RIS gives with a refusal
                    msa = str(ack.segment("MSA"))
                    ack = hl7.parse(str(ack).replace(msa, f"{msa}|{self.ack_text}"))
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await hl7.mllp.start_hl7_server(self._answer, host="127.0.0.1", port=self._port or 0, encoding="utf-8")
        async with server:
            self._port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def start(self) -> "MllpRis":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "MLLP server did not start"
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)


class FhirServer:
    """Medplum's FhirRouter with its in-memory repository behind a small Node HTTP server; every
    resource written is validated against the R4 StructureDefinitions (tests/peers/fhir)."""

    def __init__(self, log_dir: Path):
        self.port = 0  # the server binds port 0 and says which port it got ("fhir ready PORT")
        self.log_path = log_dir / "fhir-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    def start(self) -> "FhirServer":
        node = shutil.which("node")
        assert node, "node is not installed (scripts/install.sh --test installs the FHIR server's packages)"
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([node, str(FHIR_SERVER), str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        assert wait_for(lambda: "fhir ready" in self.log_path.read_text(), timeout=60), self.log_path.read_text()
        self.port = int(re.search(r"fhir ready (\d+)", self.log_path.read_text()).group(1))
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)

    def search(self, resource: str, **params: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.base}/{resource}?{query}", timeout=30) as response:
            bundle = json.loads(response.read())
        return [e["resource"] for e in bundle.get("entry", [])]

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """POST one resource; the stored resource (with its id)."""
        request = urllib.request.Request(
            f"{self.base}/{resource['resourceType']}",
            data=json.dumps(resource).encode(),
            method="POST",
            headers={"Content-Type": "application/fhir+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def read(self, reference: str) -> dict[str, Any]:
        """GET one resource by 'Type/id'."""
        with urllib.request.urlopen(f"{self.base}/{reference}", timeout=30) as response:
            return json.loads(response.read())

    def writes(self) -> list[dict[str, Any]]:
        """What reached the server (method, path, auth header, body), in order."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_log", timeout=30) as response:
            return [w for w in json.loads(response.read()) if w["method"] in ("POST", "PUT")]
