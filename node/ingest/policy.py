"""Association policy: who may associate (peer addresses), how many at once (shared across
receiver processes), how many connections may wait to associate, and the listener's TLS context."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import Any, Callable

from node.core.settings import Peer, Settings, TLSSettings


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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def listed_networks(peers: list[Peer]) -> list[IPNetwork]:
    """The IP addresses and networks the peers list (host names left out: no look-up per connection)."""
    networks = []
    for peer in peers:
        for pattern in peer.hosts:
            try:
                networks.append(ipaddress.ip_network(pattern, strict=False))
            except ValueError:
                continue
    return networks


class PendingConnections:
    """Connections accepted but not yet associated, counted apart from the association slots.

    A connection is pending from accept until its A-ASSOCIATE-RQ is accepted (``settle``), or
    until it closes. At most ``per_address`` are pending from one address, and at most
    ``total`` from addresses that no peer lists (``known``): strangers stalling from many
    addresses cannot keep a configured peer's address out. One per receiver process. The ARTIM
    timer closes every pending connection; an entry older than ``expire_s`` is one whose end
    was never reported, and is forgotten so that no count can leak.
    """

    def __init__(
        self,
        per_address: int,
        total: int,
        known: list[IPNetwork],
        expire_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_address, self.total, self.expire_s = per_address, total, expire_s
        self._known = known
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], tuple[float, bool]] = {}  # in accept order
        self._by_address: dict[str, int] = {}
        self._strangers = 0

    def known(self, address: str) -> bool:
        """True when a peer lists this address (by IP address or network)."""
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self._known)

    def admit(self, address: str, port: int) -> str | None:
        """Count a new connection as pending: None, or why it must be closed ("address", "total")."""
        known = self.known(address)
        with self._lock:
            self._expire()
            if self._by_address.get(address, 0) >= self.per_address:
                return "address"
            if not known and self._strangers >= self.total:
                return "total"
            self._entries[(address, port)] = (self._clock(), known)
            self._by_address[address] = self._by_address.get(address, 0) + 1
            self._strangers += not known
        return None

    def settle(self, address: str, port: int) -> None:
        """The connection associated or closed: no longer pending (repeated calls do nothing)."""
        with self._lock:
            self._drop((address, port))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _drop(self, key: tuple[str, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        left = self._by_address[key[0]] - 1
        if left:
            self._by_address[key[0]] = left
        else:
            del self._by_address[key[0]]
        self._strangers -= not entry[1]

    def _expire(self) -> None:
        oldest = self._clock() - self.expire_s
        while self._entries:
            key, (since, _) = next(iter(self._entries.items()))
            if since > oldest:
                return
            self._drop(key)


class ReportThrottle:
    """At most one report per key and interval (a flood must not flood the log and the audit
    trail too); counts the reports it held back."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[Any, tuple[float, int]] = {}  # key -> (when the next report is due, held back)

    def due(self, key: Any) -> int | None:
        """None: hold this one back; else report it, with the number held back since the last."""
        now = self._clock()
        with self._lock:
            if len(self._held) > 4096:  # many keys (a spread flood): forget those whose time passed
                self._held = {k: v for k, v in self._held.items() if v[0] > now}
            next_due, held = self._held.get(key, (0.0, 0))
            if now < next_due:
                self._held[key] = (next_due, held + 1)
                return None
            self._held[key] = (now + self.interval_s, 0)
            return held


def address_allowed(address: str, patterns: list[str]) -> bool:
    """True when ``address`` matches one of a peer's hosts (IP, CIDR network or host name)."""
    ip = _ip(address)
    if ip is None:
        return False
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
    """The DICOM listener's TLS context (TLS 1.2 or newer; client certificates when configured)."""
    return server_tls_context(settings.node.tls)


def server_tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """A server TLS context (TLS 1.2 or newer; client certificates when configured), None when
    TLS is off; raises OSError (ssl.SSLError among them) when a file cannot be read or used."""
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        ctx.load_verify_locations(str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return ctx
