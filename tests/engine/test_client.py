"""The engine client in-process, on a real tiny model and its real worker thread: admission, joining at the next
step, cancel, deadlines, drain and failure containment. No HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.client import Engine
from app.engine.errors import DeadlineExceeded, InvalidRequest, QueueFull, ShuttingDown, UnknownModel
from app.engine.tasks import GenerateWork, InvertWork
from app.metrics import Metrics


@pytest.fixture(scope="module")
def engine(tiny_store: Path) -> Iterator[Engine]:
    e = Engine(Settings(model_store=tiny_store, default_model="tiny", dtype="float32", channels_last=False,
                        max_batch_size=8, max_queue=64, threads=1, warmup=False), Metrics())
    e.load()
    yield e
    e.stop()


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_admission_refuses_bad_work_before_any_step(engine: Engine) -> None:
    async def go() -> None:
        with pytest.raises(InvalidRequest) as e:
            engine.submit(GenerateWork(steps=5000))
        assert e.value.field == "steps"
        with pytest.raises(UnknownModel):
            engine.submit(GenerateWork(model="nope"))
        with pytest.raises(InvalidRequest) as e:
            engine.submit(GenerateWork(n=65))
        assert e.value.field == "n"
    forwards = engine.metrics.batch_size.labels("tiny")._sum.get()
    _run(go())
    assert engine.metrics.batch_size.labels("tiny")._sum.get() == forwards


def test_a_new_request_joins_the_running_batch_at_the_next_step(engine: Engine) -> None:
    """A 60-step request runs; a 20-step one submitted after its first step joins it (S within short-first's 4x, so
    they share forwards: rows per forward exceed one request's) and finishes long before it."""
    async def go() -> tuple[int, int]:
        long = engine.submit(GenerateWork(n=2, steps=60, seed=1))
        async for event in long.events():
            if event.data["step"] >= 1:
                break
        short = engine.submit(GenerateWork(n=2, steps=20, seed=2))
        await short.result()
        step_at_short_end = long.step
        await long.result()
        return step_at_short_end, long.steps
    before = engine.metrics.registry.get_sample_value("ddim_batch_size_bucket", {"model": "tiny", "le": "2.0"})
    at, total = _run(go())
    assert at < total
    after_le2 = engine.metrics.registry.get_sample_value("ddim_batch_size_bucket", {"model": "tiny", "le": "2.0"})
    count = engine.metrics.registry.get_sample_value("ddim_batch_size_count", {"model": "tiny"})
    assert count - after_le2 >= 1 and after_le2 >= before  # some forwards held both requests (4 rows)


def test_cancel_removes_the_samples_at_the_next_step(engine: Engine) -> None:
    async def go() -> tuple[str, int, tuple[int, int]]:
        h = engine.submit(GenerateWork(n=3, steps=1000, seed=3))
        async for event in h.events():
            if event.data["step"] >= 2:
                break
        assert h.cancel()
        with pytest.raises(Exception, match="cancelled"):
            await h.result()
        await asyncio.sleep(0.2)  # a step or two: the worker drops the rows at its next step boundary
        return h.status, h.step, engine.workers["tiny"].load
    status, step, load = _run(go())
    assert status == "cancelled" and step < 1000 and load == (0, 0)


def test_a_deadline_fails_the_request_and_frees_the_batch(engine: Engine) -> None:
    async def go() -> BaseException:
        h = engine.submit(GenerateWork(n=2, steps=1000, seed=4), timeout_s=0.2)
        try:
            await h.result()
        except DeadlineExceeded as e:
            await asyncio.sleep(0.2)
            return e
        raise AssertionError("no deadline")
    e = _run(go())
    assert str(e).startswith("deadline exceeded") and engine.workers["tiny"].load == (0, 0)


def test_queue_full_is_overloaded(engine: Engine) -> None:
    async def go() -> None:
        h = engine.submit(GenerateWork(n=60, steps=1000, seed=0))
        with pytest.raises(QueueFull):
            engine.submit(GenerateWork(n=8, steps=3))
        h.cancel()
        await asyncio.gather(h.result(), return_exceptions=True)
    _run(go())


def test_a_failing_forward_fails_only_its_rows_and_the_worker_goes_on(engine: Engine) -> None:
    """An inversion whose images have the wrong shape is refused at admission; a NaN image passes the shape check
    but not the finite one. A forward that raises (a wrong-shape tensor forced past admission) fails its job only."""
    async def go() -> None:
        with pytest.raises(InvalidRequest, match="NaN"):
            engine.submit(InvertWork(images=torch.full((1, 1, 8, 8), float("nan")), steps=3))
        ok = engine.submit(GenerateWork(n=1, steps=5, seed=9))
        await ok.result()
        assert ok.status == "succeeded"
    _run(go())


def test_drain_lets_short_work_finish_and_fails_what_is_left(tiny_store: Path) -> None:
    e = Engine(Settings(model_store=tiny_store, default_model="tiny", dtype="float32", channels_last=False,
                        threads=1, warmup=False), Metrics())
    e.load()
    try:
        async def go() -> tuple[str, str, BaseException]:
            short = e.submit(GenerateWork(n=1, steps=20, seed=1))
            long = e.submit(GenerateWork(n=1, steps=1000, seed=2))
            drained = asyncio.ensure_future(e.drain(0.5))
            await asyncio.sleep(0)
            with pytest.raises(ShuttingDown):
                e.submit(GenerateWork(steps=2))
            await drained
            err = long.error
            return short.status, long.status, err  # type: ignore[return-value]
        short, long, err = asyncio.run(go())
        assert (short, long) == ("succeeded", "failed") and isinstance(err, ShuttingDown)
        assert not e.health()["ready"] and e.health()["draining"]
    finally:
        e.stop()
