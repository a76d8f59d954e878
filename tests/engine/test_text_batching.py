"""A latent text model in the step-level engine, driven step by step in-process: requests of different prompts,
negative prompts, guidance scales and sizes share each step (one forward per latent size), their prompts are
encoded in one call at admission, and each returns what it returns alone; finished jobs are decoded together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.client import Engine
from app.engine.jobs import SampleJob
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import LoadedModel, load_model

S = 5


@pytest.fixture(scope="module")
def sd(pipeline_store: Path) -> LoadedModel:
    return load_model(pipeline_store / "sd")


def _job(engine: Engine, model: LoadedModel, seed: int, prompts: list[str], w: float,
         shape: tuple[int, int, int] = (4, 8, 8), negative: list[str] | None = None, eta: float = 0.0) -> SampleJob:
    job, _ = engine.generate_job(model, n=len(prompts), steps=S, eta=eta, large=False, schedule=None, seed=seed,
                                 guidance_scale=w, shape=shape, prompts=prompts, negative_prompts=negative)
    return job


def _run(worker: BatchWorker, *jobs: SampleJob) -> None:
    for job in jobs:
        worker.submit(job)
    while not all(j.future.done() for j in jobs):
        worker._admit()
        worker.step()


def test_mixed_prompts_guidance_and_sizes_share_steps_and_equal_each_alone(sd: LoadedModel) -> None:
    engine, metrics = Engine(Settings(), Metrics()), Metrics()
    specs = [(1, ["a cat", "a red cat"], 7.5, (4, 8, 8), None), (2, ["a dog"], 3.0, (4, 10, 12), ["a cat"]),
             (3, ["a house"], 1.0, (4, 8, 8), None)]
    calls: list[tuple[int, ...]] = []
    forward = sd.forward

    def counting(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return forward(x, t, cond)  # type: ignore[arg-type]

    worker = BatchWorker(sd, metrics)
    together = [_job(engine, sd, *spec) for spec in specs]
    sd.forward = counting  # type: ignore[assignment]
    try:
        _run(worker, *together)
    finally:
        sd.forward = forward
    # each step: one forward for the 8x8 rows (2 + 2 guided + 1) and one for the 10x12 row (1 + 1 guided)
    assert calls == [(5, 4, 8, 8), (2, 4, 10, 12)] * S
    value = metrics.registry.get_sample_value
    assert value("ddim_text_encode_seconds_count", {"model": "sd"}) == 1  # every text of the three: one call
    assert value("ddim_prompt_cache_total", {"model": "sd", "result": "miss"}) == 4  # "" was cached at load
    for spec, job in zip(specs, together):
        alone = _job(engine, sd, *spec)
        _run(BatchWorker(sd, Metrics()), alone)
        torch.testing.assert_close(job.future.result().x, alone.future.result().x, rtol=1e-5, atol=1e-5)
        assert job.images is not None and alone.images is not None
        assert job.images.shape == (job.n, 3, spec[3][1] * 4, spec[3][2] * 4)
        torch.testing.assert_close(job.images, alone.images, rtol=1e-4, atol=1e-4)


def test_stochastic_rows_of_different_sizes_draw_their_own_noise(sd: LoadedModel) -> None:
    """eta > 0: each row draws its step noise in its own shape from its own generator (the padded batch never
    changes what a row draws), so a mixed batch equals each request alone."""
    engine = Engine(Settings(), Metrics())
    specs = [(1, ["a cat"], 7.5, (4, 8, 8), None, 0.7), (2, ["a dog", "a fox"], 2.0, (4, 12, 6), None, 1.0),
             (3, ["a house"], 7.5, (4, 8, 8), None, 0.0)]
    together = [_job(engine, sd, *spec) for spec in specs]
    _run(BatchWorker(sd, Metrics()), *together)
    for spec, job in zip(specs, together):
        alone = _job(engine, sd, *spec)
        _run(BatchWorker(sd, Metrics()), alone)
        torch.testing.assert_close(job.future.result().x, alone.future.result().x, rtol=1e-5, atol=1e-5)


def test_a_failing_encoder_fails_only_its_requests(sd: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, metrics = Engine(Settings(), Metrics()), Metrics()
    worker = BatchWorker(sd, metrics)
    assert sd.conditioner is not None
    monkeypatch.setattr(sd.conditioner, "encode", lambda texts: (_ for _ in ()).throw(RuntimeError("no encoder")))
    job = _job(engine, sd, 1, ["a cat"], 7.5)
    worker.submit(job)
    worker._admit()
    with pytest.raises(Exception, match="encoding the prompts failed on model 'sd'"):
        job.future.result(timeout=1)
    assert len(worker.batch) == 0
    assert metrics.registry.get_sample_value("ddim_failures_total", {"model": "sd", "cause": "encode_error"}) == 1
