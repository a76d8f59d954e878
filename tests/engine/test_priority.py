"""Short-first stepping, driven step by step on a real (tiny) model: no thread, no timing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine.jobs import SampleJob
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import load_model
from app.sampling import draw, sample_generators, timestep_sequence
from app.sampling.loop import sample


@pytest.fixture(scope="module")
def model(tiny_store: Path):  # type: ignore[no-untyped-def]
    return load_model(tiny_store / "tiny")


def _job(model, steps: int, n: int, seed: int, eta: float = 0.0) -> SampleJob:  # type: ignore[no-untyped-def]
    gens = sample_generators(seed, n)
    return SampleJob("generate", draw(gens, model.sample_shape), model.plan(steps, "uniform", "generate"),
                     eta=eta, generators=gens if eta > 0 else None)


def _tick(w: BatchWorker) -> None:
    w._admit()
    w.step()


def _long_progress(w: BatchWorker, job: SampleJob) -> int:
    return int(w.batch.pos[[r.job is job for r in w.batch.rows]].min())


@pytest.mark.parametrize("priority", ["short-first", "fifo"])
def test_a_short_job_runs_ahead_of_long_ones_only_in_short_first(model, priority: str) -> None:  # type: ignore[no-untyped-def]
    w = BatchWorker(model, Metrics(), max_batch_size=16, priority=priority, max_defer_steps=100)
    long = w.submit(_job(model, 200, 4, seed=1, eta=0.5))
    for _ in range(3):
        _tick(w)
    short = w.submit(_job(model, 10, 1, seed=9, eta=1.0))
    forwards = 0
    while not short.future.done():
        _tick(w)
        forwards += 1
    assert forwards == 10
    assert _long_progress(w, long) == (3 if priority == "short-first" else 13)
    while not long.future.done():
        _tick(w)
    # the order of forwards changes nothing in any sample (the per-sample generators make noise order-free)
    for job, steps, eta, seed in ((long, 200, 0.5, 1), (short, 10, 1.0, 9)):
        gens = sample_generators(seed, job.n)
        x_T = draw(gens, model.sample_shape)  # the seed contract: x_T first, then one draw per step
        solo = sample(model.eps, x_T, model.alphas_cumprod, timestep_sequence(steps, 1000, "uniform"), eta=eta,
                      generators=gens)
        torch.testing.assert_close(job.future.result().x, solo, rtol=0, atol=1e-4)


def test_long_rows_are_never_starved(model) -> None:  # type: ignore[no-untyped-def]
    w = BatchWorker(model, Metrics(), max_batch_size=16, max_defer_steps=3)
    long = w.submit(_job(model, 100, 2, seed=1))
    _tick(w)
    shorts = [w.submit(_job(model, 20, 1, seed=s)) for s in range(3)]
    for _ in range(20):  # 20 forwards: the long rows get one after every 3 short ones
        _tick(w)
    assert _long_progress(w, long) == 1 + 20 // 4
    assert not any(s.future.done() for s in shorts)


def test_similar_jobs_always_share_the_whole_batch(model) -> None:  # type: ignore[no-untyped-def]
    w = BatchWorker(model, Metrics(), max_batch_size=16)
    a = w.submit(_job(model, 50, 3, seed=1))
    _tick(w)
    b = w.submit(_job(model, 100, 2, seed=2))  # S within 4x of the shortest: one class
    for _ in range(10):
        _tick(w)
    assert _long_progress(w, a) == 11 and _long_progress(w, b) == 10


def test_a_short_job_gets_past_a_full_batch_of_long_ones(model) -> None:  # type: ignore[no-untyped-def]
    w = BatchWorker(model, Metrics(), max_batch_size=4, max_defer_steps=100)
    long = w.submit(_job(model, 200, 4, seed=1))
    queued = w.submit(_job(model, 200, 2, seed=3))  # waits for a free slot, in FIFO order
    _tick(w)
    short = w.submit(_job(model, 10, 1, seed=9))
    sizes = []
    while not short.future.done():
        w._admit()
        sizes.append(len(w.batch.inputs(w._rows_to_step())[0]))
        w.step()
    assert len(sizes) == 10 and max(sizes) == 1  # it ran alone, at once
    assert _long_progress(w, long) == 1
    assert len(w.waiting) == 2 and all(r.job is queued for r in w.waiting)
