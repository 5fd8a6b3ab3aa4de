"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.ops.conftest import TOKEN, make_ct_study, storescu, wait_phase

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
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_dashboard_shows_the_pipeline_a_study_page_and_runs_actions(running_node, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    node, client = running_node
    uid = make_ct_study(tmp_path / "study", 6)
    assert storescu(node, tmp_path / "study").returncode == 0
    wait_phase(client, uid, ("done",))
    base = client.base

    # Without the token the page says why it cannot show anything.
    browser.get(base + "/dashboard/")
    assert wait_for(lambda: "bearer token" in text_of(browser, "#view"), 60), browser.page_source[:2000]

    browser.execute_script("localStorage.setItem('ainode-token', arguments[0])", TOKEN)
    browser.get(base + "/dashboard/")
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.study-row[data-phase='done']"), 60), (
        browser.page_source[:3000]
    )
    assert text_of(browser, "#phase-done").startswith("1")
    assert text_of(browser, "#queue-depth") == "0 0 0"
    assert "free of" in text_of(browser, "#disk")
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
