"""Who may use the admin API, from where, and what of its use goes to the audit trail.

- **Host check** (DNS rebinding): every request must name this node in its Host header:
  localhost, 127.0.0.1, [::1], the listen address or one of ``api.allowed_hosts``; any other
  name is answered 421 before any route runs.
- **Token**: every ``/api`` call except ``/api/health`` needs the token, as
  ``Authorization: Bearer <token>`` or as the dashboard's session cookie. The token is
  ``api.token``, else one the node generated at its first start into ``<storage>/api-token``
  (mode 0600; the log names the file, never the value).
- **Sessions**: the dashboard exchanges the token for an HttpOnly, SameSite=Strict cookie
  (``POST /api/session`` with the bearer token, or ``/dashboard/?token=...`` once).
- **Cross-site requests**: a change (POST, PUT, PATCH, DELETE) made with the cookie must carry
  ``X-Requested-With: ainode`` (a header a cross-site form cannot send, and cross-site scripts
  only after a CORS preflight this API never grants) and must not come from another origin
  (``Origin``, ``Sec-Fetch-Site``). Bearer-token requests carry no ambient credential and are
  not checked.

Refused tokens, logins, searches (throttled) and every change are audited.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from node.core import audit
from node.core.settings import Settings

log = logging.getLogger("ainode.api")

QUERY_AUDIT_INTERVAL_S = 300.0
TOKEN_FILE = "api-token"
SESSION_COOKIE = "ainode_session"
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 1000
CSRF_HEADER, CSRF_VALUE = "x-requested-with", "ainode"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
REFUSED_HOST_LOG_INTERVAL_S = 60.0


# --- the token --------------------------------------------------------------------------------


def token_path(settings: Settings) -> Path:
    """Where the generated API token is kept: ``api-token`` in the storage folder."""
    return Path(settings.storage.path) / TOKEN_FILE


def read_api_token(settings: Settings) -> str:
    """The API token for a client on this machine (CLI, demo): ``api.token``, else the generated
    one. Raises FileNotFoundError when the node has not generated it yet."""
    if settings.api.token:
        return settings.api.token
    path = token_path(settings)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        # Someone loosened it: the token reads patient images, so only its owner may read it.
        log.warning("the API token file %s was readable by others; set back to mode 0600", path)
        os.chmod(path, 0o600)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"the API token file {path} is empty")
    return token


def ensure_api_token(settings: Settings) -> str:
    """``api.token``, else the generated token, generated now (0600, written atomically) when
    the storage folder has none yet."""
    if settings.api.token:
        return settings.api.token
    path = token_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        spare = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(spare, path)  # never replaces a token another process wrote first
            log.info("generated the admin API token into %s (mode 0600)", path)
        except FileExistsError:
            pass
        finally:
            spare.unlink()
    return read_api_token(settings)


# --- the Host header --------------------------------------------------------------------------


def allowed_host_names(settings: Settings) -> frozenset[str]:
    """Host names the API answers to: loopback names, the listen address, ``api.allowed_hosts``."""
    names = set(LOOPBACK_NAMES) | set(settings.api.allowed_hosts)
    if settings.api.host not in WILDCARD_ADDRESSES:
        names.add(settings.api.host.lower().strip("[]"))
    return frozenset(names)


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets or trailing dot, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


def host_allowed(name: str, allowed: frozenset[str]) -> bool:
    """True when the name is allowed, exactly or under an allowed ``*.domain``."""
    if name in allowed:
        return True
    return any(a.startswith("*.") and name.endswith(a[1:]) and len(name) > len(a) - 1 for a in allowed)


class HostCheck:
    """ASGI middleware: refuse (421) every HTTP request whose Host header names another site."""

    def __init__(self, app: Any, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed
        self._last_log = -REFUSED_HOST_LOG_INTERVAL_S
        self._refused = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if not host_allowed(name, self.allowed):
                self._note_refusal()
                response = JSONResponse({"detail": "this node does not answer to that host name"}, status_code=421)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _note_refusal(self) -> None:
        # A rebinding page may retry in a loop: one log line a minute, with the count.
        self._refused += 1
        now = time.monotonic()
        if now - self._last_log >= REFUSED_HOST_LOG_INTERVAL_S:
            log.warning(
                "refused %d API request(s) naming a host not in api.allowed_hosts (DNS rebinding?)", self._refused
            )
            self._last_log, self._refused = now, 0


# --- who is asking ----------------------------------------------------------------------------


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site or origin."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


class Access:
    """Decides who may read and change, keeps the dashboard's sessions, and audits
    authentication, searches and changes."""

    def __init__(self, token: str):
        self.token = token
        self._sessions: dict[str, float] = {}
        self._lock = threading.Lock()
        self._last_query: dict[tuple[str, str, str], float] = {}

    def client(self, request: Request) -> str:
        return request.client.host if request.client else ""

    def refused(self, request: Request, why: str) -> HTTPException:
        """An audited refusal (401) for a missing or wrong token."""
        audit.user_authentication(user="api-client", address=self.client(request), success=False)
        return HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})

    def _bearer(self, request: Request) -> bool | None:
        """None without an Authorization header, else whether it carries the token."""
        given = request.headers.get("authorization")
        if given is None:
            return None
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def _session(self, request: Request) -> str | None:
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            expires = self._sessions.get(sid)
            if expires is not None and expires < time.monotonic():
                del self._sessions[sid]
                expires = None
        return sid if expires is not None else None

    def _authenticate(self, request: Request, changing: bool) -> str:
        bearer = self._bearer(request)
        if bearer:
            return "api-token"
        if bearer is False:
            raise self.refused(request, "a valid bearer token is required")
        if self._session(request) is None:
            raise self.refused(request, "a valid bearer token or a dashboard login is required")
        if changing and not (request.headers.get(CSRF_HEADER) == CSRF_VALUE and _same_origin(request)):
            audit.security_alert(
                audit.RESTRICTED_FUNCTION,
                user="dashboard",
                address=self.client(request),
                detail=f"cross-site request refused: {request.method} {request.url.path}",
                outcome=audit.MINOR_FAILURE,
            )
            raise HTTPException(403, "cross-site request refused: changes need the X-Requested-With header")
        return "dashboard"

    def read(self, request: Request) -> str:
        """Dependency of every route that shows data: returns the user name recorded in audits.
        A route answering POST and the like is treated as a change whatever its dependency."""
        return self._authenticate(request, changing=request.method not in SAFE_METHODS)

    def write(self, request: Request) -> str:
        """Dependency of every route that changes something."""
        return self._authenticate(request, changing=True)

    # --- the dashboard's sessions ---------------------------------------------------------------

    def login(self, request: Request, response: Response) -> str:
        """Exchange the bearer token for a session cookie (HttpOnly, SameSite=Strict)."""
        if not self._bearer(request):
            raise self.refused(request, "a valid bearer token is required")
        if not _same_origin(request):
            raise HTTPException(403, "cross-site login refused")
        self.start_session(request, response)
        return "dashboard"

    def start_session(self, request: Request, response: Response) -> None:
        """Open a session for a client that proved it holds the token; set its cookie."""
        sid, now = secrets.token_urlsafe(32), time.monotonic()
        with self._lock:
            for old in [k for k, v in self._sessions.items() if v < now]:
                del self._sessions[old]
            if len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=self._sessions.__getitem__)]
            self._sessions[sid] = now + SESSION_TTL_S
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=int(SESSION_TTL_S),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        audit.user_authentication(user="dashboard", address=self.client(request), success=True)

    def token_ok(self, value: str) -> bool:
        """Whether a token given some other way (the dashboard's ``?token=``) is the token."""
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def logout(self, request: Request, response: Response) -> None:
        """End the request's session (if any) and clear its cookie."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            self._sessions.pop(sid, None)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")

    # --- audit ----------------------------------------------------------------------------------

    def audit_query(self, user: str, address: str, text: str) -> None:
        """A search (DICOM Query message). The dashboard repeats the same search every few seconds:
        one message per client and search every QUERY_AUDIT_INTERVAL_S keeps the trail readable."""
        key, now = (user, address, text), time.monotonic()
        if now - self._last_query.get(key, -QUERY_AUDIT_INTERVAL_S) >= QUERY_AUDIT_INTERVAL_S:
            self._last_query[key] = now
            audit.query(user=user, address=address, text=text)

    def audit_access(self, user: str, address: str, study_uid: str, patient: audit.PatientIdentity | None) -> None:
        """A user viewing a study's images (DICOM Instances Accessed), once per client and study
        every QUERY_AUDIT_INTERVAL_S: the study page loads its key slices one by one."""
        key, now = (user, address, "accessed " + study_uid), time.monotonic()
        if now - self._last_query.get(key, -QUERY_AUDIT_INTERVAL_S) >= QUERY_AUDIT_INTERVAL_S:
            self._last_query[key] = now
            audit.instances_accessed(user=user, address=address, study_uid=study_uid, patient=patient)

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
