"""Flow and class-conditional models in the step-level engine, driven step by step in-process on real tiny
models: guided samples share one forward with everything else, and w = 1 / w = 0 are exactly conditional /
unconditional sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.client import Engine
from app.engine.errors import InvalidRequest
from app.engine.jobs import SampleJob
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import LoadedModel, load_model
from app.sampling import draw, guide, sample_generators
from app.sampling.loop import run_plan

S = 6


@pytest.fixture(scope="module", params=["tiny-flow", "tiny-cond"])
def model(request: pytest.FixtureRequest, cond_store: Path) -> LoadedModel:
    return load_model(cond_store / request.param)


def _run(worker: BatchWorker, *jobs: SampleJob) -> int:
    """Submit, then tick until every job is done; returns the number of forwards."""
    for job in jobs:
        worker.submit(job)
    forwards = 0
    while not all(j.future.done() for j in jobs):
        worker._admit()
        worker.step()
        forwards += 1
    return forwards


def _job(engine: Engine, model: LoadedModel, seed: int, n: int = 2, label: object = None, w: float = 1.0,
         eta: float = 0.0) -> SampleJob:
    labels = engine.class_labels(model, label, n)  # type: ignore[arg-type]
    job, _ = engine.generate_job(model, n=n, steps=S, eta=eta, large=False, schedule=None, seed=seed,
                                 class_labels=labels, guidance_scale=w)
    return job


def _alone(model: LoadedModel, seed: int, n: int, label: int | None, w: float, eta: float = 0.0) -> torch.Tensor:
    """An independent loop: two forwards a step when guided."""
    gens = sample_generators(seed, n)
    x_T = draw(gens, model.sample_shape)
    y = None if label is None else torch.full((n,), label)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if y is None:
            return model.eps(x, t)
        cond = model.eps(x, t, y)
        return cond if w == 1 else guide(cond, model.eps(x, t), w)

    return run_plan(net, x_T, model.plan(S, model.spacings[0], "generate"), eta=eta, generators=gens,
                    prediction_type=model.prediction_type, clip_denoised=model.clip_sample)


def test_guided_unguided_and_unconditional_samples_share_every_forward(model: LoadedModel) -> None:
    engine = Engine(Settings(max_batch_size=16), Metrics())
    worker = BatchWorker(model, engine.metrics, max_batch_size=16)
    guided = _job(engine, model, 1, label="dog", w=3.0)
    conditional = _job(engine, model, 2, label=["cat", "ANKLE BOOT"])
    plain = _job(engine, model, 3, eta=1.0)
    forwards = _run(worker, guided, conditional, plain)
    assert forwards == S  # one forward a step for all three requests
    rows = engine.metrics.batch_size.labels(model.name)
    assert rows._sum.get() == S * (2 * 2 + 2 + 2)  # the guided samples add one row each, not a forward
    torch.testing.assert_close(guided.future.result().x, _alone(model, 1, 2, 1, 3.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain.future.result().x, _alone(model, 3, 2, None, 1.0, eta=1.0), rtol=1e-4, atol=1e-4)
    first, _second = conditional.future.result().x
    torch.testing.assert_close(first[None], _alone(model, 2, 1, 0, 1.0), rtol=1e-4, atol=1e-4)


def test_w_one_is_conditional_and_w_zero_is_unconditional(model: LoadedModel) -> None:
    engine = Engine(Settings(), Metrics())
    worker = BatchWorker(model, engine.metrics)
    w1, cond = _job(engine, model, 5, label=1, w=1.0), _job(engine, model, 5, label=1, w=1.0)
    w0, uncond = _job(engine, model, 6, label=1, w=0.0), _job(engine, model, 6)
    _run(worker, w1, w0)
    _run(worker, cond, uncond)
    assert torch.equal(w1.future.result().x, cond.future.result().x)
    assert torch.equal(w0.future.result().x, uncond.future.result().x)
    torch.testing.assert_close(w1.future.result().x, _alone(model, 5, 2, 1, 1.0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(w1.future.result().x, w0.future.result().x, atol=1e-3)  # the label matters


def test_a_forward_never_holds_more_rows_than_max_batch_size(model: LoadedModel) -> None:
    """Three guided requests of two samples: 12 rows a step, at most 4 in a forward (4 is a bucket bound)."""
    engine = Engine(Settings(), Metrics())
    worker = BatchWorker(model, engine.metrics, max_batch_size=4)
    jobs = [_job(engine, model, 10 + i, n=2, label="cat", w=2.0) for i in range(3)]
    _run(worker, *jobs)
    value = engine.metrics.registry.get_sample_value
    assert value("ddim_batch_size_sum", {"model": model.name}) == 3 * 2 * 2 * S
    forwards = value("ddim_batch_size_count", {"model": model.name})
    assert forwards == 3 * S and value("ddim_batch_size_bucket", {"model": model.name, "le": "4.0"}) == forwards
    for i, job in enumerate(jobs):
        torch.testing.assert_close(job.future.result().x, _alone(model, 10 + i, 2, 0, 2.0), rtol=1e-4, atol=1e-4)


def test_bad_conditioning_is_refused_by_field(model: LoadedModel, tiny_store: Path) -> None:
    engine = Engine(Settings(), Metrics())
    with pytest.raises(InvalidRequest, match="valid classes: 0='cat', 1='dog', 2='ankle boot'") as e:
        engine.class_labels(model, "horse", 1)
    assert e.value.field == "class_label"
    with pytest.raises(InvalidRequest, match="3 labels for 2 images"):
        engine.class_labels(model, ["cat", "dog", "cat"], 2)
    with pytest.raises(InvalidRequest, match="unknown class 3"):  # the null label is reserved
        engine.class_labels(model, 3, 1)
    with pytest.raises(InvalidRequest, match="not class-conditional") as e:
        engine.class_labels(load_model(tiny_store / "tiny"), "cat", 1)
    assert e.value.field == "class_label"
    if model.kind == "flow":
        with pytest.raises(InvalidRequest, match="VP models only") as e:
            engine.generate_job(model, n=1, steps=S, eta=0.0, large=True, schedule=None, seed=0)
        assert e.value.field == "variance"
        with pytest.raises(InvalidRequest, match="not offered for flow model") as e:
            engine.check_steps(model, S, "trailing")
        assert e.value.field == "schedule"
