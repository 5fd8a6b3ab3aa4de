"""Who may use the admin API, and what of its use goes to the audit trail.

With ``api.token`` set every ``/api`` call needs ``Authorization: Bearer <token>``; with no token
the API answers loopback clients only and refuses every change (read-only). Refused tokens,
searches (throttled) and every change are audited.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time

from fastapi import HTTPException, Request

from node.core import audit
from node.core.settings import Settings

log = logging.getLogger("ainode.api")

QUERY_AUDIT_INTERVAL_S = 300.0


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


class Access:
    """Decides who may read and who may change, and audits authentication, searches and changes."""

    def __init__(self, settings: Settings):
        self.token = settings.api.token
        self._last_query: dict[tuple[str, str, str], float] = {}

    def client(self, request: Request) -> str:
        return request.client.host if request.client else ""

    def _token_ok(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def read(self, request: Request) -> str:
        """Dependency for reads: returns the user name recorded in audits."""
        address = self.client(request)
        if self.token:
            if not self._token_ok(request):
                audit.user_authentication(user="api-client", address=address, success=False)
                raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
            return "api-token"
        if not _is_loopback(address):
            raise HTTPException(403, "without api.token the API answers only on the local machine")
        return "local"

    def write(self, request: Request) -> str:
        """Dependency for changes: a token must be configured and presented."""
        if not self.token:
            raise HTTPException(403, "the API is read-only until api.token is configured")
        return self.read(request)

    def audit_query(self, user: str, address: str, text: str) -> None:
        """A search (DICOM Query message). The dashboard repeats the same search every few seconds:
        one message per client and search every QUERY_AUDIT_INTERVAL_S keeps the trail readable."""
        key, now = (user, address, text), time.monotonic()
        if now - self._last_query.get(key, -QUERY_AUDIT_INTERVAL_S) >= QUERY_AUDIT_INTERVAL_S:
            self._last_query[key] = now
            audit.query(user=user, address=address, text=text)

    def audit_action(self, request: Request, user: str, what: str, study_uids: list[str]) -> None:
        """A change made through the API (Security Alert, restricted function used)."""
        log.info("api action by %s: %s", user, what)
        audit.security_alert(
            audit.RESTRICTED_FUNCTION,
            user=user,
            address=self.client(request),
            detail=what,
            study_uids=[u for u in study_uids if u],
        )
