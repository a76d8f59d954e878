"""The Python client against a text model: prompt=, negative_prompt=, width= and height= pass through."""

from __future__ import annotations

from pathlib import Path

from ddim_client import Client

from harness.server import running_server


def test_the_client_takes_prompts_and_sizes(pipeline_store: Path) -> None:
    with running_server(pipeline_store, DDIM_DEFAULT_MODEL="sd") as url, Client(url) as client:
        result = client.generate(model="sd", prompt=["a cat", "a dog"], negative_prompt="blurry", n=2, steps=2,
                                 seed=1, width=48, height=40, return_latents=True)
    assert [im.size for im in result.images] == [(48, 40)] * 2
    assert result.x_0 is not None and result.x_0.shape == (2, 4, 10, 12)  # latents
    assert result.raw["prompt"] == ["a cat", "a dog"] and result.raw["guidance_scale"] == 7.5
