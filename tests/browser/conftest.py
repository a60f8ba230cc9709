"""One headless Debian Chromium per test module, driven by Selenium; nothing downloads a browser.

The tests skip, saying why, when Selenium, /usr/bin/chromium or /usr/bin/chromedriver is
missing (CI installs them: `apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1500,950",
]


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} is missing: apt-get install -y chromium chromium-driver (package {package})"
    return None


class Browser:
    """A Chromium page with its console and network logs."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def open(self, path: Path, timeout: float = 20.0) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get_log("browser")  # drop what earlier pages logged
        self.driver.get_log("performance")
        self.driver.get(Path(path).resolve().as_uri())
        WebDriverWait(self.driver, timeout).until(lambda d: d.execute_script("return document.body && document.body.dataset.ready === '1'"))

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def text(self, selector: str) -> str:
        return self.js("return document.querySelector(arguments[0]).textContent", selector)

    def console_errors(self) -> list[dict]:
        return [entry for entry in self.driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]

    def requests(self) -> list[tuple[str, str]]:
        """(document URL, requested URL) of every request since the page was opened: the page
        itself, anything it asked for, and Chromium's own (its new-tab page at start-up)."""
        found = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                params = message["params"]
                found.append((params.get("documentURL", ""), params["request"]["url"]))
        return found

    def drawn_edges(self) -> list[str]:
        return self.js("return Array.from(document.querySelectorAll('svg#graph .edge')).map(e => e.dataset.name)")

    def set_slider(self, n: int) -> None:
        self.js("const s = document.getElementById('slider'); s.value = String(arguments[0]); s.dispatchEvent(new Event('input', {bubbles: true}));", n)

    def screenshot(self, directory: Path, name: str) -> Path:
        path = Path(directory) / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"
        return path


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        pytest.skip(f"browser tests need headless Chromium: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="circuitctl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # an explicit driver path: Selenium Manager (which may download drivers) is never started
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
