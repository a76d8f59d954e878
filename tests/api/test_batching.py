"""Step-level batching through a real server: shared forwards, joining mid-run, batch-invariant latents."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from tests.api.helpers import forwards, npy, png

GEN = "/generate"


def _post(server: str, body: dict[str, Any], done: dict[str, float] | None = None, key: str = "") -> dict[str, Any]:
    with httpx.Client(base_url=server, timeout=300) as c:
        r = c.post(GEN, json=body)
    assert r.status_code == 200, r.text
    if done is not None:
        done[key] = time.monotonic()
    return r.json()


def test_concurrent_requests_share_forwards_and_match_solo_runs(server: str, client: httpx.Client) -> None:
    a = {"model": "tiny-rgb", "n": 2, "steps": 60, "eta": 0.0, "seed": 11, "return_latents": True}
    b = {"model": "tiny-rgb", "n": 3, "steps": 40, "eta": 0.8, "schedule": "trailing", "seed": 21,
         "return_latents": True}
    c = {"model": "tiny-rgb", "n": 1, "steps": 30, "eta": 1.0, "variance": "large", "schedule": "quadratic", "seed": 5,
         "return_latents": True}
    images = _post(server, {"model": "tiny-rgb", "n": 2, "steps": 5, "seed": 3})["images"]
    inv = {"model": "tiny-rgb", "images": images, "steps": 50, "schedule": "quadratic"}
    before = forwards(client, "tiny-rgb")
    with ThreadPoolExecutor(4) as pool:  # generation and inversion, four plans, all at once
        futures = [pool.submit(_post, server, body) for body in (a, b, c)]
        inverted = pool.submit(lambda: httpx.post(f"{server}/invert", json=inv, timeout=300).json())
        together = [f.result() for f in futures]
        inverted_x_T = npy(inverted.result()["x_T"])
    shared = forwards(client, "tiny-rgb") - before
    # 180 request-steps in all; run back to back they would take 180 forwards, fully overlapped 60
    assert shared <= 60 + 40, f"{shared} forwards for 180 request-steps: too little was shared"
    for body, res in zip([a, b, c], together):
        solo = _post(server, body)
        for key in ("x_T", "x_0"):
            np.testing.assert_allclose(npy(res[key]), npy(solo[key]), rtol=0, atol=1e-4)
    solo_inv = npy(httpx.post(f"{server}/invert", json=inv, timeout=300).json()["x_T"])
    np.testing.assert_allclose(inverted_x_T, solo_inv, rtol=0, atol=1e-4)


def test_short_request_joins_and_finishes_before_a_long_one(server: str) -> None:
    done: dict[str, float] = {}
    long = threading.Thread(target=_post, args=(server, {"model": "tiny", "n": 8, "steps": 200, "seed": 1}, done,
                                                "long"))
    long.start()
    with httpx.Client(base_url=server, timeout=60) as c:  # wait until the long request is running
        deadline = time.monotonic() + 60
        while not any(m["active"] for m in c.get("/models").json()["models"] if m["name"] == "tiny"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    _post(server, {"model": "tiny", "n": 1, "steps": 5, "seed": 2}, done, "short")
    long.join()
    assert done["short"] < done["long"]


def test_seed_contract_image_i_is_seed_plus_i(client: httpx.Client) -> None:
    body = {"model": "tiny-rgb", "n": 4, "steps": 12, "eta": 0.5, "seed": 100, "return_latents": True}
    batch = client.post(GEN, json=body).json()
    assert batch["seed"] == 100
    for i in (0, 3):
        one = client.post(GEN, json={**body, "n": 1, "seed": 100 + i}).json()
        np.testing.assert_allclose(npy(one["x_T"])[0], npy(batch["x_T"])[i], rtol=0, atol=1e-6)
        np.testing.assert_allclose(npy(one["x_0"])[0], npy(batch["x_0"])[i], rtol=0, atol=1e-4)
        pixels = np.asarray(png(one["images"][0]), dtype=int) - np.asarray(png(batch["images"][i]), dtype=int)
        assert np.abs(pixels).max() <= 1
    random_seed = client.post(GEN, json={"model": "tiny", "steps": 3}).json()["seed"]
    assert isinstance(random_seed, int)
    again = client.post(GEN, json={"model": "tiny", "steps": 3, "seed": random_seed}).json()
    assert again["images"] == client.post(GEN, json={"model": "tiny", "steps": 3, "seed": random_seed}).json()["images"]


def test_given_latents_run_as_given(client: httpx.Client) -> None:
    first = client.post(GEN, json={"model": "tiny", "n": 2, "steps": 8, "seed": 4, "return_latents": True}).json()
    replay = client.post(GEN, json={"model": "tiny", "n": 2, "steps": 8, "x_T": first["x_T"],
                                    "return_latents": True}).json()
    np.testing.assert_allclose(npy(replay["x_0"]), npy(first["x_0"]), rtol=0, atol=1e-5)


def test_a_client_that_goes_away_frees_its_slots(server: str, client: httpx.Client) -> None:
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(f"{server}{GEN}", json={"model": "tiny", "n": 4, "steps": 1000}, timeout=0.5)
    deadline = time.monotonic() + 10
    while any(m["active"] or m["waiting"] for m in client.get("/models").json()["models"]):
        assert time.monotonic() < deadline, "the abandoned job kept running"
        time.sleep(0.05)
    assert 'ddim_requests_rejected_total{reason="client_gone"}' in client.get("/metrics").text
