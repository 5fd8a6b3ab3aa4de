"""Stalled strangers (issue 19, item 2): half an A-ASSOCIATE-RQ must not hold the node.

A connection is *pending* from accept until its A-ASSOCIATE-RQ is accepted. Pending connections
have their own limits (per address, and in total for addresses no configured peer lists),
apart from the association slots; the ARTIM timer closes those that do not complete their
request in time, and every read of an established association has a deadline too.

The attackers connect from other loopback addresses (127.0.0.2 and up) than the legitimate
DCMTK peers (127.0.0.1, the configured peers' address). Nothing here bounds wall-clock time
beyond generous waits: the node must close, or keep open, what it is asked to.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.helpers import NodeProcess, wait_for
from tests.receiver.conftest import echoscu, storescu
from tests.receiver.test_wire_attacks import _audit_text, peak_rss, receiver_pid

CT = Path(get_testdata_file("CT_small.dcm"))


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(calling: bytes = b"STRANGER", called: bytes = b"AINODE") -> bytes:
    """A complete A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2")
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + user
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


def stall(node: NodeProcess, source: str, count: int, sent: int = 20) -> list[socket.socket]:
    """``count`` connections from ``source`` that send the first ``sent`` bytes of an
    A-ASSOCIATE-RQ and then nothing."""
    head = associate_rq()[:sent]
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", node.port), source_address=(source, 0))
        sock.sendall(head)
        socks.append(sock)
    return socks


def closed_by_node(sock: socket.socket) -> bool:
    """True once the node has closed the connection (end of stream or reset), without waiting."""
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True


def count_closed(socks: list[socket.socket]) -> int:
    return sum(closed_by_node(s) for s in socks)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _legitimate_peers_served(node: NodeProcess) -> None:
    stored = storescu(node, CT)
    assert stored.returncode == 0 and "Received Store Response (Success)" in stored.stderr, stored.stderr[-2000:]
    echoed = echoscu(node)
    assert echoed.returncode == 0 and "Received Echo Response (Success)" in echoed.stderr, echoed.stderr[-2000:]


def test_ninety_stalled_strangers_do_not_starve_known_peers(tmp_path):
    """The issue's attack: 90 half requests held open; storescu and echoscu still associate.

    The pending limits are set above 90 here, so all 90 stay open while the DCMTK peers work
    (before the fix, pynetdicom counted them as associations: "Local Limit Exceeded").
    """
    config = {"node": {"artim_timeout_s": 600, "max_pending_connections": 100, "max_pending_per_address": 10}}
    with NodeProcess(tmp_path / "n", config) as node:
        pid = receiver_pid(node)
        before = peak_rss(pid)
        attackers = []
        for i in range(9):
            attackers += stall(node, f"127.0.0.{2 + i}", 10)
        try:
            _legitimate_peers_served(node)
            assert count_closed(attackers) == 0, "the stalled connections were not held: not the attack"
        finally:
            close_all(attackers)
        # docs/benchmarks.md "Receiver under attack" (pytest -s shows it).
        print(f"90 stalled half A-ASSOCIATE-RQs: receiver peak RSS {before >> 20} -> {peak_rss(pid) >> 20} MiB")


def test_stalled_strangers_from_many_addresses_cannot_lock_out_a_peer_address(tmp_path):
    """Default limits: 8 pending per address, 64 in total for unlisted addresses. 90 strangers
    from 10 addresses fill the total; the configured peers' address (127.0.0.1) still gets in."""
    with NodeProcess(tmp_path / "n", {"node": {"artim_timeout_s": 600}}) as node:
        attackers = []
        for i in range(10):
            attackers += stall(node, f"127.0.0.{2 + i}", 9)
        try:
            # 10 refused by the per-address limit, 16 more by the total: closed at once.
            assert wait_for(lambda: count_closed(attackers) == 26, 60), count_closed(attackers)
            _legitimate_peers_served(node)
            assert count_closed(attackers) == 26, "pending connections were dropped, not held"
        finally:
            close_all(attackers)
        log = node.log_text()
        assert "pending connection from 127.0.0.2 refused: per-address limit (8) reached" in log
        assert "refused: pending connection limit (64) reached" in log
        assert wait_for(lambda: "pending connection limit" in _audit_text(node), 30), "not audited"


def test_per_address_limit_refuses_extra_pending_connections(tmp_path):
    config = {"node": {"artim_timeout_s": 600, "max_pending_per_address": 4}}
    with NodeProcess(tmp_path / "n", config) as node:
        crowd = stall(node, "127.0.0.5", 10)
        other = stall(node, "127.0.0.6", 4)
        try:
            assert wait_for(lambda: count_closed(crowd) == 6, 60), count_closed(crowd)
            assert count_closed(other) == 0  # the limit is per address
            _legitimate_peers_served(node)
            assert count_closed(crowd) == 6 and count_closed(other) == 0
        finally:
            close_all(crowd + other)
        assert "pending connection from 127.0.0.5 refused: per-address limit (4) reached" in node.log_text()
        assert wait_for(lambda: "per-address limit" in _audit_text(node), 30), "not audited"
        # The peer closed them: their places are given back (ARTIM is 600 s, nothing expired).
        assert wait_for(lambda: _four_held(node), 60), "closed connections still count as pending"


def _four_held(node: NodeProcess) -> bool:
    """Four new half requests from 127.0.0.5 are all held open (none refused at once)."""
    socks = stall(node, "127.0.0.5", 4)
    try:
        time.sleep(0.5)
        return count_closed(socks) == 0
    finally:
        close_all(socks)


def test_stalled_connections_are_closed_when_artim_expires(tmp_path):
    """ARTIM runs from accept: half a request, or one byte at a time, is closed when it expires,
    and the pending places and the receiver's threads are given back."""
    config = {"node": {"artim_timeout_s": 2, "max_pending_per_address": 30}}
    with NodeProcess(tmp_path / "n", config) as node:
        pid = receiver_pid(node)
        baseline = threads(pid)
        stalled = stall(node, "127.0.0.7", 20)
        stalled += stall(node, "127.0.0.7", 5, sent=3)  # not even a whole PDU header
        dripping = socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.8", 0))
        rq = associate_rq()
        try:
            # One byte every 0.3 s: each read gets data, only a deadline from accept ends it.
            for byte in rq[:-1]:
                try:
                    dripping.sendall(bytes([byte]))
                except OSError:
                    break
                if closed_by_node(dripping):
                    break
                time.sleep(0.3)
            assert closed_by_node(dripping), "a request sent one byte at a time held its connection"
            assert wait_for(lambda: count_closed(stalled) == len(stalled), 120), count_closed(stalled)
        finally:
            close_all([*stalled, dripping])
        assert wait_for(lambda: threads(pid) <= baseline, 120), (threads(pid), baseline)
        assert node.log_text().count("no A-ASSOCIATE-RQ within 2 s (ARTIM): connection closed") >= len(stalled)
        # Their pending places were given back: the same address may stall 30 again, none refused.
        again = stall(node, "127.0.0.7", 30)
        close_all(again)
        assert "pending connection from 127.0.0.7 refused" not in node.log_text()
        _legitimate_peers_served(node)


def test_half_a_pdu_inside_an_association_is_aborted_at_the_network_timeout(tmp_path):
    """An established association whose peer stops in the middle of a PDU: the read has a
    deadline (network_timeout_s), the association ends and its slot is given back."""
    config = {"node": {"network_timeout_s": 2, "max_associations": 1}}
    with NodeProcess(tmp_path / "n", config) as node:
        from pynetdicom import AE

        ae = AE(ae_title="PYNETDICOM")
        ae.network_timeout = None  # only the node may end this association
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBI", 0x04, 0, 1000) + b"\x00" * 10)  # 10 of 1000 bytes
        assert wait_for(lambda: not assoc.is_established, 120), "the stalled association was kept"
        assert "network timeout" in node.log_text()
        _legitimate_peers_served(node)  # the only association slot was given back


def test_pending_connections_counts_settles_and_forgets():
    """The pending counts themselves: per address, strangers in total, peers' addresses apart,
    given back when settled, forgotten when their end was never reported."""
    import ipaddress

    from node.ingest.policy import PendingConnections

    now = [0.0]
    pending = PendingConnections(2, 3, [ipaddress.ip_network("10.0.0.0/24")], expire_s=30, clock=lambda: now[0])
    assert [pending.admit("192.0.2.1", p) for p in (1, 2, 3)] == [None, None, "address"]
    assert pending.admit("192.0.2.2", 1) is None
    assert pending.admit("192.0.2.3", 1) == "total"  # three strangers pending
    assert pending.admit("10.0.0.7", 1) is None  # a peer's network: only its per-address limit
    assert pending.admit("::ffff:10.0.0.8", 1) is None
    pending.settle("192.0.2.1", 1)
    pending.settle("192.0.2.1", 1)  # twice: counted once
    assert pending.admit("192.0.2.1", 4) is None
    assert pending.admit("192.0.2.1", 5) == "address"
    assert len(pending) == 5
    now[0] = 31.0  # nothing was settled: the ARTIM timer closed them long ago
    assert pending.admit("192.0.2.1", 6) is None
    assert len(pending) == 1
