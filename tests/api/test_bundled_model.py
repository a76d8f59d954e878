"""The bundled Fashion-MNIST model behind a real server: /invert then /generate reconstructs test images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.train.data import load_split
from harness.server import running_server
from tests.api.helpers import npy, png_b64

STORE = Path(__file__).resolve().parents[2] / "model_store"


@pytest.fixture(scope="module")
def bundled() -> Iterator[str]:
    with running_server(STORE, DDIM_MAX_BATCH_SIZE="8") as url:
        yield url


@pytest.mark.dataset("fashion-mnist")
def test_invert_then_generate_reconstructs_test_images(bundled: str) -> None:
    images, _ = load_split("test")
    picks = [0, 1, 2, 3]
    # 28x28 test images, padded to the model's 32x32 as in training
    padded = [Image.fromarray(np.pad(images[i], 2)) for i in picks]
    with httpx.Client(base_url=bundled, timeout=600) as c:
        inv = c.post("/invert", json={"images": [png_b64(im) for im in padded], "steps": 100})
        assert inv.status_code == 200, inv.text
        assert inv.json()["model"] == "fashion-mnist"  # the default model
        x_T = inv.json()["x_T"]
        gen = c.post("/generate", json={"n": len(picks), "steps": 100, "x_T": x_T, "clip_denoised": False,
                                        "return_latents": True})
        assert gen.status_code == 200, gen.text
    x0 = np.clip(npy(gen.json()["x_0"]), -1, 1)
    target = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in padded])[:, None]
    mse = (((x0 - target) / 2) ** 2).mean(axis=(1, 2, 3))  # pixels in [0, 1]
    assert mse.max() <= 0.005, mse
    # /invert's own round trip reports the same errors
    with httpx.Client(base_url=bundled, timeout=600) as c:
        inv = c.post("/invert", json={"images": [png_b64(im) for im in padded], "steps": 100,
                                      "return_reconstruction": True}).json()
    np.testing.assert_allclose(inv["reconstruction_mse"], mse, rtol=0, atol=1e-4)
