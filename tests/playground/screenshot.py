"""The README's screenshot: the playground on the bundled model after a generate run.

    python -m tests.playground.screenshot docs/img/playground.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.server import running_server
from tests.playground.browser import chromium, screenshot, wait_until

ROOT = Path(__file__).resolve().parents[2]


def main(out: Path) -> None:
    with running_server(ROOT / "model_store") as url, chromium(1000, 760) as driver:
        driver.get(f"{url}/")
        wait_until(driver, lambda d: d.find_element("id", "server-status").get_attribute("data-state") == "ready",
                   "the models")
        for field, value in {"gen-steps": 50, "gen-seed": 0, "gen-n": 16, "gen-preview-every": 10}.items():
            driver.find_element("id", field).clear()
            driver.find_element("id", field).send_keys(str(value))
        driver.find_element("css selector", "#generate button[type=submit]").click()
        status = driver.find_element("css selector", "#generate .status")
        wait_until(driver, lambda d: status.get_attribute("data-state") == "done", "the run", timeout=600)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1000, "height": height, "deviceScaleFactor": 1, "mobile": False})
        screenshot(driver, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
