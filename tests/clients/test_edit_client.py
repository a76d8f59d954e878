"""Editing through ddim_client against a real server over the class-conditional tiny flow model: client.edit and
client.generate(image=, strength=) give the raw HTTP answers, decoded; an edit's progress runs over both legs (2k
steps); an edit job's result is the synchronous answer."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from ddim_client import Client, Event, InvalidRequest
from PIL import Image

from harness.server import running_server


@pytest.fixture(scope="module")
def server(cond_store: Path) -> Iterator[str]:
    with running_server(cond_store, DDIM_DEFAULT_MODEL="tiny-flow") as url:
        yield url


def _image(seed: int) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_client_edit_and_img2img_equal_the_raw_answers(server: str) -> None:
    a, b = _image(1), _image(2)
    fields = {"source_class_label": "cat", "class_label": "dog", "guidance_scale": 2.0, "strength": 0.6, "steps": 10,
              "return_latents": True}
    with Client(server) as client, httpx.Client(base_url=server, timeout=60) as raw:
        got = client.edit([a, b], **fields)
        want = raw.post("/edit", json={**fields, "images": [_b64(a), _b64(b)]}).json()
        assert got.raw == want and len(got.images) == 2 and got.x_T is not None and got.x_T.shape[0] == 2
        assert want["strength_steps"] == 6 and want["source_class_label"] == ["cat", "cat"]
        got = client.generate(image=a, strength=0.5, n=2, seed=3, steps=10, class_label="dog")
        want = raw.post("/generate", json={"image": _b64(a), "strength": 0.5, "n": 2, "seed": 3, "steps": 10,
                                           "class_label": "dog"}).json()
        assert got.raw == want and want["strength_steps"] == 5
        with pytest.raises(InvalidRequest, match="strength"):
            client.edit(a, strength=0.01, steps=10)


def test_edit_progress_covers_both_legs_and_jobs_answer_alike(server: str) -> None:
    a = _image(3)
    seen: list[Event] = []
    with Client(server) as client:
        result = client.edit(a, class_label="ankle boot", strength=0.5, steps=8, on_progress=seen.append)
        assert [e.step for e in seen][-1] == 8 and {e.steps for e in seen} == {8}  # k = 4 each way
        job = client.submit("edit", images=[a], class_label="ankle boot", strength=0.5, steps=8)
        assert job.result().raw == result.raw
