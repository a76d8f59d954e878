"""/docs (Swagger UI) renders in a real browser with nothing loaded from outside the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.playground.browser import requests_sent, screenshot, wait_until


def test_docs_render_with_nothing_from_outside(browser: Any, server: str,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    requests_sent(browser)  # forget earlier pages' requests
    browser.get(f"{server}/docs")
    sent = requests_sent(browser)
    outside = [r["url"] for r in sent if not r["url"].startswith((server + "/", "data:", "blob:"))]
    assert sent and not outside, f"/docs loads from outside the server: {outside}"
    title = wait_until(browser, lambda d: d.find_elements("css selector", ".swagger-ui .info .title"),
                       "Swagger UI to render", timeout=30)
    assert "ddim-serve" in title[0].text
    assert browser.find_elements("css selector", ".opblock-summary-path[data-path='/generate']")
    screenshot(browser, Path(tmp_path_factory.getbasetemp()) / "playground-screenshots" / "docs.png")
