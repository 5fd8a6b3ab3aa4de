"""The contract between the outbox and its senders: what one object's sending came to.

A sender raises ``LinkDown`` when the destination could not be reached at all; otherwise it
returns an ``Outcome`` per outbox row: delivered, retry (transient) or failed (permanent).
"""

from __future__ import annotations

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


# Called after each answered object, so its outcome is recorded at once.
Progress = Callable[[Delivery, Outcome], None]
Sender = Callable[[Destination, list[Delivery], Settings, "Progress | None"], dict[int, Outcome]]
