"""Attacks on the wire (issue 19): lengths a peer only claims never become memory.

Each attack runs against a real node; the receiver process must answer as PS3.8/PS3.4 say, keep
its peak memory (VmHWM of the receiver process) far below what the peer claimed, stay the same
process, and keep serving a legitimate DCMTK storescu during and after the attack. The peak RSS
of each attack is printed (``pytest -s``) for docs/benchmarks.md.
"""

from __future__ import annotations

import io
import random
import socket
import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from node.ingest.wire import file_meta
from tests.helpers import NodeProcess, wait_for
from tests.receiver.conftest import index_count, settled, stored_files, storescu

CT = Path(get_testdata_file("CT_small.dcm"))
CLAIMED = 0x7FFFFFF0  # the PDU length the attacker claims: 2 GiB
RSS_LIMIT = 500 * 1024 * 1024
# A-ABORT, source service provider (2), reason invalid PDU parameter value (6): PS3.8 9.3.8.
ABORT_INVALID_PARAMETER = bytes.fromhex("07000000000400000206")


# --- the receiver process and its memory ----------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("PPid:"):
                if int(line.split()[1]) == pid:
                    found.append(int(status.parent.name))
                break
    return found


def receiver_pid(node: NodeProcess) -> int:
    """The node's receiver process: the child holding the listening DICOM socket."""
    port = f":{node.port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(port) and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for child in _children(node.proc.pid):
        if _open_files(child) & inodes:
            return child
    raise AssertionError("no receiver process holds the DICOM port")


def _open_files(pid: int) -> set[str]:
    """What the process's descriptors point at; one closed while listed is skipped, not the process."""
    links = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return links
    for fd in descriptors:
        try:
            links.add(fd.readlink().as_posix())
        except OSError:
            continue
    return links


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _report(what: str, before: int, after: int) -> None:
    print(f"\n[receiver under attack] {what}: peak RSS {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after")


def _still_serving(node: NodeProcess, pid: int) -> None:
    result = storescu(node, CT)
    assert result.returncode == 0 and "Received Store Response (Success)" in result.stderr, result.stderr[-2000:]
    assert receiver_pid(node) == pid, "the receiver process was replaced"


def _recv_all(sock: socket.socket, timeout: float = 60.0) -> bytes:
    """Everything the node sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _audit_text(node: NodeProcess) -> str:
    path = Path(node.config["audit"]["path"])
    return path.read_text(errors="replace") if path.exists() else ""


# --- 1. lengths claimed in PDU headers ------------------------------------------------------


def test_pdu_claiming_2gib_before_any_association_is_refused(node):
    pid = receiver_pid(node)
    before = peak_rss(pid)
    attackers = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(struct.pack(">BBI", 1, 0, CLAIMED) + b"\x00" * 65536)
        attackers.append(sock)
    _still_serving(node, pid)  # while the attackers' connections are open
    for sock in attackers:
        assert _recv_all(sock) == ABORT_INVALID_PARAMETER  # A-ABORT, then the connection closes
        sock.close()
    after = peak_rss(pid)
    _report("A-ASSOCIATE-RQ header claiming 2 GiB, 3 connections", before, after)
    assert after < RSS_LIMIT
    _still_serving(node, pid)
    assert f"PDU of type 0x01 claiming {CLAIMED} bytes from 127.0.0.1 refused" in node.log_text()
    assert wait_for(lambda: f"of {CLAIMED} bytes refused" in _audit_text(node), 30), "not audited"


def test_random_bytes_on_twenty_connections(node):
    pid = receiver_pid(node)
    before = peak_rss(pid)
    rng = random.Random(19)
    attackers = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", node.port))
        # A PDU type the node reads (1..7), then random bytes: a random length up to 4 GiB.
        sock.sendall(bytes([1 + i % 7]) + rng.randbytes(4095))
        attackers.append(sock)
    for sock in attackers:
        _recv_all(sock)  # the node answers (A-ABORT) and closes every one
        sock.close()
    after = peak_rss(pid)
    _report("random bytes, 20 connections", before, after)
    assert after < RSS_LIMIT
    _still_serving(node, pid)


def _associate(node: NodeProcess, contexts: list[tuple[str, str]]):
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, "association refused"
    return assoc


@pytest.mark.parametrize("pdu_type", [0x04, 0x05])
def test_pdu_over_the_limit_inside_an_association_is_aborted(node, pdu_type):
    """A P-DATA-TF over max_pdu_bytes (1 MiB), or a release request over 64 bytes."""
    pid = receiver_pid(node)
    before = peak_rss(pid)
    assoc = _associate(node, [(CTImageStorage, ExplicitVRLittleEndian)])
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBI", pdu_type, 0, CLAIMED) + b"\x00" * 65536)
    assert wait_for(lambda: assoc.is_aborted, 60), "the association was not aborted"
    after = peak_rss(pid)
    _report(f"PDU type 0x{pdu_type:02X} claiming 2 GiB inside an association", before, after)
    assert after < RSS_LIMIT
    assert f"PDU of type 0x{pdu_type:02X} claiming {CLAIMED} bytes from 127.0.0.1 refused" in node.log_text()
    _still_serving(node, pid)  # its association slot was given back too
    assert wait_for(lambda: f"of {CLAIMED} bytes refused" in _audit_text(node), 30), "not audited"


def test_pdata_just_over_max_pdu_is_aborted_and_at_max_is_served(tmp_path):
    with NodeProcess(tmp_path / "n", {"node": {"max_pdu_bytes": 16384}}) as node:
        pid = receiver_pid(node)
        assoc = _associate(node, [(CTImageStorage, ExplicitVRLittleEndian)])
        body = b"\x00" * (16384 + 7)  # one byte past the limit and its 6 bytes of slack
        assoc.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0, len(body)) + body)
        assert wait_for(lambda: assoc.is_aborted, 60), "the association was not aborted"
        assert "PDU of type 0x04 claiming 16391 bytes from 127.0.0.1 refused (limit 16390)" in node.log_text()
        _still_serving(node, pid)  # storescu sends PDUs up to the announced 16 KiB


# --- 3. a deflate bomb ----------------------------------------------------------------------

BOMB_PIXELS = 2 * 1024**3  # the bomb's Pixel Data: 2 GiB of zeros


@pytest.fixture(scope="module")
def deflate_bomb(tmp_path_factory) -> tuple[Path, str]:
    """A Deflated Explicit VR Little Endian CT of about 2 MB that inflates to 2 GiB."""
    from pynetdicom.dsutils import encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(CT)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [deflater.compress(encode(ds, False, True))]
    out.append(deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, BOMB_PIXELS)))
    zeros = bytes(64 * 1024 * 1024)
    for _ in range(BOMB_PIXELS // len(zeros)):
        out.append(deflater.compress(zeros))
    out.append(deflater.flush())
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    meta = file_meta(CTImageStorage, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, "ATTACKER")
    path.write_bytes(meta + b"".join(out))
    return path, ds.SOPInstanceUID


def _send_file(node: NodeProcess, path: Path, sop_class: str, syntax: str) -> int | None:
    """C-STORE a file's data set as it is on disk (pynetdicom never inflates it)."""
    from pynetdicom import _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = _associate(node, [(sop_class, syntax)])
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return getattr(status, "Status", None)


def test_deflate_bomb_over_max_instance_bytes_is_a700(tmp_path, deflate_bomb):
    path, _ = deflate_bomb
    assert path.stat().st_size < 4 * 1024 * 1024
    with NodeProcess(tmp_path / "n", {"node": {"max_instance_bytes": "256MiB"}}) as node:
        pid = receiver_pid(node)
        before = peak_rss(pid)
        assert _send_file(node, path, CTImageStorage, DeflatedExplicitVRLittleEndian) == 0xA700
        after = peak_rss(pid)
        _report("deflate bomb (2 MB inflating to 2 GiB), limit 256 MiB", before, after)
        assert after < RSS_LIMIT
        assert "refused (A700): data set inflates to more than" in node.log_text()
        assert stored_files(node) == [], "a file was left in the store"
        assert index_count(node) == 0
        _still_serving(node, pid)


def test_deflate_bomb_under_max_instance_bytes_keeps_memory_flat(tmp_path, deflate_bomb):
    """With the default limit (4 GiB) the bomb is a valid instance: stored, inflated on disk."""
    path, _ = deflate_bomb
    with NodeProcess(tmp_path / "n") as node:
        pid = receiver_pid(node)
        before = peak_rss(pid)
        assert _send_file(node, path, CTImageStorage, DeflatedExplicitVRLittleEndian) == 0x0000
        after = peak_rss(pid)
        _report("deflate bomb (2 MB inflating to 2 GiB), default limit 4 GiB: stored", before, after)
        assert after < RSS_LIMIT
        settled(node)
        _still_serving(node, pid)


# --- Lower: a SOP class that is not its presentation context's --------------------------------


def test_sop_class_differing_from_the_presentation_context_is_0122(node):
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(CT)
    ds.SOPClassUID = MRImageStorage  # the data set agrees with the command: only the context differs
    ds.SOPInstanceUID = generate_uid()
    assoc = _associate(node, [(CTImageStorage, ExplicitVRLittleEndian)])
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = MRImageStorage
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = io.BytesIO(encode(ds, False, True))
        # As send_c_store does: pause the association's reactor, send, wait for the answer.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0x0122
    finally:
        assoc.release()
    assert "instance refused (0122)" in node.log_text()
    assert stored_files(node) == []
    assert index_count(node) == 0


def test_inflation_is_bounded_and_spills_to_scratch(tmp_path, monkeypatch):
    """read_header itself: the limit is exact, and past the in-memory size a scratch file is used."""
    import tempfile

    from pynetdicom.dsutils import encode

    from node.ingest import wire

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(CT)
    raw = encode(ds, False, True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = memoryview(deflater.compress(raw) + deflater.flush())
    with pytest.raises(wire.TooLarge):
        wire.read_header(deflated, DeflatedExplicitVRLittleEndian, len(raw) - 1)
    assert wire.read_header(deflated, DeflatedExplicitVRLittleEndian, len(raw)).SOPInstanceUID == ds.SOPInstanceUID
    scratches = []

    def scratch():
        scratches.append(tempfile.TemporaryFile(dir=tmp_path))
        return scratches[-1]

    monkeypatch.setattr(wire, "_INFLATE_IN_MEMORY", 1024)
    monkeypatch.setattr(wire, "_INFLATE_STEP", 1000)
    header = wire.read_header(deflated, DeflatedExplicitVRLittleEndian, len(raw), scratch)
    assert header.SOPInstanceUID == ds.SOPInstanceUID and header.PatientID == ds.PatientID
    assert len(scratches) == 1 and scratches[0].closed
    assert list(tmp_path.iterdir()) == []
