"""Who may reach the admin API (issue 19, item 7): Host check against DNS rebinding, the token for
patient images and every change, the dashboard's session cookie and the cross-site check.

A running `ainode serve`; requests are raw HTTP (http.client) so that each test sets exactly the
headers a browser on an attacker's page would send.
"""

from __future__ import annotations

import http.client
import json
import re
import stat
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from node.admin.access import allowed_host_names, host_allowed, host_name
from node.core.settings import Settings
from tests.helpers import wait_for
from tests.ops.conftest import TOKEN, Client, audit_text, make_ct_study, node_with_api, storescu, wait_phase

EVIL = "http://attacker.example"
# What a cross-site <form method=post> sends: no custom header, another site's Origin.
FORM_POST = {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
SAME_SITE = {"X-Requested-With": "ainode"}


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Answer:
    """One request, exactly these headers (a Host given here replaces the real one), no redirects."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body if method != "GET" else None, headers=headers or {})
        r = conn.getresponse()
        return Answer(r.status, r.headers, r.read())
    finally:
        conn.close()


def login(port: int, token: str = TOKEN) -> tuple[str, str]:
    """The dashboard's login: the token becomes a session cookie; returns (Cookie header, Set-Cookie)."""
    answer = send(port, "POST", "/api/session", {"Authorization": f"Bearer {token}", **SAME_SITE})
    assert answer.status == 200, (answer.status, answer.body)
    set_cookie = answer.headers["set-cookie"]
    return set_cookie.split(";", 1)[0], set_cookie


def push_study(node, client: Client, folder: Path) -> str:
    uid = make_ct_study(folder, 3)
    assert storescu(node, folder).returncode == 0
    wait_phase(client, uid, ("done", "failed"))
    return uid


def test_patient_images_need_the_token_and_a_host_name_of_this_node(running_node, tmp_path: Path):
    node, client = running_node
    port = node.config["api"]["port"]
    png = f"/api/studies/{push_study(node, client, tmp_path / 'study')}/slices/1.png"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    ok = send(port, "GET", png, bearer)
    assert ok.status == 200 and ok.body.startswith(b"\x89PNG"), ok.status
    assert send(port, "GET", png).status == 401
    # DNS rebinding: attacker.example resolves to 127.0.0.1 and the browser sends that name as Host.
    for host in ("attacker.example", f"attacker.example:{port}", f"localhost.attacker.example:{port}", ""):
        for headers in ({"Host": host, **bearer}, {"Host": host}):
            refused = send(port, "GET", png, headers)
            assert refused.status == 421 and b"PNG" not in refused.body, (host, refused.status)
    assert send(port, "GET", "/api/health", {"Host": "attacker.example"}).status == 421
    assert send(port, "GET", "/dashboard/", {"Host": "attacker.example"}).status == 421
    # The node's own names still answer.
    for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", "LOCALHOST."):
        assert send(port, "GET", png, {"Host": host, **bearer}).status == 200, host
    assert "DNS rebinding" in node.log_text() and "attacker.example" not in node.log_text()


def test_a_cross_site_form_post_cannot_echo_a_destination(running_node):
    node, client = running_node
    port = node.config["api"]["port"]
    echo = "/api/destinations/self/echo"
    assert send(port, "POST", echo, FORM_POST, b"x=1").status == 401
    cookie, set_cookie = login(port)
    attributes = {a.strip().lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes, set_cookie
    # A logged-in browser would attach the cookie (were it not SameSite=Strict): still refused
    # without the header a cross-site page cannot send, or with another site's origin.
    for headers in (
        FORM_POST,
        {},
        {**FORM_POST, **SAME_SITE},
        {"Origin": EVIL, **SAME_SITE},
        {"Sec-Fetch-Site": "cross-site", **SAME_SITE},
        {"Sec-Fetch-Site": "same-site", **SAME_SITE},
    ):
        refused = send(port, "POST", echo, {"Cookie": cookie, **headers}, b"x=1")
        assert refused.status == 403, (headers, refused.status, refused.body)
    # The dashboard's own call: the cookie, the header, its own origin.
    own = {"Cookie": cookie, "Origin": client.base, "Sec-Fetch-Site": "same-origin", **SAME_SITE}
    answer = send(port, "POST", echo, own)
    assert answer.status == 200 and answer.json()["ok"], answer.body
    # Only that one ran: the audit trail is written in order, the refused ones came first.
    assert wait_for(lambda: audit_text(node).count("C-ECHO self") == 1, 30), audit_text(node)[-2000:]
    assert wait_for(lambda: "cross-site request refused" in audit_text(node), 30)
    # Reads need no header; after logging out the cookie is worth nothing.
    assert send(port, "GET", "/api/jobs", {"Cookie": cookie}).status == 200
    assert send(port, "DELETE", "/api/session", {"Cookie": cookie}).status == 403
    assert send(port, "DELETE", "/api/session", {"Cookie": cookie, **SAME_SITE}).status == 200
    assert send(port, "GET", "/api/jobs", {"Cookie": cookie}).status == 401
    assert send(port, "POST", "/api/session", {"Authorization": "Bearer wrong", **SAME_SITE}).status == 401


def test_every_change_needs_the_token_or_a_same_site_session(running_node):
    """Every route that changes something, as the OpenAPI document lists them, also future ones."""
    node, client = running_node
    port = node.config["api"]["port"]
    spec = client.get("/openapi.json")
    changes = [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in ("post", "put", "patch", "delete")
    ]
    assert ("POST", "/api/destinations/{name}/echo") in changes and len(changes) >= 6, changes
    cookie, _ = login(port)
    for method, path in changes:
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        assert send(port, method, concrete, FORM_POST, b"x=1").status == 401, (method, path)
        crossed = send(port, method, concrete, {"Cookie": cookie, **FORM_POST}, b"x=1").status
        assert crossed == (401 if (method, path) == ("POST", "/api/session") else 403), (method, path, crossed)


def test_the_dashboard_login_link_sets_the_session_and_drops_the_token(running_node):
    node, client = running_node
    port = node.config["api"]["port"]
    answer = send(port, "GET", f"/dashboard/?token={TOKEN}")
    assert answer.status == 303 and answer.headers["location"] == "/dashboard/", answer.status
    cookie = answer.headers["set-cookie"].split(";", 1)[0]
    assert send(port, "GET", "/api/overview", {"Cookie": cookie}).status == 200
    assert send(port, "GET", "/dashboard/?token=wrong").status == 401
    assert send(port, "GET", "/api/overview", {"Cookie": "ainode_session=made-up"}).status == 401


def test_without_api_token_the_node_generates_one_only_its_owner_can_read(tmp_path: Path):
    node = node_with_api(
        tmp_path / "node",
        {
            "api": {"token": ""},
            "destinations": [{"name": "self", "ae_title": "AINODE", "host": "127.0.0.1", "port": 0}],
        },
    )
    node.config["destinations"][0]["port"] = node.port
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    port = node.config["api"]["port"]
    with node:
        anonymous = Client(port, token=None)
        assert wait_for(anonymous.up, 120), node.log_text()[-3000:]
        path = node.storage / "api-token"
        assert path.is_file(), node.log_text()[-3000:]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32
        assert str(path) in node.log_text() and token not in node.log_text()
        client = Client(port, token=token)
        png = f"/api/studies/{push_study(node, client, tmp_path / 'study')}/slices/1.png"
        # The attack of the issue: a loopback client without the token, a cross-site form post.
        assert anonymous.call("GET", png)[0] == 401
        assert send(port, "POST", "/api/destinations/self/echo", FORM_POST, b"x=1").status == 401
        status, body = client.call("GET", png)
        assert status == 200 and body.startswith(b"\x89PNG")
        status, body = client.post("/api/destinations/self/echo")
        assert status == 200 and body["ok"], body
        # The same token after a restart: scripts and the CLI keep working.
        node.stop()
        node.start()
        assert wait_for(client.up, 120), node.log_text()[-3000:]
        assert path.read_text().strip() == token
        assert client.call("GET", png)[0] == 200
    assert yaml.safe_load(node.config_path.read_text())["api"]["token"] == ""


def test_allowed_hosts_admit_a_proxy_name(tmp_path: Path):
    node = node_with_api(tmp_path / "node", {"api": {"token": TOKEN, "allowed_hosts": ["ainode.example.org"]}})
    port = node.config["api"]["port"]
    with node:
        assert wait_for(Client(port).up, 120), node.log_text()[-3000:]
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert send(port, "GET", "/api/jobs", {"Host": "ainode.example.org", **bearer}).status == 200
        assert send(port, "GET", "/api/jobs", {"Host": "other.example.org", **bearer}).status == 421


def test_host_names_are_validated_and_matched_without_port_case_or_trailing_dot():
    settings = Settings.model_validate(
        {"api": {"host": "0.0.0.0", "allowed_hosts": ["Ainode.Example.ORG", "*.hospital.org", "[fd00::5]"]}}
    )
    allowed = allowed_host_names(settings)
    for header, ok in [
        ("ainode.example.org:8080", True),
        ("AINODE.example.org.", True),
        ("pacs.hospital.org", True),
        ("hospital.org", False),
        ("evilhospital.org", False),
        ("[fd00::5]:8080", True),
        ("[::1]", True),
        ("127.0.0.1:1", True),
        ("0.0.0.0:8080", False),  # a wildcard listen address is no name of this node
        ("127.0.0.1.nip.io", False),
        ("", False),
    ]:
        assert host_allowed(host_name(header), allowed) is ok, header
    assert "10.1.2.3" in allowed_host_names(Settings.model_validate({"api": {"host": "10.1.2.3"}}))
    with pytest.raises(ValidationError, match="allowed_hosts"):
        Settings.model_validate({"api": {"allowed_hosts": ["http://ainode.example.org/"]}})
