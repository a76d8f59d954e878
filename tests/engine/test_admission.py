"""The queue's capacity counts every row the worker holds: waiting, in the batch, and taken from the queue but not
yet in the batch (while the stages condition them, outside the lock). A submit in that window was let past a full
queue (the flaky test_queue_full_is_overloaded)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.engine.jobs import QueueFull, SampleJob
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import load_model
from app.sampling import draw, sample_generators


def _job(model, n: int) -> SampleJob:  # type: ignore[no-untyped-def]
    gens = sample_generators(0, n)
    return SampleJob("generate", draw(gens, model.sample_shape), model.plan(5, "uniform", "generate"))


def test_rows_being_admitted_still_count_toward_the_queue(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(tiny_store / "tiny")
    worker = BatchWorker(model, Metrics(), max_batch_size=8, max_queue=64)
    conditioning, release, condition = threading.Event(), threading.Event(), worker.stages.condition

    def held(jobs: list[SampleJob]) -> dict[SampleJob, str]:
        conditioning.set()
        assert release.wait(60)
        return condition(jobs)

    monkeypatch.setattr(worker.stages, "condition", held)
    first = worker.submit(_job(model, 60))
    admitting = threading.Thread(target=worker._admit)
    admitting.start()
    try:
        assert conditioning.wait(60)
        assert (len(worker.waiting), len(worker.batch)) == (52, 0)  # 8 rows in transit
        with pytest.raises(QueueFull):
            worker.submit(_job(model, 8))  # 60 rows held + 8 > 64
        worker.submit(_job(model, 4))  # 64: still fits
    finally:
        release.set()
        admitting.join(60)
    assert len(worker.batch) == 8 and len(worker.waiting) == 56
    assert not first.future.done()
