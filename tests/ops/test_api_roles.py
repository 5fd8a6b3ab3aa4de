"""The admin API over HTTPS, its users and roles, and /metrics behind a token (issue 18, item 3).

One running `ainode serve` with ``api.tls`` (a self-signed certificate made here with the openssl
CLI), a viewer and an administrator in ``api.users`` and ``api.metrics_token``; requests are raw
HTTPS (http.client) so each test sets exactly the headers it means.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import subprocess
import sys
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import HTTPException
from pydantic import ValidationError
from starlette.requests import Request

from node.admin.access import MAX_FAILED_LOGINS, Access
from node.admin.api import create_app
from node.admin.passwords import check_password, hash_password
from node.core.settings import APIUser, ConfigError, Settings, load_settings
from tests.helpers import REPO_ROOT, NodeProcess, wait_for
from tests.ops.conftest import TOKEN, make_certificate, node_with_api

VIEWER, VIEWER_PASSWORD = "vera", "viewer-pass-Qx7!correct horse"
ADMIN, ADMIN_PASSWORD = "adam", "admin-pass-Zk4!battery staple"
METRICS_TOKEN = "scrape-me-7f3a"
SAME_SITE = {"X-Requested-With": "ainode"}
# Routes anyone logged in may call whatever the method: one's own session.
OWN_SESSION = {("POST", "/api/session"), ("DELETE", "/api/session")}


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


class HTTPS:
    """Raw requests to the node's API over HTTPS, trusting its test certificate."""

    def __init__(self, node: NodeProcess):
        self.port = node.config["api"]["port"]
        self.context = node.api_ssl_context()

    def send(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Answer:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=60, context=self.context)
        try:
            conn.request(method, path, body=body if method != "GET" else None, headers=headers or {})
            r = conn.getresponse()
            return Answer(r.status, r.headers, r.read())
        finally:
            conn.close()

    def login(self, name: str, password: str) -> tuple[str, str]:
        """The dashboard's login form: returns (Cookie header, Set-Cookie)."""
        body = json.dumps({"name": name, "password": password}).encode()
        answer = self.send("POST", "/api/session", {"Content-Type": "application/json", **SAME_SITE}, body)
        assert answer.status == 200, (answer.status, answer.body)
        set_cookie = answer.headers["set-cookie"]
        return set_cookie.split(";", 1)[0], set_cookie


def audit_lines(node: NodeProcess) -> list[str]:
    path = Path(node.config["audit"]["path"])
    return path.read_text().splitlines() if path.exists() else []


def audited(node: NodeProcess, *parts: str) -> bool:
    """Whether one audit message contains every part."""
    return any(all(p in line for p in parts) for line in audit_lines(node))


@pytest.fixture(scope="module")
def secure_node(tmp_path_factory):
    """A node on HTTPS with a viewer, an administrator and a metrics token."""
    workdir = tmp_path_factory.mktemp("roles")
    cert, key = make_certificate(workdir / "pki")
    node = node_with_api(
        workdir / "node",
        {
            "api": {
                "token": TOKEN,
                "tls": {"enabled": True, "certificate": str(cert), "private_key": str(key)},
                "users": [
                    {"name": VIEWER, "role": "viewer", "password_hash": hash_password(VIEWER_PASSWORD)},
                    {"name": ADMIN, "role": "admin", "password_hash": hash_password(ADMIN_PASSWORD)},
                ],
                "metrics_token": METRICS_TOKEN,
            }
        },
    )
    node.config["destinations"] = [{"name": "self", "ae_title": "AINODE", "host": "127.0.0.1", "port": node.port}]
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    with node:
        api = HTTPS(node)

        def up() -> bool:
            try:
                return api.send("GET", "/api/health").status == 200
            except OSError:
                return False

        assert wait_for(up, 120), node.log_text()[-3000:]
        yield node, api


def app_routes(node: NodeProcess) -> list[tuple[str, str]]:
    """Every (method, path) the node's application answers, hidden ones included: built from the
    node's own configuration, so a route added later is enumerated too."""
    app = create_app(load_settings(node.config_path))
    return sorted(
        (method, route.path)
        for route in _flat(app.routes)
        for method in getattr(route, "methods", None) or ()
        if method not in ("HEAD", "OPTIONS")
    )


def _flat(routes: list[Any]) -> list[Any]:
    # Newer FastAPI keeps an included router as one entry (original_router); the node's routers
    # have no prefix, so their routes' paths are the application's.
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(_flat(inner.routes) if inner is not None else [route])
    return out


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_the_api_answers_https_only_and_its_cookie_is_secure(secure_node):
    node, api = secure_node
    assert node.api_base.startswith("https://")
    assert json.loads(node.api_get("/api/jobs")) == []
    # Plain HTTP on the same port gets no answer: the server expects a TLS handshake.
    plain = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/api/health")
        plain.getresponse().read()
    plain.close()
    # Nor does a client that cannot verify the certificate (no silent downgrade of trust).
    strict = http.client.HTTPSConnection("127.0.0.1", api.port, timeout=30, context=ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        strict.request("GET", "/api/health")
    strict.close()
    _, set_cookie = api.login(VIEWER, VIEWER_PASSWORD)
    attributes = {a.strip().lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "secure", "path=/"} <= attributes, set_cookie
    assert f"https://127.0.0.1:{api.port}/" in node.log_text()


def test_a_viewer_reads_everything_and_changes_nothing(secure_node):
    node, api = secure_node
    routes = app_routes(node)
    changes = [(m, p) for m, p in routes if m not in ("GET", "HEAD") and (m, p) not in OWN_SESSION]
    reads = [(m, p) for m, p in routes if m == "GET"]
    assert ("POST", "/api/config/reload") in changes and ("POST", "/api/destinations/{name}/echo") in changes
    assert len(changes) >= 5 and ("GET", "/metrics") in reads, routes
    cookie, _ = api.login(VIEWER, VIEWER_PASSWORD)
    session = {"Cookie": cookie, **SAME_SITE}
    for method, path in reads:
        for credentials in (basic(VIEWER, VIEWER_PASSWORD), {"Cookie": cookie}):
            status = api.send("GET", concrete(path), credentials).status
            # Reads answer (404 for the made-up id "1", 204 for a search that finds nothing),
            # never "who are you" or "not allowed".
            assert status in (200, 204, 307, 404), (path, status)
    for method, path in changes:
        for credentials in (basic(VIEWER, VIEWER_PASSWORD), session):
            answer = api.send(method, concrete(path), credentials)
            assert answer.status == 403, (method, path, answer.status, answer.body)
            assert b"administrator" in answer.body
    # Each refusal is audited with the viewer's name; nothing ran.
    for method, path in changes:
        detail = f"refused to role viewer: {method} {concrete(path)}"
        assert wait_for(lambda: audited(node, f'UserID="{VIEWER}"', detail), 30), detail
    assert not audited(node, "C-ECHO self")
    me = api.send("GET", "/api/session", {"Cookie": cookie})
    assert me.json() == {"user": VIEWER, "role": "viewer"}
    # A viewer may still log out.
    assert api.send("DELETE", "/api/session", session).status == 200
    assert api.send("GET", "/api/jobs", {"Cookie": cookie}).status == 401


def test_an_administrator_changes_and_the_audit_names_them(secure_node):
    node, api = secure_node
    answer = api.send("POST", "/api/destinations/self/echo", basic(ADMIN, ADMIN_PASSWORD))
    assert answer.status == 200 and answer.json()["ok"], answer.body
    cookie, _ = api.login(ADMIN, ADMIN_PASSWORD)
    assert api.send("GET", "/api/session", {"Cookie": cookie}).json() == {"user": ADMIN, "role": "admin"}
    answer = api.send("POST", "/api/config/reload", {"Cookie": cookie, **SAME_SITE})
    assert answer.status == 200 and answer.json()["ok"], answer.body
    # The token keeps working as an administrator's credential (scripts, the CLI).
    answer = api.send("POST", "/api/destinations/self/echo", {"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200, answer.body
    assert wait_for(lambda: audited(node, f'UserID="{ADMIN}"', "C-ECHO self"), 30)
    assert wait_for(lambda: audited(node, f'UserID="{ADMIN}"', "configuration reloaded"), 30)
    assert wait_for(lambda: audited(node, 'UserID="api-token"', "C-ECHO self"), 30)
    assert wait_for(lambda: audited(node, f'UserID="{ADMIN}"', 'csd-code="110114"', 'EventOutcomeIndicator="0"'), 30)
    # Every change route is open to the administrator: no 401 or 403 (404, 409 are the data's).
    for method, path in app_routes(node):
        if method not in ("GET", "HEAD") and (method, path) not in OWN_SESSION:
            status = api.send(method, concrete(path), basic(ADMIN, ADMIN_PASSWORD)).status
            assert status not in (401, 403), (method, path, status)


def test_a_wrong_password_is_refused_and_audited(secure_node):
    node, api = secure_node
    for name, password in ((VIEWER, ADMIN_PASSWORD), (ADMIN, ""), ("mallory", VIEWER_PASSWORD)):
        assert api.send("GET", "/api/jobs", basic(name, password)).status == 401, name
        body = json.dumps({"name": name, "password": password}).encode()
        refused = api.send("POST", "/api/session", {"Content-Type": "application/json", **SAME_SITE}, body)
        assert refused.status == 401 and "set-cookie" not in refused.headers, name
        assert wait_for(
            lambda: audited(
                node,
                f'UserID="{name}"',
                'csd-code="110114"',
                'EventOutcomeIndicator="4"',
                "wrong user name or password",
            ),
            30,
        ), name
    answer = api.send("GET", "/api/jobs")
    assert answer.status == 401 and "Basic" in answer.headers["www-authenticate"]


def test_no_password_or_hash_is_kept_or_logged(secure_node):
    node, api = secure_node
    api.login(VIEWER, VIEWER_PASSWORD)
    api.send("GET", "/api/jobs", basic(ADMIN, ADMIN_PASSWORD))
    api.send("GET", "/api/jobs", basic(ADMIN, "not-" + ADMIN_PASSWORD))
    config = api.send("GET", "/api/config", basic(ADMIN, ADMIN_PASSWORD)).json()
    assert all(u["password_hash"] == "***" for u in config["settings"]["api"]["users"])
    assert config["settings"]["api"]["metrics_token"] == "***"
    hashes = [u["password_hash"] for u in node.config["api"]["users"]]
    secrets = [VIEWER_PASSWORD, ADMIN_PASSWORD, *hashes, *(h.rsplit("$", 1)[1] for h in hashes)]
    texts = {"node log": node.log_text(), "audit": "\n".join(audit_lines(node)), "/api/config": json.dumps(config)}
    # Storage, database, audit and log: everything the node writes (its configuration aside).
    for path in node.workdir.rglob("*"):
        if path.is_file() and path != node.config_path:
            texts[str(path)] = path.read_bytes().decode("latin-1")
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, (where, secret[:12])
    # The configuration holds the hashes only.
    assert VIEWER_PASSWORD not in node.config_path.read_text()


def test_metrics_need_the_scrape_token(secure_node):
    node, api = secure_node
    assert api.send("GET", "/metrics").status == 401
    assert api.send("GET", "/metrics", {"Authorization": "Bearer wrong"}).status == 401
    answer = api.send("GET", "/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status == 200 and b"ainode_api_requests_total" in answer.body
    # The scrape token opens nothing else.
    assert api.send("GET", "/api/jobs", {"Authorization": f"Bearer {METRICS_TOKEN}"}).status == 401


def test_metrics_stay_open_without_a_scrape_token(running_node):
    node, client = running_node
    status, body = client.call("GET", "/metrics", token=None)
    assert status == 200 and b"ainode_" in body


def test_the_password_hash_comes_from_the_cli_and_plain_passwords_are_refused(tmp_path: Path):
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "api", "hash-password", "--n", "1024"],
        input="s3cret word\n",
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    stored = run.stdout.strip()
    assert stored.startswith("scrypt$1024$8$1$") and "s3cret" not in stored
    assert check_password("s3cret word", stored) and not check_password("s3cret word ", stored)
    assert hash_password("s3cret word") != hash_password("s3cret word")  # a salt per hash
    user = {"name": "ann", "role": "admin", "password_hash": stored}
    assert Settings.model_validate({"api": {"users": [user]}}).api.users[0].name == "ann"
    # A password typed where the hash belongs is refused, and the error does not repeat it.
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({"api": {"users": [{**user, "password_hash": "plain-password"}]}}))
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert "api.users[0].password_hash" in err.value.errors[0] and "hash-password" in err.value.errors[0]
    assert "plain-password" not in str(err.value)
    for bad in ({**user, "role": "owner"}, {**user, "name": "a:b"}):
        with pytest.raises(ValidationError):
            Settings.model_validate({"api": {"users": [bad]}})
    with pytest.raises(ValidationError, match="unique"):
        Settings.model_validate({"api": {"users": [user, user]}})


def serve_fails(workdir: Path, tls: dict[str, Any]) -> str:
    """`ainode serve` with this api.tls: asserts it refuses to start, returns what it said."""
    node = NodeProcess(workdir, {"api": {"token": TOKEN, "tls": tls}})
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "-c", str(node.config_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0, run.stderr[-2000:]
    return run.stdout + run.stderr


def test_a_half_or_unreadable_tls_setup_refuses_to_start(tmp_path: Path):
    cert, key = make_certificate(tmp_path / "pki")
    other_cert, _ = make_certificate(tmp_path / "other")
    said = serve_fails(tmp_path / "half", {"enabled": True, "certificate": str(cert)})
    assert "api.tls" in said and "private_key" in said, said[-2000:]
    said = serve_fails(tmp_path / "key-only", {"private_key": str(key)})
    assert "certificate and private_key go together" in said, said[-2000:]
    missing = tmp_path / "missing.key"
    said = serve_fails(tmp_path / "missing", {"enabled": True, "certificate": str(cert), "private_key": str(missing)})
    assert f"api.tls.private_key: cannot read {missing}" in said, said[-2000:]
    said = serve_fails(
        tmp_path / "mismatch", {"enabled": True, "certificate": str(other_cert), "private_key": str(key)}
    )
    assert "api.tls: cannot use certificate" in said, said[-2000:]


def test_the_dashboard_keeps_no_credential_in_the_page():
    script = (REPO_ROOT / "node/admin/dashboard/app.js").read_text()
    assert "localStorage" not in script.replace("no localStorage", "") and "sessionStorage" not in script
    assert "document.cookie" not in script


def test_failed_logins_from_one_address_are_throttled():

    user = APIUser(name="ann", role="viewer", password_hash=hash_password("right", n=1024))
    access = Access("token", [user])

    def request(address: str) -> Request:
        return Request({"type": "http", "method": "GET", "path": "/", "headers": [], "client": (address, 1)})

    for _ in range(MAX_FAILED_LOGINS):
        with pytest.raises(HTTPException) as err:
            access.check_password(request("10.0.0.1"), "ann", "wrong")
        assert err.value.status_code == 401
    # Now even the right password waits; another address is not affected.
    with pytest.raises(HTTPException) as err:
        access.check_password(request("10.0.0.1"), "ann", "right")
    assert err.value.status_code == 429
    assert access.check_password(request("10.0.0.2"), "ann", "right").role == "viewer"
