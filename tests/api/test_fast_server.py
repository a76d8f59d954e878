"""The server's default fast path (auto dtype, auto layout) against the plain path, end to end."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import torch

from app.models.fast import bf16_supported
from harness.server import running_server
from tests.api.helpers import npy

# bf16 keeps 8 mantissa bits; over S = 10 deterministic steps the relative L2 error of x_0 stays
# within 3e-2 (float32 with channels_last alone: 1e-5)
TOLERANCE = 3e-2 if bf16_supported(torch.device("cpu")) else 1e-5


def test_default_fast_path_matches_the_plain_path(tiny_store: Path, client: httpx.Client) -> None:
    body = {"model": "tiny-rgb", "n": 3, "steps": 10, "seed": 7, "return_latents": True}
    plain = npy(client.post("/generate", json=body).json()["x_0"])
    with running_server(tiny_store, plain=False) as url:
        info = {m["name"]: m for m in httpx.get(f"{url}/models").json()["models"]}["tiny-rgb"]
        assert isinstance(info["channels_last"], bool)  # auto: timed at startup, in a throwaway process
        assert info["dtype"] == ("bfloat16" if bf16_supported(torch.device("cpu")) else "float32")
        fast = npy(httpx.post(f"{url}/generate", json=body, timeout=120).json()["x_0"])
    assert np.linalg.norm(fast - plain) / np.linalg.norm(plain) < TOLERANCE
    assert not np.array_equal(fast, plain) or info["dtype"] == "float32"
