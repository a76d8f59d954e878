"""API keys, per-key job visibility, /metrics auth and CORS on a real server; keys never reach the log."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.server import running_server

KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"


@pytest.fixture(scope="module")
def secured(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# team b\nsha256:{hashlib.sha256(KEY_B.encode()).hexdigest()}\n\n")
    with running_server(tiny_store, DDIM_API_KEYS=f" {KEY_A} ,", DDIM_API_KEYS_FILE=str(keys),
                        DDIM_CORS_ORIGINS="http://playground.test") as url:
        yield url


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_work_needs_a_key_and_probes_do_not(secured: str) -> None:
    with httpx.Client(base_url=secured, timeout=60) as c:
        for headers in ({}, _auth("wrong"), {"authorization": KEY_A}):
            r = c.post("/generate", json={"steps": 2}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in r.json()["detail"]
        assert c.get("/jobs/abc", headers={}).status_code == 401
        assert c.get("/models").status_code == 401
        for key in (KEY_A, KEY_B):  # the plain key, and the key given by its digest in the file
            assert c.post("/generate", json={"steps": 2}, headers=_auth(key)).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/playground/playground.js"):
            assert c.get(path).status_code == 200, path


def test_a_job_is_visible_only_to_its_key(secured: str) -> None:
    with httpx.Client(base_url=secured, timeout=60) as c:
        job = c.post("/jobs/generate", json={"steps": 2}, headers=_auth(KEY_A)).json()
        assert c.get(f"/jobs/{job['id']}", headers=_auth(KEY_A)).status_code == 200
        for method in ("GET", "DELETE"):
            assert c.request(method, f"/jobs/{job['id']}", headers=_auth(KEY_B)).status_code == 404
        assert c.get(f"/jobs/{job['id']}/result", headers=_auth(KEY_B)).status_code == 404


def test_keys_never_reach_the_log_but_key_ids_do(secured: str) -> None:
    with httpx.Client(base_url=secured, timeout=60) as c:
        c.post("/generate", json={"steps": 2}, headers=_auth(KEY_A), timeout=60)
        c.post("/generate", json={"steps": 2}, headers=_auth("a-wrong-key-xyz"))
        metrics = c.get("/metrics").text
    port = secured.rsplit(":", 1)[1]
    log = (Path("/tmp") / f"ddim-serve-{port}.log").read_text()
    assert hashlib.sha256(KEY_A.encode()).hexdigest()[:12] in log
    for secret in (KEY_A, KEY_B, "a-wrong-key-xyz"):
        assert secret not in log and secret not in metrics


def test_cors_allows_only_the_listed_origins(secured: str) -> None:
    with httpx.Client(base_url=secured, timeout=60) as c:
        pre = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
        ok = c.options("/generate", headers={"origin": "http://playground.test", **pre})
        assert ok.headers.get("access-control-allow-origin") == "http://playground.test"
        other = c.options("/generate", headers={"origin": "http://evil.test", **pre})
        assert "access-control-allow-origin" not in other.headers


def test_no_cross_origin_access_by_default_and_metrics_auth(tiny_store: Path) -> None:
    with running_server(tiny_store, DDIM_API_KEYS=KEY_A, DDIM_METRICS_AUTH="true") as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/generate", json={"steps": 2}, headers={**_auth(KEY_A), "origin": "http://evil.test"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=_auth(KEY_A)).status_code == 200
