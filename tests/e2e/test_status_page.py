"""guardian's status page in a real headless Chromium against a real `fleet up`: a killed
service turns red, then green once guardian has restarted it; the operator's token pasted
into the page runs the smoke canary through the stack. Screenshots are kept under the
test's tmp dir (their paths are printed)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import bearer
from tests.e2e.test_guardian_heals import Fleet, fleet, wait_for

__all__ = ["fleet"]  # the fixture, shared with the healing test


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Chromium is missing: `make tools` installs it (Debian)"
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1400")
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def status_of(browser: webdriver.Chrome, service: str) -> str:
    """The status a service's row shows; the page redraws its rows every second, so a row
    found may be gone by the time it is read: that counts as not shown yet."""
    try:
        rows = browser.find_elements(By.ID, f"service-{service}")
        return rows[0].get_attribute("data-status") or "" if rows else ""
    except StaleElementReferenceException:
        return ""


def badge_color(browser: webdriver.Chrome, service: str) -> str:
    """The background colour of a service's badge, read again if the row was redrawn."""
    return str(
        WebDriverWait(browser, 5, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda b: b.find_element(
                By.CSS_SELECTOR, f"#service-{service} .badge"
            ).value_of_css_property("background-color")
        )
    )


def test_the_status_page_shows_a_killed_service_red_then_green(
    fleet: Fleet, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    state = fleet.up()
    guardian = state["services"]["guardian"]
    wait_for(
        lambda: httpx.get(f"{guardian}/api/health", timeout=2).json()["status"] == "healthy",
        60,
        "a healthy fleet",
    )
    browser.get(guardian + "/")
    assert browser.title == "LLM Fleet status"
    services = ("sync", "benchmark", "planner", "stats")
    WebDriverWait(browser, 30).until(lambda b: all(status_of(b, n) == "up" for n in services))
    docs = WebDriverWait(browser, 5, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: b.find_element(By.CSS_SELECTOR, "#service-stats a").get_attribute("href")
    )
    assert docs == f"{state['services']['stats']}/docs"

    os.kill(fleet.pid_of("stats"), signal.SIGKILL)
    WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: status_of(b, "stats") == "down")
    red = tmp_path / "status-stats-down.png"
    assert browser.save_screenshot(str(red))
    assert badge_color(browser, "stats") == "rgba(207, 34, 46, 1)"  # red
    WebDriverWait(browser, 10).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, '#open-incidents tr[data-service="stats"]')
    )

    WebDriverWait(browser, 60).until(lambda b: status_of(b, "stats") == "up")
    assert badge_color(browser, "stats") == "rgba(26, 127, 55, 1)"  # green

    # the button needs the operator's token: refused without, runs with it
    browser.find_element(By.ID, "run-smoke").click()
    answer = browser.find_element(By.ID, "smoke-answer")
    WebDriverWait(browser, 10).until(lambda b: answer.get_attribute("data-result") == "refused")
    assert "401" in answer.text
    token = bearer("ops", "operator")["Authorization"].removeprefix("Bearer ")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "use-token").click()
    browser.find_element(By.ID, "run-smoke").click()
    WebDriverWait(browser, 60).until(lambda b: answer.get_attribute("data-result") == "passed")
    WebDriverWait(browser, 10).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, '#smoke[data-ok="true"]')
    )
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, '#recent-incidents tr[data-service="stats"]')
    )
    green = tmp_path / "status-stats-up-smoke-passed.png"
    assert browser.save_screenshot(str(green))
    print(f"\nscreenshots: {red} {green}")
    fleet.stop()
