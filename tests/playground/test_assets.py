"""The playground's page and assets as served (no browser): types, the CSP, nothing from outside, package data."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx

from app.playground import STATIC

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_and_every_asset_it_names_are_served(server: str) -> None:
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:href|src)="(playground/[^"]+)"', page.text)
    for js in STATIC.glob("*.js"):
        assets += [f"playground/{name}" for name in re.findall(r'from "\./([^"]+)"', js.read_text())]
    assert {"playground/playground.css", "playground/playground.js", "playground/api.js"} <= set(assets)
    for asset in set(assets):
        r = httpx.get(f"{server}/{asset}")
        assert r.status_code == 200, asset
        kind = "text/css" if asset.endswith(".css") else "text/javascript"
        assert r.headers["content-type"].startswith(kind), (asset, r.headers["content-type"])
    assert httpx.get(f"{server}/playground/missing.js").status_code == 404


def test_nothing_is_loaded_from_outside_and_every_file_ships_in_the_package() -> None:
    for path in STATIC.iterdir():
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in package_data["app.playground"] for p in (STATIC.parent).glob(pattern)}
    assert shipped == set(STATIC.iterdir())
