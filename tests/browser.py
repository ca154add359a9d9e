"""Debian's headless Chromium, driven through its chromedriver (selenium), for the pages abflow serves.

Never a browser a test tool downloads. The CI installs Debian's chromium and chromium-driver and sets
ABFLOW_REQUIRE_BROWSER=1, so a missing browser fails there; elsewhere such tests are skipped.
Every host but the loopback resolves to nothing: a page that needs the internet (a CDN, web fonts)
shows that here as it would where abflow runs offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

REQUIRED = os.environ.get("ABFLOW_REQUIRE_BROWSER") == "1"


def _binary(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium (selenium WebDriver) with no network but the loopback."""
    browser, driver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if browser is None or driver is None:
        if REQUIRED:
            pytest.fail("Debian's chromium and chromium-driver are required (ABFLOW_REQUIRE_BROWSER=1)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    with tempfile.TemporaryDirectory() as profile:
        for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        try:
            yield session
        finally:
            session.quit()
