"""The headless browser of the page tests: Debian's chromium + chromium-driver (``make browser``,
infra/browser/install.sh), driven by selenium. A pytest plugin (``tests/conftest.py``): the ``driver`` fixture, one
browser per session; skips with what is missing and how to install it when the browser is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def console_errors(driver) -> list[dict]:
    """SEVERE browser-log entries: uncaught JS exceptions, failed resource loads and console.error."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="session")
def driver():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"headless browser not installed ({', '.join(missing)} missing): run `make browser` "
                    "(infra/browser/install.sh: Debian chromium + chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed in the venv: pip install -e '.[dev]' (or `make install`)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600",
                "--force-color-profile=srgb"):  # sRGB: the screenshot's pixels are the PNG's colours
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    d.set_page_load_timeout(30)
    yield d
    d.quit()


