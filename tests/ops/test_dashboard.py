"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from node.admin.passwords import hash_password
from tests.helpers import wait_for
from tests.ops.conftest import TOKEN, make_certificate, make_ct_study, node_with_api, storescu, wait_phase

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    # The HTTPS test's node has a self-signed certificate made by the test.
    "--ignore-certificate-errors",
]


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium; the test fails (not skips) when it is not installed: CI installs it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def text_of(driver, css: str) -> str:
    """The element's text, or "" when it is absent or was re-rendered while being read (the
    dashboard replaces its panels on every refresh; the caller's wait_for asks again)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def log_in(driver, password: str, user: str = "") -> None:
    """Fill in the dashboard's login form (no user: the password is the API token) and submit it."""
    from selenium.webdriver.common.by import By

    for field_id, value in (("user", user), ("password", password)):
        field = driver.find_element(By.ID, field_id)
        field.clear()
        field.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()


def test_dashboard_shows_the_pipeline_a_study_page_and_runs_actions(running_node, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    node, client = running_node
    uid = make_ct_study(tmp_path / "study", 6)
    assert storescu(node, tmp_path / "study").returncode == 0
    wait_phase(client, uid, ("done",))
    base = client.base

    # Before the login the page asks for the token and shows nothing else; a wrong one is refused.
    browser.get(base + "/dashboard/")
    assert wait_for(lambda: browser.find_elements(By.ID, "login-form"), 60), browser.page_source[:2000]
    assert not browser.find_elements(By.CSS_SELECTOR, "tr.study-row")
    log_in(browser, "wrong")
    assert wait_for(lambda: "Refused" in text_of(browser, "#login"), 60), browser.page_source[:2000]
    log_in(browser, TOKEN)
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.study-row[data-phase='done']"), 60), (
        browser.page_source[:3000]
    )
    assert text_of(browser, "#phase-done").startswith("1")
    assert text_of(browser, "#queue-depth") == "0 0 0"
    assert "free of" in text_of(browser, "#disk")
    assert browser.execute_script("return document.cookie") == ""  # the session cookie is HttpOnly
    row = text_of(browser, "tr.study-row")
    assert "CT OPS" in row and "ct-count" in row and "Ops^Patient" not in browser.page_source

    browser.find_element(By.CSS_SELECTOR, "tr.study-row a").click()
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "img.key-slice"), 60), browser.page_source[:3000]
    loaded = "return [...document.querySelectorAll('img.key-slice')].every(i => i.complete && i.naturalWidth > 0)"
    assert wait_for(lambda: browser.execute_script(loaded), 60)
    assert browser.execute_script("return document.querySelector('img.key-slice').naturalWidth") >= 256
    assert text_of(browser, "#timings").count(" s") >= 5

    # Re-run from the study page: a second job appears and succeeds.
    browser.find_element(By.CSS_SELECTOR, "button[data-act='rerun']").click()
    assert wait_for(lambda: len(client.get(f"/api/studies/{uid}")["jobs"]) == 2, 60)
    assert wait_for(lambda: [j["state"] for j in client.get(f"/api/studies/{uid}")["jobs"]] == ["succeeded"] * 2, 180)

    # Destinations page: C-ECHO from the browser against the node itself.
    browser.get(base + "/dashboard/#/destinations")
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "button[data-echo='self']"), 60)
    browser.find_element(By.CSS_SELECTOR, "button[data-echo='self']").click()
    assert wait_for(lambda: text_of(browser, "#echo-self").startswith("OK"), 60), text_of(browser, "#echo-self")

    # Log out: back to the login form; the login link (`?token=`, as printed for operators) logs in
    # again and leaves no token in the address bar.
    browser.find_element(By.ID, "logout").click()
    assert wait_for(lambda: browser.find_elements(By.ID, "login-form"), 60), browser.page_source[:2000]
    browser.get(f"{base}/dashboard/?token={TOKEN}")
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.study-row"), 60), browser.page_source[:2000]
    assert TOKEN not in browser.current_url


def test_a_viewer_sees_no_change_buttons_and_an_administrator_does(browser, tmp_path: Path):
    """Over HTTPS, with users: the login form takes a name and password, the role is shown, a
    viewer is offered no button that changes something, and nothing lands in the page's storage."""
    from selenium.webdriver.common.by import By

    cert, key = make_certificate(tmp_path / "pki")
    users = [
        {"name": "vera", "role": "viewer", "password_hash": hash_password("vera-password")},
        {"name": "adam", "role": "admin", "password_hash": hash_password("adam-password")},
    ]
    tls = {"enabled": True, "certificate": str(cert), "private_key": str(key)}
    node = node_with_api(tmp_path / "node", {"api": {"token": TOKEN, "tls": tls, "users": users}})
    node.config["destinations"] = [{"name": "self", "ae_title": "AINODE", "host": "127.0.0.1", "port": node.port}]
    node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
    with node:

        def up() -> bool:
            try:
                return node.api_get("/api/health") == b'{"status":"ok"}'
            except OSError:
                return False

        assert wait_for(up, 120), node.log_text()[-3000:]
        browser.get(node.api_base + "/dashboard/#/destinations")
        assert wait_for(lambda: browser.find_elements(By.ID, "login-form"), 60), browser.page_source[:2000]
        log_in(browser, "adam-password", user="vera")
        assert wait_for(lambda: "Refused" in text_of(browser, "#login"), 60), browser.page_source[:2000]
        log_in(browser, "vera-password", user="vera")
        assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "button[data-echo='self']"), 60)
        assert text_of(browser, "#whoami") == "vera (viewer)"
        assert not browser.find_element(By.CSS_SELECTOR, "button[data-echo='self']").is_displayed()
        stored = "return [localStorage.length, sessionStorage.length, document.cookie]"
        assert browser.execute_script(stored) == [0, 0, ""]
        # The server refuses what the page hides, even when the page's own script asks.
        refused = browser.execute_script(
            "return fetch('/api/destinations/self/echo', {method: 'POST', credentials: 'same-origin',"
            " headers: {'X-Requested-With': 'ainode'}}).then(r => r.status)"
        )
        assert refused == 403

        browser.find_element(By.ID, "logout").click()
        assert wait_for(lambda: browser.find_elements(By.ID, "login-form"), 60), browser.page_source[:2000]
        log_in(browser, "adam-password", user="adam")
        assert wait_for(lambda: text_of(browser, "#whoami") == "adam (admin)", 60), browser.page_source[:2000]
        assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "button[data-echo='self']"), 60)
        button = browser.find_element(By.CSS_SELECTOR, "button[data-echo='self']")
        assert button.is_displayed()
        button.click()
        assert wait_for(lambda: text_of(browser, "#echo-self").startswith("OK"), 60), text_of(browser, "#echo-self")
        assert browser.execute_script(stored) == [0, 0, ""]
