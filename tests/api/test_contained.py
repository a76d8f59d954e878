"""A store with folders that cannot load, on a real server: the others serve, the failures say why (issue 24)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from harness.server import server_process
from tests.conftest import FAILED, TINY_CLASSES, TINY_UNET


def test_the_healthy_models_serve_and_the_failed_ones_say_why(mixed_store: Path) -> None:
    with server_process(mixed_store) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["failed"] == list(FAILED)
        assert len(ready.content) < 500
        listed = {m["name"]: m for m in http.get("/models").json()["models"]}
        assert {n: m["status"] for n, m in listed.items()} == {
            "tiny": "ready", "tiny-cond": "ready", **{n: "failed" for n in FAILED}}
        assert "KandinskyV22Pipeline" in listed["kandinsky"]["error"]
        assert "truncated/unet/diffusion_pytorch_model.safetensors" in listed["truncated"]["error"]
        for name in FAILED:
            assert len(listed[name]["error"]) < 600 and "\n" not in listed[name]["error"]

        ok = http.post("/generate", json={"model": "tiny", "steps": 2, "seed": 1})
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1

        refused = http.post("/generate", json={"model": "truncated", "steps": 2})
        assert refused.status_code == 424 and "retry-after" not in refused.headers
        detail = refused.json()["detail"][0]
        assert detail["field"] == "model" and listed["truncated"]["error"] in detail["msg"]
        job = http.post("/jobs/generate", json={"model": "kandinsky", "steps": 2})
        assert job.status_code == 424

        metrics = http.get("/metrics").text
        assert 'ddim_model_load_failed{model="truncated"} 1.0' in metrics
    lines = [json.loads(line) for line in _server_log(url).splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "error" and "failed to load" in line["msg"]]
    assert sorted(e["msg"].split()[1] for e in errors) == sorted(FAILED)  # one line per failed model
    assert all("traceback" not in e for e in errors)


def _server_log(url: str) -> str:
    import os

    port = url.rsplit(":", 1)[1]
    return (Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-{port}.log").read_text()


def test_require_all_models_keeps_readyz_503_but_serves_the_healthy(mixed_store: Path) -> None:
    with server_process(mixed_store, wait_for="/healthz", DDIM_REQUIRE_ALL_MODELS="1") as (url, _), \
            httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(600):
            if http.get("/models").status_code == 200:
                break
            time.sleep(0.1)
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "DDIM_REQUIRE_ALL_MODELS" in ready.json()["detail"]
        assert http.post("/generate", json={"model": "tiny", "steps": 2, "seed": 1}).status_code == 200


def test_a_store_where_nothing_loads_is_not_ready_and_says_why(tmp_path: Path, mixed_store: Path) -> None:
    shutil.copytree(mixed_store / "truncated", tmp_path / "truncated")
    with server_process(tmp_path, wait_for="/healthz") as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(600):
            if http.get("/models").status_code == 200:
                break
            time.sleep(0.1)
        assert http.get("/models").json()["models"][0]["status"] == "failed"
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "truncated" in ready.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"model": "tiny", "guidance_scale": 3.0}, "guidance_scale"),  # not a conditional model
    ({"model": "tiny-cond", "guidance_scale": 3.0}, "guidance_scale"),  # conditional, but no class_label
    ({"model": "tiny", "variance": "large", "eta": 0.5}, "eta"),
    ({"model": "tiny", "seed": 3, "x_T": "AAAA"}, "x_T"),  # a bad x_T is named before the seed
])
def test_values_without_effect_are_refused(mixed_store: Path, body: dict, field: str, request) -> None:
    url = request.getfixturevalue("shared_server")
    r = httpx.post(f"{url}/generate", json={"steps": 2, **body}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text


def test_a_seed_with_deterministic_x_T_is_refused(request) -> None:
    import numpy as np

    from tests.api.helpers import npy_b64

    url = request.getfixturevalue("shared_server")
    x_T = npy_b64(np.zeros((1, 1, TINY_UNET["sample_size"], TINY_UNET["sample_size"]), np.float32))
    r = httpx.post(f"{url}/generate", json={"model": "tiny", "steps": 2, "x_T": x_T, "seed": 3}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "seed"
    guided = {"model": "tiny-cond", "steps": 2, "seed": 1, "class_label": TINY_CLASSES[0], "guidance_scale": 3.0}
    assert httpx.post(f"{url}/generate", json=guided, timeout=60).status_code == 200


@pytest.fixture(scope="module")
def shared_server(mixed_store: Path):
    with server_process(mixed_store) as (url, _):
        yield url
