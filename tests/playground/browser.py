"""Headless Chromium driven by selenium through the system chromedriver (never one downloaded by selenium), with
the page's console and its network requests (the CDP performance log) readable by tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REQUIRED = os.environ.get("DDIM_REQUIRE_BROWSER") == "1"  # .ci/run sets it: CI never skips the browser tests


def _missing() -> str | None:
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium; skips (fails under DDIM_REQUIRE_BROWSER=1) when chromium, chromedriver or selenium
    is missing."""
    missing = _missing()
    if missing:
        if REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium manager, should anything call it, must not download
    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--mute-audio", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(shutil.which("chromedriver"))), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def requests_sent(driver: Any) -> list[dict[str, Any]]:
    """The requests the page sent since the last call: {url, method, headers} (from the CDP network log)."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            out.append({"url": request["url"], "method": request["method"], "headers": request.get("headers", {})})
    return out


def console_errors(driver: Any, allow: Callable[[dict[str, Any]], bool] = lambda e: False) -> list[dict[str, Any]]:
    """Console messages at level SEVERE since the last call, except those allow() accepts."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not allow(e)]


def wait_until(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message=f"waiting for {what}")


def download(driver: Any, link: Any, folder: Path) -> Path:
    """Click a download link as a user would; the file Chromium saved into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    link.click()
    name = link.get_attribute("download")
    wait_until(driver, lambda d: (folder / name).is_file() and not list(folder.glob("*.crdownload")),
               f"the download of {name}")
    return folder / name


def screenshot(driver: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
