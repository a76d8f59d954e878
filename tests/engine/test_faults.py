"""Fault containment on real tiny models, driven in-process: a model whose output is NaN for one class, a forward
that raises on its k-th call, one that runs out of memory past a batch size, and a worker thread that dies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.client import Engine
from app.engine.errors import EngineError
from app.engine.jobs import SampleJob
from app.engine.tasks import GenerateWork
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import LoadedModel, load_model


class Faulty:
    """The model's own forward, raising `error` on the calls `when` says (a real forward otherwise)."""

    def __init__(self, forward, when, error: BaseException) -> None:  # type: ignore[no-untyped-def]
        self.forward, self.when, self.error, self.calls = forward, when, error, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.when(self.calls, x):
            raise self.error
        return self.forward(x, t, y)


def _run(worker: BatchWorker, *jobs: SampleJob) -> None:
    for job in jobs:
        worker.submit(job)
    while not all(j.future.done() for j in jobs):
        worker._admit()
        worker.step()


def _job(engine: Engine, model: LoadedModel, seed: int, steps: int = 6, n: int = 2, label: object = None) -> SampleJob:
    labels = engine.class_labels(model, label, n)  # type: ignore[arg-type]
    return engine.generate_job(model, n=n, steps=steps, eta=0.0, large=False, schedule=None, seed=seed,
                               class_labels=labels)[0]


def test_non_finite_outputs_fail_only_their_own_requests(cond_store: Path) -> None:
    model = load_model(cond_store / "tiny-cond")
    model.unet.class_embedding.weight.data[1] = float("nan")  # class 1 ("dog") is broken, the others are not
    engine, good = Engine(Settings(), Metrics()), load_model(cond_store / "tiny-cond")
    worker = BatchWorker(model, engine.metrics)
    broken, fine, alone = _job(engine, model, 1, label="dog"), _job(engine, model, 2, label="cat"), \
        _job(engine, good, 2, label="cat")
    _run(worker, broken, fine)
    with pytest.raises(EngineError, match="'tiny-cond' produced non-finite values"):
        broken.future.result()
    _run(BatchWorker(good, Metrics()), alone)
    torch.testing.assert_close(fine.future.result().x, alone.future.result().x, rtol=1e-5, atol=1e-5)
    value = engine.metrics.registry.get_sample_value
    assert value("ddim_failures_total", {"model": "tiny-cond", "cause": "non_finite"}) == 1
    assert len(worker.batch) == 0 and not worker.waiting


def test_a_raising_forward_fails_only_the_rows_it_held(tiny_store: Path) -> None:
    """Short-first steps the short request alone while the long one waits: the first forward (short rows only)
    raises, the short request fails, the long one finishes, and so does a request submitted afterwards."""
    model = load_model(tiny_store / "tiny")
    model.forward = Faulty(model.forward, lambda k, x: k == 1, RuntimeError("boom"))
    engine = Engine(Settings(), Metrics())
    worker = BatchWorker(model, engine.metrics, priority="short-first")
    long, short = _job(engine, model, 1, steps=200), _job(engine, model, 2, steps=5)
    _run(worker, long, short)
    with pytest.raises(EngineError, match=r"the forward of model 'tiny' failed \(RuntimeError: boom\)"):
        short.future.result()
    assert long.future.result().x.shape == (2, 1, 8, 8)
    after = _job(engine, model, 3)
    _run(worker, after)
    assert torch.isfinite(after.future.result().x).all()


def test_out_of_memory_retries_in_halves(tiny_store: Path) -> None:
    model, plain = load_model(tiny_store / "tiny"), load_model(tiny_store / "tiny")
    model.forward = Faulty(model.forward, lambda k, x: len(x) > 2, torch.OutOfMemoryError("CUDA out of memory"))
    engine = Engine(Settings(), Metrics())
    worker = BatchWorker(model, engine.metrics)
    job, reference = _job(engine, model, 4, n=4), _job(engine, plain, 4, n=4)
    _run(worker, job)
    _run(BatchWorker(plain, Metrics()), reference)
    torch.testing.assert_close(job.future.result().x, reference.future.result().x, rtol=1e-5, atol=1e-5)
    assert engine.metrics.registry.get_sample_value(
        "ddim_failures_total", {"model": "tiny", "cause": "out_of_memory_retry"}) == 6  # one per step


def test_a_dead_worker_thread_is_restarted_and_readiness_shows_it(tiny_store: Path) -> None:
    engine = Engine(Settings(model_store=tiny_store, default_model="tiny", dtype="float32", channels_last=False,
                             threads=1, warmup=False), Metrics())
    engine.load()
    try:
        model = engine.models["tiny"]
        # SystemExit passes every `except Exception`: the thread dies on the first forward
        model.forward = Faulty(model.forward, lambda k, x: k == 1, SystemExit("worker thread killed"))

        async def go() -> tuple[BaseException | None, str]:
            h = engine.submit(GenerateWork(n=1, steps=5, seed=1))
            await asyncio.gather(h.result(), return_exceptions=True)
            again = engine.submit(GenerateWork(n=1, steps=5, seed=1))
            await again.result()
            return h.error, again.status
        error, status = asyncio.run(go())
        assert isinstance(error, EngineError) and "restarted" in str(error)
        assert status == "succeeded" and engine.workers["tiny"].alive and engine.health()["ready"]
        assert engine.metrics.registry.get_sample_value(
            "ddim_failures_total", {"model": "tiny", "cause": "worker_restart"}) == 1
    finally:
        engine.stop()


def test_readiness_is_503_while_a_worker_thread_is_dead(tiny_store: Path) -> None:
    engine = Engine(Settings(), Metrics())
    engine.ready = True
    model = load_model(tiny_store / "tiny")
    model.forward = Faulty(model.forward, lambda k, x: k == 1, SystemExit("worker thread killed"))
    worker = engine.workers["tiny"] = BatchWorker(model, engine.metrics)
    worker.start()
    job = _job(engine, model, 1)
    worker.submit(job)
    worker._thread.join(30)
    assert not worker.alive and not job.future.done()
    health = engine.health()
    assert not health["ready"] and "tiny is restarting" in str(health["error"])
    worker.restart()
    with pytest.raises(EngineError, match="restarted"):
        job.future.result(timeout=30)
    assert worker.alive and engine.health()["ready"]
    worker.stop()
