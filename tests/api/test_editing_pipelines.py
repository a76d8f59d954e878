"""Editing on latent pipelines over HTTP (a real server over tiny random-weight diffusers folders, float32):

- img2img on Stable Diffusion starts at t_k from the VAE mean noised with the seed contract's eps, and ends where
  diffusers' StableDiffusionImg2ImgPipeline ends when given those latents (the image as 4-channel latents, generator
  seeded by the seed: its first draw is the same eps);
- conditioned inversion on SD3 equals the SD3 workflow's own loop: reversed FlowMatch Euler over the prompt's
  embeddings with classifier-free guidance;
- /edit and /jobs/edit (JSON and multipart) run on latent models, and bad input is refused by field.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image

from harness.server import running_server
from tests.api.test_text_models import _npy, _rel, seed_latents

STEPS, SEED = 6, 7


@pytest.fixture(scope="module")
def http(pipeline_store: Path) -> Iterator[httpx.Client]:
    with running_server(pipeline_store, DDIM_DEFAULT_MODEL="sd") as url, httpx.Client(base_url=url,
                                                                                       timeout=120) as client:
        yield client


def _picture(seed: int = 0, size: int = 32) -> tuple[str, torch.Tensor]:
    """A random RGB PNG (base64) and its pixels [1, 3, H, W] in [-1, 1], as the server reads them."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    pixels = torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0)[None]
    return base64.b64encode(buf.getvalue()).decode(), pixels


def _mean_latents(folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The codec's encode, done independently: (posterior mean - shift) * scale."""
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    return (mean - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def test_img2img_on_sd_equals_diffusers_img2img(http: httpx.Client, pipeline_store: Path) -> None:
    image, pixels = _picture(1)
    r = http.post("/generate", json={"model": "sd", "prompt": "a cat", "image": image, "strength": 0.6,
                                     "steps": STEPS, "seed": SEED, "guidance_scale": 5.0, "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strength_steps"] == 3 and body["strength"] == 0.6
    z = _mean_latents(pipeline_store / "sd", pixels)
    eps, _ = seed_latents((4, 8, 8), SEED)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(pipeline_store / "sd", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(STEPS)
    t_k = pipe.scheduler.timesteps[STEPS - 3:][:1]
    start = pipe.scheduler.add_noise(z, eps, t_k)  # a_k z + s_k eps
    assert _rel(_npy(body["x_T"]), start) < 1e-5
    out = pipe("a cat", image=z, strength=0.6, num_inference_steps=STEPS, guidance_scale=5.0, eta=0.0,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent")
    assert _rel(_npy(body["x_0"]), out.images) < 1e-5


def test_conditioned_inversion_on_sd3_is_reversed_euler_with_cfg(http: httpx.Client, pipeline_store: Path) -> None:
    image, pixels = _picture(2)
    w, prompt = 3.5, "a photo of a cat"
    r = http.post("/invert", json={"model": "sd3", "images": [image], "prompt": prompt, "guidance_scale": w,
                                   "steps": STEPS, "return_reconstruction": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["guidance_scale"] == w and len(body["reconstruction_psnr"]) == 1
    pipe: Any = StableDiffusion3Pipeline.from_pretrained(pipeline_store / "sd3", text_encoder_3=None,
                                                         tokenizer_3=None)
    z = _mean_latents(pipeline_store / "sd3", pixels)
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompt, None, None, negative_prompt="",
                                                                 do_classifier_free_guidance=True)
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(STEPS)
        sigmas = sched.sigmas.flip(0)  # 0 -> sigma_max: the workflow's inversion walks the grid backwards
        for i in range(STEPS):
            t = (sigmas[i] * 1000).expand(2)
            v = pipe.transformer(hidden_states=torch.cat([z, z]), timestep=t,
                                 encoder_hidden_states=torch.cat([uncond, cond]),
                                 pooled_projections=torch.cat([pooled_uncond, pooled])).sample
            v_uncond, v_cond = v.chunk(2)
            z = z + (sigmas[i + 1] - sigmas[i]) * (v_uncond + w * (v_cond - v_uncond))
    assert _rel(_npy(body["x_T"]), z) < 1e-5


def test_edit_on_latent_models_json_multipart_and_jobs(http: httpx.Client) -> None:
    image, _ = _picture(3)
    r = http.post("/edit", json={"model": "sd", "images": [image, image], "source_prompt": "a cat",
                                 "prompt": "a dog", "strength": 0.5, "steps": STEPS, "return_latents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and body["strength_steps"] == 3 and body["guidance_scale"] == 7.5
    assert body["source_prompt"] == ["a cat", "a cat"] and _npy(body["x_T"]).shape == (2, 4, 8, 8)
    png = http.post("/edit", json={"model": "dit", "images": [image], "source_class_label": "cat",
                                   "class_label": "goldfish", "steps": STEPS}, headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    job = http.post("/jobs/edit", files=[("files", ("a.png", base64.b64decode(image), "image/png"))],
                    data={"model": "sd3", "prompt": "a dog", "strength": "0.7", "steps": str(STEPS)})
    assert job.status_code == 202, job.text
    location = job.headers["location"]
    for _ in range(1200):
        state = http.get(location).json()
        if state["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.05)
    assert state["status"] == "succeeded", state
    assert state["progress"]["steps"] == 2 * 4  # both legs of k = int(6 x 0.7) = 4
    assert len(http.get(f"{location}/result").json()["images"]) == 1


def test_editing_refusals_name_their_field(http: httpx.Client) -> None:
    image, _ = _picture(4)

    def field(path: str, body: dict[str, Any]) -> str:
        r = http.post(path, json=body)
        assert r.status_code == 422, r.text
        return str(r.json()["detail"][0]["field"])

    assert field("/edit", {"model": "dit", "images": [image], "source_prompt": "a cat"}) == "source_prompt"
    assert field("/edit", {"model": "sd", "images": [image], "strength": 0}) == "strength"
    assert field("/edit", {"model": "sd", "images": [image], "strength": 0.1, "steps": 5}) == "strength"
    assert field("/edit", {"model": "sd", "images": [image], "width": 30}) == "width"
    assert field("/generate", {"model": "sd", "image": image, "strength": 1.5}) == "strength"
    assert field("/generate", {"model": "sd", "image": image, "sampler": "unipc"}) == "sampler"
    assert field("/invert", {"model": "sd", "images": ["aGVsbG8="]}) == "images.0"


def test_the_openai_client_edits_images(http: httpx.Client) -> None:
    """client.images.edit: a multipart image and prompt, strength as an extra field; it is /generate's img2img."""
    import openai

    image, _ = _picture(5)
    client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    out = client.images.edit(model="sd", image=("in.png", base64.b64decode(image), "image/png"), prompt="a dog",
                             n=2, response_format="b64_json", extra_body={"strength": 0.5, "seed": 3, "steps": 4})
    assert len(out.data) == 2
    same = http.post("/generate", json={"model": "sd", "prompt": "a dog", "image": image, "strength": 0.5, "n": 2,
                                        "seed": 3, "steps": 4}).json()
    assert [d.b64_json for d in out.data] == same["images"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="sd", image=("in.png", base64.b64decode(image), "image/png"), prompt="a dog",
                           extra_body={"strength": 0.1, "steps": 4})
    assert e.value.body["param"] == "strength"  # type: ignore[index]


def test_a_partial_edit_on_sd_equals_an_independent_loop(http: httpx.Client, pipeline_store: Path) -> None:
    """/edit on a latent text model: the VAE mean, the first k inversion steps under the source prompt (w 1), the
    last k generation steps under the target prompt with CFG, as app/sampling/loop.edit runs them in-process."""
    from app.models import load_model
    from app.sampling import strength_steps
    from app.sampling.loop import edit

    image, pixels = _picture(6)
    r = http.post("/edit", json={"model": "sd", "images": [image], "source_prompt": "a cat", "prompt": "a dog",
                                 "guidance_scale": 5.0, "strength": 0.5, "steps": STEPS, "return_latents": True})
    assert r.status_code == 200, r.text
    model = load_model(pipeline_store / "sd")
    assert model.codec is not None
    z = model.codec.encode(pixels)
    assert _rel(z, _mean_latents(pipeline_store / "sd", pixels)) < 1e-5
    k = strength_steps(STEPS, 0.5)
    spacing = model.spacings[0]
    x_t, x_0 = edit(model.network(prompts=["a cat"]), model.network(guidance_scale=5.0, prompts=["a dog"]), z,
                    model.plan(STEPS, spacing, "invert"), model.plan(STEPS, spacing, "generate"), k,
                    prediction_type=model.prediction_type)
    assert _rel(_npy(r.json()["x_T"]), x_t) < 1e-5 and _rel(_npy(r.json()["x_0"]), x_0) < 1e-5
