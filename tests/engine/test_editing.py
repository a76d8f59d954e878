"""Editing in the engine, in-process on real tiny pixel models (float32): conditioned inversion, /edit's two legs and
img2img each equal an independent loop over app/sampling/loop.run_plan with the same plan's first or last k steps,
and a full-strength edit with source = target and w = 1 is /invert's round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.config import Settings
from app.engine.client import Engine
from app.engine.errors import InvalidRequest
from app.engine.tasks import EditWork, GenerateWork, InvertWork, Work
from app.metrics import Metrics
from app.models import LoadedModel
from app.sampling import draw, first_steps, last_steps, sample_generators, strength_steps
from app.sampling.loop import run_plan, sdedit

S = 10


@pytest.fixture(scope="module")
def engine(cond_store: Path) -> Iterator[Engine]:
    e = Engine(Settings(model_store=cond_store, default_model="tiny-flow", dtype="float32", channels_last=False,
                        max_batch_size=16, max_queue=64, threads=1, warmup=False), Metrics())
    e.load()
    yield e
    e.stop()


def _result(engine: Engine, work: Work) -> Any:
    async def go() -> Any:
        return await engine.submit(work).result()
    return asyncio.run(go())


def _images(model: LoadedModel, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *model.sample_shape), generator=g) * 2 - 1


def _plan(model: LoadedModel, direction: str) -> Any:
    return model.plan(S, model.spacings[0], direction)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["tiny-flow", "tiny-cond"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_a_partial_edit_equals_an_independent_loop(engine: Engine, name: str, strength: float) -> None:
    """Invert under the source class (w 1) for the first k steps, then generate the last k under the target (w 2)."""
    model = engine.model(name)
    x0 = _images(model, 2)
    out = _result(engine, EditWork(model=name, images=x0, steps=S, strength=strength, source_class_label="cat",
                                   class_label=["dog", "ankle boot"], guidance_scale=2.0))
    k = strength_steps(S, strength)
    assert out.fields["strength_steps"] == k and out.fields["class_label"] == ["dog", "ankle boot"]
    source = model.network(torch.tensor([0, 0]))
    x_t = run_plan(source, x0, first_steps(_plan(model, "invert"), k), prediction_type=model.prediction_type)
    target = model.network(torch.tensor([1, 2]), 2.0)
    want = run_plan(target, x_t, last_steps(_plan(model, "generate"), k), prediction_type=model.prediction_type)
    torch.testing.assert_close(out.tensors["x_T"], x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tensors["x_0"], want, atol=1e-5, rtol=1e-5)


def test_a_full_edit_with_the_same_condition_is_inversion_and_back(engine: Engine) -> None:
    model = engine.model("tiny-flow")
    x0 = _images(model, 2, seed=1)
    edit = _result(engine, EditWork(images=x0, steps=S, strength=1.0, source_class_label="dog", class_label="dog",
                                    guidance_scale=1.0))
    inv = _result(engine, InvertWork(images=x0, steps=S, class_label="dog", return_reconstruction=True))
    torch.testing.assert_close(edit.tensors["x_T"], inv.tensors["x_T"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edit.tensors["x_0"], inv.tensors["reconstruction"], atol=1e-5, rtol=1e-5)
    mse, psnr = inv.tensors["reconstruction_mse"], inv.tensors["reconstruction_psnr"]
    torch.testing.assert_close(psnr, 10 * torch.log10(1 / mse))


def test_conditioned_inversion_is_guided_and_defaults_to_w_one(engine: Engine) -> None:
    model = engine.model("tiny-cond")
    x0 = _images(model, 2, seed=2)
    plain = _result(engine, InvertWork(model="tiny-cond", images=x0, steps=S, class_label="cat"))
    assert plain.fields["guidance_scale"] == 1.0
    guided = _result(engine, InvertWork(model="tiny-cond", images=x0, steps=S, class_label="cat",
                                        guidance_scale=3.5))
    want = run_plan(model.network(torch.tensor([0, 0]), 3.5), x0, _plan(model, "invert"),
                    prediction_type=model.prediction_type)
    torch.testing.assert_close(guided.tensors["x_T"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-flow", "tiny-cond"])
def test_img2img_equals_an_independent_loop(engine: Engine, name: str) -> None:
    """Image i: x = a_k x0 + s_k eps at level t_k, eps the first draw of Generator(seed + i); then the last k steps."""
    model = engine.model(name)
    x0 = _images(model, 1, seed=3)
    out = _result(engine, GenerateWork(model=name, n=2, steps=S, seed=11, image=x0, strength=0.5, class_label="dog",
                                       guidance_scale=1.5, eta=0.5))
    k = strength_steps(S, 0.5)
    plan = last_steps(_plan(model, "generate"), k)
    gens = sample_generators(11, 2)
    eps = draw(gens, model.sample_shape)
    x = float(plan.a[0]) * x0.expand(2, -1, -1, -1) + float(plan.s[0]) * eps
    torch.testing.assert_close(out.tensors["x_T"], x)
    want = run_plan(model.network(torch.tensor([1, 1]), 1.5), x, plan, eta=0.5, generators=gens,
                    prediction_type=model.prediction_type, clip_denoised=model.clip_sample)
    torch.testing.assert_close(out.tensors["x_0"], want, atol=1e-5, rtol=1e-5)
    assert out.fields["strength_steps"] == k == 5
    offline = sdedit(model.network(torch.tensor([1, 1]), 1.5), x0.expand(2, -1, -1, -1), _plan(model, "generate"),
                     k, sample_generators(11, 2), eta=0.5, prediction_type=model.prediction_type,
                     clip_denoised=model.clip_sample)  # what app.eval.editing runs
    torch.testing.assert_close(offline, want)


def test_bad_editing_input_is_refused_by_field(engine: Engine) -> None:
    model = engine.model("tiny-flow")
    x0 = _images(model, 1)

    def field(work: Work) -> str:
        with pytest.raises(InvalidRequest) as e:
            _result(engine, work)
        return e.value.field

    assert field(EditWork(images=x0, steps=S, strength=0.05)) == "strength"  # k = int(0.5) = 0
    assert field(EditWork(images=x0, steps=S, strength=1.5)) == "strength"
    assert field(EditWork(images=x0, steps=S, source_prompt="a cat")) == "source_prompt"
    assert field(EditWork(images=x0, steps=S, source_class_label="zebra")) == "source_class_label"
    assert field(EditWork(images=x0, steps=S, source_guidance_scale=2.0)) == "source_guidance_scale"
    assert field(EditWork(images=x0[:, :, :3], steps=S)) == "images"
    assert field(GenerateWork(steps=S, image=x0, strength=0.05)) == "strength"
    assert field(GenerateWork(steps=S, strength=0.5)) == "strength"  # no image
    assert field(GenerateWork(steps=S, image=x0, sampler="unipc")) == "sampler"
    assert field(GenerateWork(steps=S, image=x0[:, :, :3])) == "image"
