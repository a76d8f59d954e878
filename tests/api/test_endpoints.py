"""Every endpoint in each output form, decoded for real (PNG, GIF, .npy), plus health and models."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.api.helpers import npy, npy_b64, png, png_b64


def test_health_ready_models(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"tiny", "tiny-rgb"}
    tiny = models["tiny"]
    assert tiny["default"] and not models["tiny-rgb"]["default"]
    for key, value in {"image_size": [8, 8], "channels": 1, "num_train_timesteps": 1000, "beta_schedule": "linear",
                       "prediction_type": "epsilon", "device": "cpu", "dtype": "float32"}.items():
        assert tiny[key] == value, key


def test_generate_json_png_npy(client: httpx.Client) -> None:
    body = {"model": "tiny-rgb", "n": 3, "steps": 6, "seed": 9, "return_latents": True}
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    res = r.json()
    assert {k: res[k] for k in ("model", "seed", "n", "steps", "eta", "schedule")} == {
        "model": "tiny-rgb", "seed": 9, "n": 3, "steps": 6, "eta": 0.0, "schedule": "uniform"}
    images = [png(s) for s in res["images"]]
    assert len(images) == 3 and all(im.format == "PNG" and im.size == (8, 8) and im.mode == "RGB" for im in images)
    x_T, x_0 = npy(res["x_T"]), npy(res["x_0"])
    assert x_T.shape == x_0.shape == (3, 3, 8, 8) and x_0.dtype == np.float32
    # the PNG is the x_0 latents mapped from [-1, 1] to 0..255
    expected = ((np.clip(x_0[0], -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    assert np.abs(np.asarray(images[0], dtype=int) - expected).max() <= 1

    r = client.post("/generate", json=body, headers={"accept": "image/png"})
    assert r.headers["content-type"] == "image/png"
    grid = png(r.content)
    assert grid.size == (2 * 10 + 2, 2 * 10 + 2)  # 3 images in a 2x2 grid of 8 px tiles with 2 px gaps
    one = png(client.post("/generate", json={**body, "n": 1}, headers={"accept": "image/png"}).content)
    assert one.size == (8, 8)

    r = client.post("/generate", json=body, headers={"accept": "application/x-npy"})
    assert r.headers["content-type"] == "application/x-npy"
    np.testing.assert_allclose(npy(r.content), x_0, atol=1e-5)


def test_invert_json_npy_and_multipart(client: httpx.Client) -> None:
    gen = client.post("/generate", json={"model": "tiny-rgb", "n": 2, "steps": 10, "seed": 1}).json()
    body = {"model": "tiny-rgb", "images": gen["images"], "steps": 10, "return_reconstruction": True}
    res = client.post("/invert", json=body).json()
    x_T = npy(res["x_T"])
    assert x_T.shape == (2, 3, 8, 8)
    assert len(res["reconstruction"]) == 2 and png(res["reconstruction"][0]).size == (8, 8)
    assert len(res["reconstruction_mse"]) == 2 and all(0 <= m < 1 for m in res["reconstruction_mse"])
    r = client.post("/invert", json=body, headers={"accept": "application/x-npy"})
    np.testing.assert_allclose(npy(r.content), x_T, atol=1e-5)
    files = [("files", (f"{i}.png", base64.b64decode(s), "image/png")) for i, s in enumerate(gen["images"])]
    r = client.post("/invert", files=files, data={"model": "tiny-rgb", "steps": "10"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(npy(r.json()["x_T"]), x_T, atol=1e-5)


def test_invert_resizes_crops_and_converts(client: httpx.Client) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    jpeg = png_b64(rgb, "JPEG")
    res = client.post("/invert", json={"model": "tiny", "images": [jpeg], "steps": 5}).json()
    assert npy(res["x_T"]).shape == (1, 1, 8, 8)  # 60x40 RGB JPEG -> 8x8 grey


def test_interpolate_json_gif_png_and_endpoint_equalities(client: httpx.Client) -> None:
    body = {"model": "tiny-rgb", "start": {"seed": 3}, "end": {"seed": 8}, "frames": 5, "steps": 10,
            "return_latents": True}
    res = client.post("/interpolate", json=body).json()
    frames = [np.asarray(png(s), dtype=int) for s in res["images"]]
    assert len(frames) == 5 and npy(res["x_T"]).shape == (5, 3, 8, 8)
    for seed, frame in ((3, frames[0]), (8, frames[-1])):
        ref = client.post("/generate", json={"model": "tiny-rgb", "seed": seed, "steps": 10, "eta": 0}).json()
        assert np.abs(np.asarray(png(ref["images"][0]), dtype=int) - frame).max() <= 1
    gif = Image.open(io.BytesIO(client.post("/interpolate", json=body, headers={"accept": "image/gif"}).content))
    assert gif.format == "GIF" and gif.n_frames == 5
    strip = png(client.post("/interpolate", json=body, headers={"accept": "image/png"}).content)
    assert strip.size == (5 * 10 + 2, 12)
    # ends given as latents and as an image
    lat = npy(res["x_T"])
    res2 = client.post("/interpolate", json={**body, "start": {"x_T": npy_b64(lat[:1])},
                                             "end": {"image": res["images"][-1]}, "method": "lerp"}).json()
    assert np.abs(np.asarray(png(res2["images"][0]), dtype=int) - frames[0]).max() <= 1


def test_request_id_is_echoed_and_logged_as_one_json_line(server: str, client: httpx.Client) -> None:
    r = client.post("/generate", json={"model": "tiny", "n": 2, "steps": 4, "eta": 0.5, "seed": 1},
                    headers={"x-request-id": "req-abc-123"})
    assert r.headers["x-request-id"] == "req-abc-123"
    generated = client.post("/generate", json={"steps": 0}).headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-{server.rsplit(':', 1)[1]}.log"
    deadline = time.monotonic() + 10  # the line is written just after the response is sent
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        if any(x.get("request_id") == generated for x in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    mine = [x for x in lines if x.get("request_id") == "req-abc-123"]
    assert len(mine) == 1
    entry = mine[0]
    assert {k: entry[k] for k in ("endpoint", "model", "n", "steps", "eta", "status")} == {
        "endpoint": "/generate", "model": "tiny", "n": 2, "steps": 4, "eta": 0.5, "status": 200}
    assert 0 <= entry["queue_seconds"] <= entry["total_seconds"]
    assert any(x.get("request_id") == generated and x["status"] == 422 for x in lines)


def test_gauges_return_to_zero_when_idle(client: httpx.Client) -> None:
    client.post("/generate", json={"model": "tiny", "n": 3, "steps": 20})
    text = client.get("/metrics").text
    assert 'ddim_active_samples{model="tiny"} 0.0' in text
    assert 'ddim_queue_depth{model="tiny"} 0.0' in text
