"""A latent text model in the step-level engine, driven step by step in-process: requests of different prompts,
negative prompts, guidance scales and sizes share each step (one forward per latent size), their prompts are
encoded in one call at admission, and each returns what it returns alone; finished jobs are decoded together, on
the worker's decode thread, while the next steps run."""

from __future__ import annotations

import threading
from concurrent.futures import wait
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
        if len(worker.batch):
            worker.step()
        else:  # every row has stepped: what is left is the decode thread's
            assert wait([j.future for j in jobs], timeout=60).not_done == set()


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


def test_the_next_steps_do_not_wait_for_a_decode(sd: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's VAE decode runs on the decode thread: while it is held, the worker steps another job."""
    engine, worker = Engine(Settings(), Metrics()), BatchWorker(sd, Metrics())
    assert sd.codec is not None
    gate, decoding, decode = threading.Event(), threading.Event(), sd.codec.decode

    def held(z: torch.Tensor) -> torch.Tensor:
        decoding.set()
        assert gate.wait(60), "the test never released the decode"
        return decode(z)

    monkeypatch.setattr(sd.codec, "decode", held)
    first, second = _job(engine, sd, 1, ["a cat"], 7.5), _job(engine, sd, 2, ["a dog"], 7.5)
    worker.submit(first)
    worker._admit()
    for _ in range(S):
        worker.step()
    assert decoding.wait(60) and not first.future.done()  # its steps are done, its decode is held
    worker.submit(second)
    worker._admit()
    for _ in range(S):  # on the worker's side nothing waits for the decode
        worker.step()
    assert len(worker.batch) == 0 and not first.future.done()
    gate.set()
    assert first.future.result(timeout=60).x.shape == second.future.result(timeout=60).x.shape
    assert first.images is not None and second.images is not None


def test_a_failing_decode_fails_only_its_requests(sd: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, metrics = Engine(Settings(), Metrics()), Metrics()
    worker = BatchWorker(sd, metrics)
    assert sd.codec is not None
    decode = sd.codec.decode
    monkeypatch.setattr(sd.codec, "decode", lambda z: (_ for _ in ()).throw(RuntimeError("no VAE")))
    broken = _job(engine, sd, 1, ["a cat"], 7.5)
    with pytest.raises(Exception, match=r"decoding the latents failed on model 'sd'.*no VAE"):
        _run(worker, broken)
        broken.future.result()
    monkeypatch.setattr(sd.codec, "decode", decode)
    fine = _job(engine, sd, 2, ["a cat"], 7.5)
    _run(worker, fine)
    assert fine.images is not None and fine.future.result().x.shape[0] == 1
    assert metrics.registry.get_sample_value("ddim_failures_total", {"model": "sd", "cause": "decode_error"}) == 1
