"""The interactive docs work on a closed network: /docs and /redoc load every asset from the server itself."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_no_external_asset_and_their_assets_answer(client: httpx.Client, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    urls = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""url\s*:\s*['"]([^'"]+)['"]""", html)  # the spec that the page's script loads
    assert any(u.endswith(".js") for u in urls), urls  # the page does load its UI from somewhere
    external = [u for u in urls if re.match(r"^(https?:)?//", u)]
    assert external == [], external
    assert not re.search(r"https?://", html), "an absolute URL is left in the page"
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], (url, asset.headers["content-type"])
