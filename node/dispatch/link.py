"""The contract between the outbox and its senders: what one object's sending came to.

A sender raises ``LinkDown`` when the destination could not be reached at all; otherwise it
returns an ``Outcome`` per outbox row: delivered, retry (transient) or failed (permanent).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Callable

from node.core.settings import Destination, Settings
from node.dispatch.table import Delivery


@dataclass
class Outcome:
    """What happened to one object: delivered, retry (transient) or failed (permanent)."""

    result: str  # DELIVERED | PENDING (retry) | FAILED
    status: str = ""
    reason: str = ""


class LinkDown(Exception):
    """The destination could not be reached or the association/request failed as a whole."""


def tls_context(dest: Destination) -> ssl.SSLContext:
    """A client TLS context for a destination: TLS 1.2 or newer, its CA and client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls.ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls.certificate and dest.tls.private_key:
        context.load_cert_chain(dest.tls.certificate, dest.tls.private_key)
    return context


def tls_failure(dest: Destination, timeout_s: float = 10.0) -> str | None:
    """Why a TLS handshake with the destination fails (e.g. its certificate is not trusted), or None.

    pynetdicom only logs the TLS error of a failed association; this handshake, made after one
    failed, names it in the outbox reason so the operator sees a certificate problem as such.
    """
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout_s) as raw:
            with tls_context(dest).wrap_socket(raw, server_hostname=dest.host):
                return None
    except ssl.SSLError as err:
        return f"TLS handshake failed: {err.reason or err}"
    except (OSError, ValueError):  # unreachable, or a TLS configuration that cannot load: said elsewhere
        return None


# Called after each answered object, so its outcome is recorded at once.
Progress = Callable[[Delivery, Outcome], None]
Sender = Callable[[Destination, list[Delivery], Settings, "Progress | None"], dict[int, Outcome]]
