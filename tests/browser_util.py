"""Headless Chromium for the browser tests: Debian's ``chromium`` and ``chromium-driver`` packages,
driven by Selenium through that chromedriver (Selenium never downloads a browser here).

A missing browser fails the tests with the command that installs it (``.ci/run`` runs it);
``RAYSEG_SKIP_BROWSER_TESTS=1`` skips them instead, for a box that cannot have one.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

SKIP_ENV = "RAYSEG_SKIP_BROWSER_TESTS"
INSTALL = "apt-get install -y chromium chromium-driver"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser_paths() -> tuple[str | None, str | None]:
    """(browser binary, chromedriver) found on PATH, None where missing."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    return browser, shutil.which("chromedriver")


def start_chromium(width: int = 1280, height: int = 1000) -> Any:
    """A headless Chromium WebDriver; fails (or skips, with ``RAYSEG_SKIP_BROWSER_TESTS=1``)
    with the install command when the browser, its driver or Selenium is missing."""
    browser, driver = browser_paths()
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver))
               if path is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        message = (f"browser tests need {', '.join(missing)}: run `{INSTALL}` as root (.ci/run "
                   f"does) and `pip install -e '.[test]'`; or set {SKIP_ENV}=1 to skip them")
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox",  # root in containers has no user namespace
                 "--disable-dev-shm-usage", "--disable-gpu", "--disable-extensions",
                 "--no-first-run", "--allow-file-access-from-files",
                 "--force-color-profile=srgb", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def wait_for(driver: Any, script: str, timeout_s: float = 60.0) -> Any:
    """Poll ``return <script>`` until it is truthy; returns that value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
        lambda d: d.execute_script(f"return {script}"))


def canvas_rgba(driver: Any, canvas_id: str) -> list[int]:
    """The RGBA bytes of a canvas, read back with ``getImageData``."""
    return driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        canvas_id)
