"""Association policy: who may associate (peer addresses), how many at once (shared across
receiver processes), and the listener's TLS context."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import Any

from node.core.settings import Peer, Settings


class AssociationSlots:
    """Association counts shared by every receiver process (total and per peer).

    A flat shared int array, one row per receiver process and one column per peer (plus one for
    unknown peers and one for the total). Each process writes only its own row, so the service
    can zero the row of a receiver that died without knowing what it held.
    """

    def __init__(self, array: Any, processes: int, peers: list[Peer]):
        self._array = array
        self._columns = len(peers) + 2  # peers..., unknown, total
        self.processes = processes

    @classmethod
    def create(cls, ctx: Any, processes: int, peers: list[Peer]) -> "AssociationSlots":
        """Allocate the shared counters (before forking the receivers)."""
        return cls(ctx.Array("i", processes * (len(peers) + 2)), processes, peers)

    def _sum(self, column: int) -> int:
        return sum(self._array[r * self._columns + column] for r in range(self.processes))

    def acquire(self, row: int, column: int, peer_limit: int, total_limit: int) -> str | None:
        """Take a slot; returns None, or why not ("total", "peer")."""
        with self._array.get_lock():
            if self._sum(self._columns - 1) >= total_limit:
                return "total"
            if self._sum(column) >= peer_limit:
                return "peer"
            self._array[row * self._columns + column] += 1
            self._array[row * self._columns + self._columns - 1] += 1
        return None

    def release(self, row: int, column: int) -> None:
        """Give a slot back when its association ends."""
        with self._array.get_lock():
            self._array[row * self._columns + column] -= 1
            self._array[row * self._columns + self._columns - 1] -= 1

    def clear_row(self, row: int) -> None:
        """Forget everything a (dead) receiver process held."""
        with self._array.get_lock():
            for c in range(self._columns):
                self._array[row * self._columns + c] = 0

    def total(self) -> int:
        """Associations open now across every receiver."""
        with self._array.get_lock():
            return self._sum(self._columns - 1)


def address_allowed(address: str, patterns: list[str]) -> bool:
    """True when ``address`` matches one of a peer's hosts (IP, CIDR network or host name)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for pattern in patterns:
        try:
            if ip in ipaddress.ip_network(pattern, strict=False):
                return True
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(pattern, None)
        except OSError:
            continue
        if any(ipaddress.ip_address(info[4][0]) == ip for info in infos):
            return True
    return False


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context (TLS 1.2 or newer; client certificates when configured)."""
    tls = settings.node.tls
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        ctx.load_verify_locations(str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx
