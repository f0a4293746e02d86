"""The HTTP gateway's web page in a real headless Chromium (Debian's, driven by Selenium).

``make test`` installs the browser (scripts/install-browser.sh), so a missing
browser is a failure here, not a skip."""

from __future__ import annotations

import shutil
import time
from typing import Any, Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import EN_VOICE, Gatewayed
from tests.gateway_util import idle, status, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: run scripts/install-browser.sh (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which would download one) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_state(driver: webdriver.Chrome) -> dict[str, Any]:
    return driver.execute_script("return Object.assign({}, window.ttsPage);")


def test_the_page_speaks_a_line_and_shows_first_audio_and_workers(gateways: Gatewayed, browser: webdriver.Chrome) -> None:
    wait_for(gateways.served, idle)
    before = status(gateways.served)["counters"]
    browser.get(gateways.http_url + "/")
    wait = WebDriverWait(browser, 60)
    # The voice picker is filled from /v1/voices, the worker table from /v1/status.
    wait.until(lambda d: len(Select(d.find_element(By.ID, "voice")).options) >= 2)
    Select(browser.find_element(By.ID, "voice")).select_by_value(EN_VOICE)
    wait.until(lambda d: page_state(d)["statusPolls"] >= 1)
    assert f"piper.{EN_VOICE}" in browser.find_element(By.ID, "workers").text

    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Halt! Who goes there? Put down your weapons, strangers, and step into the light.")
    browser.find_element(By.ID, "speak").click()
    wait.until(lambda d: page_state(d)["state"] in ("done", "error"))
    state = page_state(browser)
    assert state["state"] == "done" and state["error"] is None, state
    assert state["bytes"] > 24000 * 2 and state["chunks"] >= 3 and state["sampleRate"] == 24000
    assert state["ttfaMs"] is not None and state["ttfaMs"] > 0
    assert state["scheduledSeconds"] > 2.0
    assert browser.find_element(By.ID, "ttfa").text.endswith(" ms")
    # Web Audio really played what arrived: buffers end as the audio clock runs.
    deadline = time.monotonic() + 30
    while page_state(browser)["playedBuffers"] < 3:
        assert time.monotonic() < deadline, page_state(browser)
        time.sleep(0.2)
    after = wait_for(gateways.served, idle)["counters"]
    assert after["completed"] == before["completed"] + 1
