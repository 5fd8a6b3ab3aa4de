"""Who may use the admin API, from where, and what of its use goes to the audit trail.

- **Host check** (DNS rebinding): every request must name this node in its Host header:
  localhost, 127.0.0.1, [::1], the listen address or one of ``api.allowed_hosts``; any other
  name is answered 421 before any route runs.
- **Who**: every ``/api`` call except ``/api/health`` needs a login: a user of ``api.users``
  (HTTP Basic, its password checked against the configured scrypt hash), the token as
  ``Authorization: Bearer <token>`` (an administrator, named ``api-token`` in the audit trail),
  or the dashboard's session cookie. The token is ``api.token``, else one the node generated at
  its first start into ``<storage>/api-token`` (mode 0600; the log names the file, never the
  value). ``/metrics`` needs ``api.metrics_token`` (or any login) when that is set.
- **Roles**: a ``viewer`` reads; every change (a route with the ``write`` dependency, or any
  method but GET/HEAD/OPTIONS) needs an ``admin``: a viewer is answered 403, audited.
- **Sessions**: the dashboard exchanges a name and password (or the token) for an HttpOnly,
  SameSite=Strict cookie (Secure over HTTPS) with ``POST /api/session``, or the token with
  ``/dashboard/?token=...`` once.
- **Cross-site requests**: a change (POST, PUT, PATCH, DELETE) made with the cookie must carry
  ``X-Requested-With: ainode`` (a header a cross-site form cannot send, and cross-site scripts
  only after a CORS preflight this API never grants) and must not come from another origin
  (``Origin``, ``Sec-Fetch-Site``). Requests with an Authorization header carry no ambient
  credential and are not checked.

Refused logins, logins, searches (throttled), changes and refused changes are audited; failed
password logins are throttled per address (429).
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from node.admin import passwords
from node.core import audit
from node.core.settings import APIUser, Settings

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
ADMIN, VIEWER = "admin", "viewer"
# A checked password is remembered (as a keyed digest) this long: scrypt is not paid per call.
PASSWORD_CACHE_S = 300.0
MAX_FAILED_LOGINS, FAILED_LOGIN_WINDOW_S = 20, 300.0


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


@dataclass(frozen=True)
class Principal:
    """Who made a request: the name written to the audit trail, and the role."""

    name: str
    role: str  # "viewer" or "admin"


TOKEN_USER = Principal("api-token", ADMIN)


class LoginThrottle:
    """Failed password logins per client address: after MAX_FAILED_LOGINS within
    FAILED_LOGIN_WINDOW_S the address is answered 429 until the window has passed."""

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(address, []) if now - t < FAILED_LOGIN_WINDOW_S]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def blocked(self, address: str) -> bool:
        with self._lock:
            return len(self._recent(address, time.monotonic())) >= MAX_FAILED_LOGINS

    def failed(self, address: str) -> None:
        with self._lock:
            now = time.monotonic()
            if len(self._failures) >= MAX_SESSIONS and address not in self._failures:
                # Many addresses at once: forget those whose last failure is oldest (bounded memory).
                for old in sorted(self._failures, key=lambda a: self._failures[a][-1])[: MAX_SESSIONS // 10]:
                    del self._failures[old]
            self._failures[address] = [*self._recent(address, now), now]


class Access:
    """Decides who may read and change, keeps the dashboard's sessions, and audits
    authentication, searches and changes."""

    def __init__(
        self, token: str, users: Sequence[APIUser] = (), metrics_token: str = "", secure_cookies: bool = False
    ):
        self.token = token
        self.users = {u.name: u for u in users}
        self.metrics_token = metrics_token
        self.secure_cookies = secure_cookies
        self._sessions: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        self._last_query: dict[tuple[str, str, str], float] = {}
        self._throttle = LoginThrottle()
        # Passwords checked recently, as keyed digests (the password itself is never kept).
        self._cache_key = secrets.token_bytes(32)
        self._checked: dict[bytes, tuple[float, str]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "Access":
        """The access rules of ``settings.api`` (the token read or generated now)."""
        api = settings.api
        return cls(ensure_api_token(settings), api.users, api.metrics_token, api.tls.enabled)

    def client(self, request: Request) -> str:
        return request.client.host if request.client else ""

    def refused(
        self, request: Request, why: str, user: str = "api-client", reason: str = "invalid or missing token"
    ) -> HTTPException:
        """An audited refusal (401) for missing or wrong credentials."""
        audit.user_authentication(user=user, address=self.client(request), success=False, reason=reason)
        challenge = 'Bearer, Basic realm="ainode", charset="UTF-8"' if self.users else "Bearer"
        return HTTPException(401, why, headers={"WWW-Authenticate": challenge})

    # --- credentials ----------------------------------------------------------------------------

    def check_password(self, request: Request, name: str, password: str) -> Principal:
        """The user with this name and password, or an audited 401 (429 after too many failures)."""
        address = self.client(request)
        if self._throttle.blocked(address):
            audit.user_authentication(user=name, address=address, success=False, reason="too many failed logins")
            raise HTTPException(429, "too many failed logins from this address: try again later")
        user = self.users.get(name)
        if user is not None and self._recently_checked(user, password):
            return Principal(user.name, user.role)
        # An unknown name costs the same scrypt as a known one: the timing tells no names.
        ok = passwords.check_password(password, user.password_hash if user else passwords.dummy_hash())
        if user is None or not ok:
            self._throttle.failed(address)
            raise self.refused(request, "wrong user name or password", user=name, reason="wrong user name or password")
        self._remember(user, password)
        return Principal(user.name, user.role)

    def _digest(self, user: APIUser, password: str) -> bytes:
        return hmac.new(self._cache_key, f"{user.name}\0{password}".encode(), "sha256").digest()

    def _recently_checked(self, user: APIUser, password: str) -> bool:
        with self._lock:
            seen = self._checked.get(self._digest(user, password))
        return seen is not None and seen[0] > time.monotonic() and seen[1] == user.password_hash

    def _remember(self, user: APIUser, password: str) -> None:
        now = time.monotonic()
        with self._lock:
            for old in [k for k, v in self._checked.items() if v[0] < now]:
                del self._checked[old]
            if len(self._checked) < MAX_SESSIONS:
                self._checked[self._digest(user, password)] = (now + PASSWORD_CACHE_S, user.password_hash)

    def _from_header(self, request: Request) -> Principal | None:
        """None without an Authorization header, else who it names (an audited 401 when wrong)."""
        given = request.headers.get("authorization")
        if given is None:
            return None
        scheme, _, value = given.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.token_ok(value):
            return TOKEN_USER
        if scheme == "basic" and self.users:
            try:
                name, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                sep = ""
            if sep:
                return self.check_password(request, name, password)
        raise self.refused(request, "a valid bearer token or user name and password is required")

    def _session(self, request: Request) -> Principal | None:
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is not None and entry[0] < time.monotonic():
                del self._sessions[sid]
                entry = None
        return entry[1] if entry is not None else None

    def _authenticate(self, request: Request, changing: bool) -> Principal:
        who = self._from_header(request)
        if who is not None:
            return who  # a header is no ambient credential: no cross-site check needed
        who = self._session(request)
        if who is None:
            raise self.refused(request, "a valid bearer token, user name and password, or dashboard login is required")
        if changing and not (request.headers.get(CSRF_HEADER) == CSRF_VALUE and _same_origin(request)):
            audit.security_alert(
                audit.RESTRICTED_FUNCTION,
                user=who.name,
                address=self.client(request),
                detail=f"cross-site request refused: {request.method} {request.url.path}",
                outcome=audit.MINOR_FAILURE,
            )
            raise HTTPException(403, "cross-site request refused: changes need the X-Requested-With header")
        return who

    def _admin(self, request: Request, who: Principal) -> str:
        if who.role != ADMIN:
            audit.security_alert(
                audit.RESTRICTED_FUNCTION,
                user=who.name,
                address=self.client(request),
                detail=f"refused to role {who.role}: {request.method} {request.url.path}",
                outcome=audit.MINOR_FAILURE,
            )
            raise HTTPException(403, f"the role {who.role} may only read: this change needs an administrator")
        return who.name

    # --- the routes' dependencies -----------------------------------------------------------------

    def read(self, request: Request) -> str:
        """Dependency of every route that shows data: returns the user name recorded in audits.
        A route answering POST and the like is treated as a change whatever its dependency."""
        changing = request.method not in SAFE_METHODS
        who = self._authenticate(request, changing=changing)
        return self._admin(request, who) if changing else who.name

    def write(self, request: Request) -> str:
        """Dependency of every route that changes something: administrators only."""
        return self._admin(request, self._authenticate(request, changing=True))

    def whoami(self, request: Request) -> Principal:
        """Dependency of the routes of one's own session (show it, log out): any role."""
        return self._authenticate(request, changing=request.method not in SAFE_METHODS)

    def event_channel(self, websocket: Any) -> str:
        """Who opens a UPS-RS event channel (a WebSocket): an administrator, since the channel
        takes the subscriber's events off the durable outbox. A cookie-authenticated socket must
        come from this site (a cross-site page could otherwise open one). Raises HTTPException."""
        who = self._from_header(websocket)
        if who is None:
            who = self._session(websocket)
            if who is None:
                raise self.refused(
                    websocket, "a valid bearer token, user name and password, or dashboard login is required"
                )
            if not _same_origin(websocket):
                raise HTTPException(403, "cross-site event channel refused")
        if who.role != ADMIN:
            audit.security_alert(
                audit.RESTRICTED_FUNCTION,
                user=who.name,
                address=self.client(websocket),
                detail=f"refused to role {who.role}: event channel {websocket.url.path}",
                outcome=audit.MINOR_FAILURE,
            )
            raise HTTPException(403, "an event channel takes the subscriber's events: it needs an administrator")
        return who.name

    def metrics(self, request: Request) -> None:
        """Let a scraper through: anyone without ``api.metrics_token``, else that bearer token or
        any valid API credential."""
        if not self.metrics_token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.metrics_token.encode()):
            return
        self._authenticate(request, changing=False)

    # --- the dashboard's sessions ---------------------------------------------------------------

    def login(self, request: Request, response: Response, form: dict[str, Any] | None = None) -> Principal:
        """Open a session (HttpOnly, SameSite=Strict cookie) for a name and password (the login
        form's JSON body, or HTTP Basic) or the bearer token."""
        if form and isinstance(form.get("name"), str) and isinstance(form.get("password"), str):
            who = self.check_password(request, form["name"], form["password"])
        else:
            who = self._from_header(request) or self._raise_no_credentials(request)
        if not _same_origin(request):
            raise HTTPException(403, "cross-site login refused")
        self.start_session(request, response, who)
        return who

    def _raise_no_credentials(self, request: Request) -> Principal:
        raise self.refused(request, "a valid bearer token or user name and password is required")

    def start_session(self, request: Request, response: Response, who: Principal = TOKEN_USER) -> None:
        """Open a session for a client that proved who it is; set its cookie."""
        sid, now = secrets.token_urlsafe(32), time.monotonic()
        with self._lock:
            for old in [k for k, v in self._sessions.items() if v[0] < now]:
                del self._sessions[old]
            if len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=lambda k: self._sessions[k][0])]
            self._sessions[sid] = (now + SESSION_TTL_S, who)
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=int(SESSION_TTL_S),
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.secure_cookies or request.url.scheme == "https",
        )
        audit.user_authentication(user=who.name, address=self.client(request), success=True)

    def token_ok(self, value: str) -> bool:
        """Whether a token given some other way (the dashboard's ``?token=``) is the token."""
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def logout(self, request: Request, response: Response) -> None:
        """End the request's session (if any) and clear its cookie."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            self._sessions.pop(sid, None)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure_cookies)

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
