"""The app end to end in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium; skipped
when they are not installed): `augment app` on the smoke run's data root on a free port of 127.0.0.1, a grid
generated from a typed impression, the lung window preset switched on, a screenshot; the app stopped by its PID.
CXR_APP_SCREENSHOT names a file to keep the screenshot in as well (how docs/app.png was made)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tasks import layout

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400),  # smoke_root may run the smoke flow first
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                 "(apt-get install chromium chromium-driver; .ci/run installs them)")]
SMOKE = str(layout.REPO_ROOT / "configs" / "smoke.yaml")
COUNT = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # not there yet: a refused connection, a stale element
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def app_url(smoke_root, tmp_path):
    port = free_port()
    log = open(tmp_path / "app.log", "wb")
    # `augment app` replaces itself with the Streamlit server, so this PID is the server's.
    server = subprocess.Popen([sys.executable, "-m", "commands.cli", "app", "--config", SMOKE, "--set",
                               f"run.data_root={smoke_root}", "--port", str(port)], cwd=layout.REPO_ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok", 180,
                   f"the app on {url} (log: {tmp_path / 'app.log'})")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def grid_sources(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stMain'] [data-testid='stImage'] img")
    return [image.get_attribute("src") for image in images if image.get_attribute("naturalWidth") != "0"]


def test_generate_a_grid_switch_a_preset_and_take_a_screenshot(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(app_url)
    prompt = wait_until(lambda: browser.find_element(By.CSS_SELECTOR, "textarea[aria-label='Impression']"), 120,
                        "the Generate page")
    prompt.send_keys("Moderate right pleural effusion. Mild cardiomegaly.")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # commits the text as Streamlit does on blur
    time.sleep(1)
    button = next(element for element in browser.find_elements(By.CSS_SELECTOR, "button")
                  if element.text.strip() == "Generate")
    button.click()
    plain = wait_until(lambda: (found := grid_sources(browser)) and len(found) == COUNT and found, 300,
                       f"{COUNT} generated images")

    window = browser.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar'] input[aria-label='Window']")
    window.find_element(By.XPATH, "following-sibling::button").click()
    wait_until(lambda: next(option for option in browser.find_elements(By.CSS_SELECTOR, "[role='option']")
                            if option.text.strip() == "lung"), 30, "the lung preset in the list").click()
    windowed = wait_until(lambda: (found := grid_sources(browser)) and len(found) == COUNT
                          and not set(found) & set(plain) and found, 120, "the images redrawn with the lung window")
    assert len(windowed) == COUNT
    time.sleep(1)
    shot = tmp_path / "app.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("CXR_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CXR_APP_SCREENSHOT"])
