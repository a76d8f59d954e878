"""ddim_client against a real server: it gives the raw HTTP answers exactly, decoded; streams progress; drives jobs;
raises typed errors carrying the server's detail; retries 429 after Retry-After."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ddim_client import (
    AsyncClient,
    Client,
    Event,
    InvalidRequest,
    JobCancelled,
    NotFound,
    Overloaded,
    Result,
    RetryPolicy,
)
from PIL import Image

from tests.api.helpers import npy, png, wait_for

LONG = {"n": 8, "steps": 1000, "seed": 1}  # fills DDIM_MAX_QUEUE=8, and runs for seconds on the tiny model


@pytest.fixture
def raw(server: str) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c  # type: ignore[misc]


@pytest.fixture
def client(server: str) -> Client:
    with Client(server) as c:
        yield c  # type: ignore[misc]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def assert_decoded(result: Result, answer: dict[str, Any]) -> None:
    """result is answer, decoded: the same JSON, its images and arrays."""
    assert result.raw == answer
    images = answer.get("images", answer.get("reconstruction", []))
    assert len(result.images) == len(images)
    for got, sent in zip(result.images, images):
        assert isinstance(got, Image.Image) and np.array_equal(pixels(got), pixels(png(sent)))
    for key in ("x_T", "x_0"):
        value = getattr(result, key)
        assert (value is None) == (key not in answer)
        if value is not None:
            assert value.dtype == np.float32 and np.array_equal(value, npy(answer[key]))


def test_generate_gives_the_raw_answer_decoded(client: Client, raw: httpx.Client) -> None:
    body = {"n": 3, "steps": 5, "eta": 0.5, "seed": 11, "return_latents": True}
    result = client.generate(**body)
    assert_decoded(result, raw.post("/generate", json=body).json())
    assert result.x_T.shape == result.x_0.shape == (3, 1, 8, 8)  # type: ignore[union-attr]
    plain = client.generate(steps=3, seed=2)
    assert plain.x_T is None and plain.x_0 is None and len(plain.images) == 1
    x_T = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    from_latents = client.generate(n=2, steps=3, x_T=x_T, return_latents=True)
    assert np.array_equal(from_latents.x_T, x_T)  # type: ignore[arg-type]
    solver = {"n": 2, "steps": 4, "seed": 5, "sampler": "dpmsolver++", "solver_order": 3, "return_latents": True}
    assert_decoded(client.generate(**solver), raw.post("/generate", json=solver).json())


def test_invert_takes_paths_pil_images_bytes_and_arrays(client: Client, raw: httpx.Client, tmp_path: Path) -> None:
    image = raw.post("/generate", json={"steps": 4, "seed": 5}, headers={"accept": "image/png"}).content
    (tmp_path / "one.png").write_bytes(image)
    fields = {"steps": 6, "return_reconstruction": True}
    answer = raw.post("/invert", json={"images": [base64.b64encode(image).decode()], **fields}).json()
    by_path = client.invert(tmp_path / "one.png", **fields)
    assert_decoded(by_path, answer)
    assert by_path.raw["reconstruction_mse"] == answer["reconstruction_mse"]
    as_pil = png(image)
    for form in (str(tmp_path / "one.png"), image, as_pil, pixels(as_pil), pixels(as_pil) / 255.0):
        assert client.invert(form, **fields).raw == answer, type(form)
    two = client.invert([as_pil, tmp_path / "one.png"], steps=6)
    assert two.x_T.shape == (2, 1, 8, 8) and two.images == []  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="list of arrays"):
        client.invert(np.zeros((2, 8, 8, 1)), steps=2)


def test_interpolate_between_seeds_images_and_latents(client: Client, raw: httpx.Client, tmp_path: Path) -> None:
    body = {"start": {"seed": 1}, "end": {"seed": 2}, "frames": 4, "steps": 3, "return_latents": True}
    result = client.interpolate(1, 2, frames=4, steps=3, return_latents=True)
    assert_decoded(result, raw.post("/interpolate", json=body).json())
    assert len(result.images) == 4 and result.x_T.shape == (4, 1, 8, 8)  # type: ignore[union-attr]
    image = result.images[0]
    image.save(tmp_path / "a.png")
    mixed = client.interpolate(tmp_path / "a.png", result.x_T[3:4], frames=3, steps=3)  # type: ignore[index]
    assert len(mixed.images) == 3


def test_models(client: Client, raw: httpx.Client) -> None:
    assert client.models() == raw.get("/models").json()["models"]
    assert {m["name"] for m in client.models()} == {"tiny", "tiny-rgb"}


def test_on_progress_streams_previews_then_gives_the_result(client: Client, raw: httpx.Client) -> None:
    events: list[Event] = []
    body = {"n": 2, "steps": 6, "seed": 4, "preview_every": 2}
    result = client.generate(on_progress=events.append, **body)
    assert result.raw == raw.post("/generate", json=body).json()
    assert all(e.kind == "progress" and e.steps == 6 for e in events)
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] == 6
    previews = [e for e in events if e.preview is not None]
    assert previews and all(e.step % 2 == 0 for e in previews)
    assert previews[-1].preview.size[0] > 8  # type: ignore[union-attr]  # a grid of the two images


def test_jobs_submit_events_result_and_cancel(client: Client, raw: httpx.Client) -> None:
    job = client.submit("generate", n=2, steps=6, seed=9, preview_every=3)
    events = list(job.events())
    assert events[-1].kind == "result" and all(e.kind == "progress" for e in events[:-1])
    assert job.status() == "succeeded" and job.state()["progress"] == {"step": 6, "steps": 6}
    assert job.result().raw == raw.get(f"/jobs/{job.id}/result").json() == events[-1].result.raw  # type: ignore[union-attr]
    inverted = client.submit("invert", images=[job.result().images[0]], steps=4).result()
    assert inverted.x_T.shape == (1, 1, 8, 8)  # type: ignore[union-attr]

    long = client.submit("generate", **LONG)
    wait_for(raw, long.id, ("running",))
    assert long.cancel()["status"] == "cancelled"
    with pytest.raises(JobCancelled):
        long.result()
    assert client.job(long.id).status() == "cancelled"


def test_errors_are_typed_and_carry_the_detail(client: Client) -> None:
    with pytest.raises(InvalidRequest) as bad:
        client.generate(steps=0)
    assert bad.value.status == 422 and "steps" in bad.value.fields and "steps:" in str(bad.value)
    with pytest.raises(InvalidRequest, match="stpes"):
        client.generate(stpes=10)
    with pytest.raises(NotFound) as unknown:
        client.generate(model="nope", steps=2)
    assert "nope" in unknown.value.fields["model"]
    with pytest.raises(NotFound, match="no job"):
        client.job("0" * 32).status()
    with pytest.raises(InvalidRequest):  # an error inside a stream is the same typed error
        client.generate(steps=2, x_T=np.zeros((1, 3, 8, 8), np.float32), on_progress=print)


def test_429_is_retried_after_retry_after(server: str, raw: httpx.Client) -> None:
    long = raw.post("/jobs/generate", json=LONG).json()  # the whole queue of the model
    wait_for(raw, long["id"], ("running",))
    with Client(server, retries=0) as impatient, pytest.raises(Overloaded) as full:
        impatient.generate(steps=2)
    assert full.value.retry_after is not None and full.value.retry_after >= 1 and "queue" in str(full.value)

    refusals = queue_full(raw)
    outcome: list[Any] = []
    with Client(server, retries=1000, max_retry_wait=1.0) as patient:
        thread = threading.Thread(target=lambda: outcome.append(patient.generate(steps=2, seed=3)))
        thread.start()
        for _ in range(600):  # until the server has refused it at least once (bounded: 600 x 0.05 s)
            if queue_full(raw) > refusals:
                break
            threading.Event().wait(0.05)
        assert queue_full(raw) > refusals
        raw.delete(f"/jobs/{long['id']}")
        thread.join(120)
    assert outcome and outcome[0].raw == raw.post("/generate", json={"steps": 2, "seed": 3}).json()


def test_the_retry_policy_reads_retry_after_within_its_bound() -> None:
    policy = RetryPolicy(retries=2, max_wait=10.0)
    assert policy.wait(429, {"retry-after": "3"}, 0) == 3.0
    assert policy.wait(503, {"retry-after": "120"}, 1) == 10.0  # the bound
    assert policy.wait(429, {}, 1) == 2.0  # no advice: 1, 2, 4... s
    in_5_s = email.utils.formatdate(time.time() + 5, usegmt=True)  # an HTTP date
    assert 3.0 <= policy.wait(503, {"retry-after": in_5_s}, 0) <= 5.0  # type: ignore[operator]
    assert policy.wait(429, {"retry-after": "3"}, 2) is None  # retries spent
    assert policy.wait(500, {"retry-after": "3"}, 0) is None  # only 429 and 503 are retried


def queue_full(raw: httpx.Client) -> float:
    for line in raw.get("/metrics").text.splitlines():
        if line.startswith('ddim_requests_rejected_total{reason="queue_full"}'):
            return float(line.split()[-1])
    return 0.0


def test_async_client_has_the_same_methods(server: str, raw: httpx.Client) -> None:
    async def run() -> None:
        async with AsyncClient(server) as c:
            body = {"n": 2, "steps": 4, "seed": 8, "return_latents": True}
            assert_decoded(await c.generate(**body), raw.post("/generate", json=body).json())
            seen: list[int] = []

            async def note(event: Event) -> None:
                seen.append(event.step)
            streamed = await c.generate(steps=4, seed=8, n=2, return_latents=True, on_progress=note)
            assert streamed.raw == raw.post("/generate", json=body).json() and seen[-1] == 4
            assert (await c.models())[0]["name"] == "tiny"
            image = io.BytesIO()
            streamed.images[0].save(image, format="PNG")
            assert (await c.invert(image.getvalue(), steps=3)).x_T.shape == (1, 1, 8, 8)  # type: ignore[union-attr]
            assert len((await c.interpolate(1, 2, frames=3, steps=2)).images) == 3
            job = await c.submit("generate", steps=3, seed=1)
            assert (await job.result()).raw == raw.post("/generate", json={"steps": 3, "seed": 1}).json()
            assert await job.status() == "succeeded"
            with pytest.raises(InvalidRequest):
                await c.generate(eta=2)
    asyncio.run(run())
