"""Latent pipelines served over HTTP (a real server over tiny random-weight folders written by diffusers'
save_pretrained): /generate equals diffusers' own pipeline called with the same prompt, negative prompt, steps, eta,
guidance and latents= built from the seed contract, and concurrent requests of different prompts, guidance scales
and sizes equal each one alone. Float32, so that the comparisons are exact to rounding.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image

from app.images import from_npy_bytes
from harness.server import running_server

STEPS, SEED = 4, 7
SHAPES = {"sd": (4, 8, 8), "sd-v": (4, 8, 8), "sd3": (16, 8, 8), "dit": (4, 8, 8)}


@pytest.fixture(scope="module")
def http(pipeline_store: Path) -> Iterator[httpx.Client]:
    with running_server(pipeline_store, DDIM_DEFAULT_MODEL="sd") as url, httpx.Client(base_url=url,
                                                                                       timeout=120) as client:
        yield client


def _npy(b64: str) -> torch.Tensor:
    return torch.from_numpy(from_npy_bytes(base64.b64decode(b64)).copy())


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def seed_latents(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T of image 0 under the seed contract, and its generator after that draw (where step noise comes from)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator), generator


def diffusers_run(folder: Path, call: Callable[[Any], Any]) -> tuple[torch.Tensor, np.ndarray]:
    """(final latents, images as uint8 levels) of diffusers' own pipeline: the latents are what its VAE decodes,
    mapped back through the VAE's shift and scaling factors."""
    name = folder.name
    if name == "sd3":
        pipe: Any = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    elif name == "dit":
        pipe = DiTPipeline.from_pretrained(folder)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def spy(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(z.clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = spy
    images = call(pipe).images
    config = pipe.vae.config
    latents = (seen[0] - (config.get("shift_factor") or 0.0)) * config.scaling_factor
    return latents, np.round(np.asarray(images) * 255).astype(np.int16)


@pytest.mark.parametrize("name", ["sd", "sd-v", "sd3"])
def test_text_pipelines_equal_diffusers(http: httpx.Client, pipeline_store: Path, name: str) -> None:
    prompt, negative = "a photo of a cat", "blurry"
    r = http.post("/generate", json={"model": name, "prompt": prompt, "negative_prompt": negative, "steps": STEPS,
                                     "seed": SEED, "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    default = {"sd": 7.5, "sd-v": 7.5, "sd3": 7.0}[name]
    assert body["guidance_scale"] == default and (body["width"], body["height"]) == (32, 32)
    assert body["prompt"] == [prompt] and body["prompt_truncated"] == [False]
    x_T, _ = seed_latents(SHAPES[name], SEED)
    assert torch.equal(_npy(body["x_T"]), x_T)
    latents, images = diffusers_run(pipeline_store / name, lambda pipe: pipe(
        prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=default, latents=x_T,
        output_type="np", **({} if name == "sd3" else {"eta": 0.0})))
    assert _rel(_npy(body["x_0"]), latents) < 1e-5
    assert np.abs(_png(body["images"][0]) - images[0]).max() <= 1


def test_dit_equals_diffusers(http: httpx.Client, pipeline_store: Path) -> None:
    """DiTPipeline draws its latents from generator=: n = 1 with generator seeded by the seed."""
    r = http.post("/generate", json={"model": "dit", "class_label": "cat", "steps": STEPS, "seed": SEED,
                                     "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["guidance_scale"] == 4.0 and body["class_label"] == ["cat"]
    latents, images = diffusers_run(pipeline_store / "dit", lambda pipe: pipe(
        [3], num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np"))
    assert _rel(_npy(body["x_0"]), latents) < 1e-5
    assert np.abs(_png(body["images"][0]) - images[0]).max() <= 1


def test_stochastic_ddim_equals_diffusers(http: httpx.Client, pipeline_store: Path) -> None:
    """eta > 0: step noise comes from the image's own generator after x_T, as diffusers draws it from generator=."""
    r = http.post("/generate", json={"model": "sd", "prompt": "a dog", "steps": STEPS, "eta": 0.5, "seed": SEED,
                                     "guidance_scale": 5.0, "return_latents": True})
    assert r.status_code == 200, r.text
    x_T, generator = seed_latents(SHAPES["sd"], SEED)
    latents, _ = diffusers_run(pipeline_store / "sd", lambda pipe: pipe(
        "a dog", num_inference_steps=STEPS, guidance_scale=5.0, eta=0.5, latents=x_T, generator=generator,
        output_type="np"))
    assert _rel(_npy(r.json()["x_0"]), latents) < 1e-5


def test_concurrent_requests_equal_each_alone(http: httpx.Client) -> None:
    """Different prompts, negative prompts, guidance scales and sizes in one batch (the sizes as separate forwards
    of the same step) return what each returns alone."""
    bodies = [
        {"model": "sd", "prompt": ["a cat", "a red cat"], "n": 2, "guidance_scale": 7.5, "steps": 30, "seed": 1},
        {"model": "sd", "prompt": "a dog", "negative_prompt": "a cat", "guidance_scale": 3.0, "width": 48,
         "height": 40, "steps": 30, "seed": 2},
        {"model": "sd", "prompt": "a house", "guidance_scale": 1.0, "steps": 30, "seed": 3},
    ]

    def post(body: dict[str, Any]) -> torch.Tensor:
        r = http.post("/generate", json={**body, "return_latents": True})
        assert r.status_code == 200, r.text
        return _npy(r.json()["x_0"])

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(post, bodies))
    for body, x in zip(bodies, together):
        alone = post(body)
        assert x.shape == alone.shape
        assert _rel(x, alone) < 1e-5
    assert together[1].shape == (1, 4, 10, 12)


def test_refusals_name_their_field(http: httpx.Client, pipeline_store: Path) -> None:
    def field(body: dict[str, Any]) -> str:
        r = http.post("/generate", json=body)
        assert r.status_code == 422, r.text
        return str(r.json()["detail"][0]["field"])

    assert field({"model": "dit", "prompt": "a cat"}) == "prompt"
    assert field({"model": "dit", "negative_prompt": "a cat"}) == "negative_prompt"
    assert field({"model": "sd", "width": 30}) == "width"
    assert field({"model": "sd3", "height": 36}) == "height"  # multiples of factor 4 x patch 2
    assert field({"model": "dit", "width": 64}) == "width"  # DiT makes its own size only
    assert field({"model": "sd", "n": 2, "prompt": ["a", "b", "c"]}) == "prompt"
    assert field({"model": "sd", "n": 2, "negative_prompt": ["a"]}) == "negative_prompt"
    assert field({"model": "sd", "class_label": 1}) == "class_label"
    assert field({"model": "sd", "variance": "large"}) == "variance"
    assert field({"model": "sd", "width": 64000, "height": 8}) == "width"  # DDIM_MAX_IMAGE_PIXELS
    assert field({"model": "dit", "guidance_scale": 3.0}) == "guidance_scale"  # no class: w has no effect
    r = http.post("/generate", json={"model": "dit", "class_label": "unicorn"})
    assert r.status_code == 422 and "and 980 more" in r.text and len(r.text) < 1000
    tench = http.post("/generate", json={"model": "dit", "class_label": ["Tinca tinca", "tench"], "n": 2, "steps": 1,
                                         "seed": 0})
    assert tench.status_code == 200 and tench.json()["class_label"] == ["tench, Tinca tinca"] * 2  # synonyms
    r = http.post("/invert", json={"model": "sd", "images": ["aGVsbG8="]})  # not an image (latent models invert)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "images.0"


def test_long_prompts_are_truncated_and_said_so(http: httpx.Client) -> None:
    long = "cat " * 100
    r = http.post("/generate", json={"model": "sd", "prompt": [long, "a cat"], "n": 2, "steps": 2, "seed": 0,
                                     "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_truncated"] == [True, False] and body["prompt_token_limit"] == 77
    cut = http.post("/generate", json={"model": "sd", "prompt": "cat " * 75, "steps": 2, "seed": 0,
                                       "return_latents": True}).json()
    assert _rel(_npy(cut["x_0"]), _npy(body["x_0"])[:1]) < 1e-5  # the same 77 tokens


def test_models_describe_each_pipeline(http: httpx.Client) -> None:
    models = {m["name"]: m for m in http.get("/models").json()["models"]}
    sd, sd3, dit = models["sd"], models["sd3"], models["dit"]
    assert (sd["pipeline"], sd["conditioning"], sd["space"]) == ("StableDiffusionPipeline", "text", "latent")
    assert (sd["default_size"], sd["default_guidance_scale"], sd["prompt_token_limit"]) == ([32, 32], 7.5, 77)
    assert "DDIMScheduler" in sd["scheduler"] and sd["clip_sample"] is False
    assert (sd3["pipeline"], sd3["kind"], sd3["size_multiple"], sd3["shift"]) == (
        "StableDiffusion3Pipeline", "flow", 8, 3.0)
    assert (dit["conditioning"], dit["default_guidance_scale"], dit["null_class"]) == ("class", 4.0, 1000)
    assert dit["class_names"][3] == "cat"


def test_jobs_and_pngs_of_text_models(http: httpx.Client) -> None:
    job = http.post("/jobs/generate", json={"model": "sd3", "prompt": "a cat", "steps": 2, "seed": 5})
    assert job.status_code == 202, job.text
    location = job.headers["location"]
    for _ in range(600):
        if http.get(location).json()["status"] == "succeeded":
            break
        import time
        time.sleep(0.05)
    png = http.get(f"{location}/result", headers={"Accept": "image/png"})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (32, 32)
    npy = http.get(f"{location}/result", headers={"Accept": "application/x-npy"})
    assert from_npy_bytes(npy.content).shape == (1, 16, 8, 8)  # latents


def test_the_openai_client_gets_images(http: httpx.Client) -> None:
    """The official client, pointed at /v1: b64_json images of the requested size; url responses refused in
    OpenAI's error body; extra fields as other servers take them (extra_body)."""
    import openai

    client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    out = client.images.generate(model="sd", prompt="a photo of a cat", n=2, size="48x40", response_format="b64_json",
                                 extra_body={"seed": 3, "steps": 2, "negative_prompt": "blurry",
                                             "guidance_scale": 5.0})
    assert out.created > 0 and len(out.data) == 2
    assert all(Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))).size == (48, 40) for d in out.data)
    same = http.post("/generate", json={"model": "sd", "prompt": "a photo of a cat", "negative_prompt": "blurry",
                                        "n": 2, "seed": 3, "steps": 2, "guidance_scale": 5.0, "width": 48,
                                        "height": 40}).json()
    assert [d.b64_json for d in out.data] == same["images"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="sd", prompt="a cat", response_format="url")
    assert e.value.body["param"] == "response_format"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="sd", prompt="a cat", size="30x30")  # type: ignore[arg-type]
    assert e.value.body["param"] == "size"  # type: ignore[index]



def test_the_cli_takes_prompts(http: httpx.Client, pipeline_store: Path, tmp_path: Path) -> None:
    """`ddim sample --prompt` computes what the server computes for the same seed (float32, as the server runs)."""
    from tests.test_cli import ddim

    fields = {"model": "sd", "prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 3, "seed": 4,
              "width": 48, "height": 40}
    served = http.post("/generate", json={**fields, "return_latents": True}).json()
    out, latents = tmp_path / "cat.png", tmp_path / "cat.npy"
    r = ddim("sample", "--model-store", str(pipeline_store), "--model", "sd", "--prompt", "a photo of a cat",
             "--negative-prompt", "blurry", "--steps", "3", "--seed", "4", "-n", "1", "--width", "48", "--height", "40",
             "--out", str(out), "--latents-out", str(latents), env={"DDIM_DTYPE": "float32", "DDIM_THREADS": "1",
                                                                    "DDIM_CHANNELS_LAST": "false"})
    assert r.returncode == 0, r.stderr
    assert _rel(torch.from_numpy(np.load(latents)), _npy(served["x_0"])) < 1e-5
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16) - _png(served["images"][0])).max() <= 1


def test_interpolation_and_previews_of_a_text_model(http: httpx.Client) -> None:
    """/interpolate between two seeds under a prompt gives decoded frames and latent x_T; the event stream's
    previews are decoded x0-hat (RGB at the image size, not latents)."""
    r = http.post("/interpolate", json={"model": "sd", "prompt": "a cat", "start": {"seed": 1}, "end": {"seed": 2},
                                        "frames": 3, "steps": 2, "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 3 and _png(body["images"][0]).shape == (32, 32, 3)
    assert _npy(body["x_T"]).shape == (3, 4, 8, 8)
    import json

    with http.stream("POST", "/generate", json={"model": "sd", "prompt": "a cat", "steps": 2, "seed": 1,
                                                "preview_every": 1}, headers={"Accept": "text/event-stream"}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    previews = [e["preview"] for e in events if "preview" in e]
    assert len(previews) == 2 and _png(previews[0]).shape == (32, 32, 3)


def test_cancel_and_deadlines_work_for_text_models(http: httpx.Client) -> None:
    job = http.post("/jobs/generate", json={"model": "sd3", "prompt": "a cat", "n": 4, "steps": 1000, "seed": 0})
    assert job.status_code == 202, job.text
    cancelled = http.delete(job.headers["location"]).json()
    assert cancelled["status"] == "cancelled"
    late = http.post("/generate", json={"model": "sd", "prompt": "a cat", "steps": 1000, "timeout_s": 0.3})
    assert late.status_code == 504
    assert http.post("/generate", json={"model": "sd", "prompt": "a cat", "steps": 2, "seed": 0}).status_code == 200


def test_the_openai_client_uses_the_servers_keys(pipeline_store: Path) -> None:
    import openai

    with running_server(pipeline_store, DDIM_API_KEYS="sk-test") as url:
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
        assert len(good.images.generate(model="sd3", prompt="a cat", extra_body={"steps": 1}).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).images.generate(prompt="a cat")


@pytest.mark.parametrize("name,sampler", [("sd", "dpmsolver++"), ("sd-v", "unipc"), ("sd3", "dpmsolver++")])
def test_multistep_samplers_on_text_pipelines_equal_diffusers(http: httpx.Client, pipeline_store: Path, name: str,
                                                               sampler: str) -> None:
    """sampler on a latent pipeline: diffusers' own pipeline with that solver's scheduler built from_config of the
    folder's scheduler config (as a diffusers user swaps schedulers), the same latents, guidance and prompt."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from app.sampling import diffusers_overrides

    r = http.post("/generate", json={"model": name, "prompt": "a cat", "steps": 5, "seed": SEED, "sampler": sampler,
                                     "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sampler"] == sampler
    x_T, _ = seed_latents(SHAPES[name], SEED)
    solver = {"dpmsolver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[sampler]

    def call(pipe: Any) -> Any:
        shift = pipe.scheduler.config.get("shift") if name == "sd3" else None
        spacing = body["schedule"]
        pipe.scheduler = solver.from_config(pipe.scheduler.config, **diffusers_overrides(sampler, 2, spacing,
                                                                                         shift=shift))
        return pipe("a cat", num_inference_steps=5, guidance_scale=body["guidance_scale"], latents=x_T,
                    output_type="np")

    latents, images = diffusers_run(pipeline_store / name, call)
    assert _rel(_npy(body["x_0"]), latents) < 1e-5
    assert np.abs(_png(body["images"][0]) - images[0]).max() <= 1
