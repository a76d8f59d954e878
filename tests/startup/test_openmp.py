"""An idle model's worker gives its OpenMP threads back, and takes new ones when work comes (app/startup/openmp.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.engine.client import Engine
from app.engine.tasks import GenerateWork
from app.metrics import Metrics
from app.startup.openmp import _libgomp

pytestmark = pytest.mark.skipif(_libgomp() is None, reason="torch here runs on an OpenMP other than GNU libgomp")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settle(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_idle_workers_release_their_teams_and_a_request_takes_one_again(tiny_store: Path) -> None:
    engine = Engine(Settings(model_store=tiny_store, default_model="tiny", dtype="float32", channels_last=False,
                             threads=2, warmup=True, max_batch_size=64), Metrics())
    before = _threads()
    engine.load()  # two models: each worker's warm-up forward at batch 64 starts a team of 2 threads
    try:
        loaded = _threads()
        assert loaded >= before + 2 + 2  # two worker threads, and a second OpenMP thread in each team
        # idle for IDLE_RELEASE_SECONDS: both teams end, their second threads exit
        assert _settle(lambda: _threads() <= loaded - 2), (loaded, _threads())
        released = _threads()

        async def generate() -> None:
            handle = engine.submit(GenerateWork(model="tiny", n=64, steps=3, seed=0))
            await handle.result()

        asyncio.run(generate())
        assert _threads() == released + 1  # the busy model's team is back; the other model's is not
        assert _settle(lambda: _threads() == released)  # and it goes again once idle
    finally:
        engine.stop()
