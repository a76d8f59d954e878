"""The client does not retry a model that failed to load (424): it raises ModelFailed at once, with the load error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ddim_client import Client, ModelFailed

from harness.server import running_server


def test_a_failed_model_raises_at_once(mixed_store: Path) -> None:
    with running_server(mixed_store) as url, Client(url, retries=5) as client:
        started = time.monotonic()
        with pytest.raises(ModelFailed) as e:
            client.generate(model="truncated", steps=2)
        assert time.monotonic() - started < 5  # one answer, no retries
        assert e.value.status == 424 and "truncated/unet/diffusion_pytorch_model.safetensors" in str(e.value)
        assert client.generate(model="tiny", steps=2, seed=0).images
