"""DPM-Solver++ and UniPC rows in the engine's batch (issue 28): on real tiny models, each request equals a loop of
diffusers' own scheduler built from the model's scheduler config, alone and beside rows of other samplers and S."""

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
from app.engine.tasks import GenerateWork
from app.metrics import Metrics
from app.models import LoadedModel
from app.sampling import draw, sample_generators
from tests.sampling.test_multistep import reference


@pytest.fixture(scope="module")
def engine(tiny_store: Path, cond_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    store = tmp_path_factory.mktemp("sampler_store")
    (store / "tiny").symlink_to(tiny_store / "tiny")
    (store / "tiny-plain-flow").symlink_to(cond_store / "tiny-plain-flow")
    e = Engine(Settings(model_store=store, default_model="tiny", dtype="float32", channels_last=False,
                        max_batch_size=64, threads=1, warmup=False, priority="fifo"), Metrics())
    e.load()
    yield e
    e.stop()


def _generate(engine: Engine, works: list[GenerateWork]) -> list[torch.Tensor]:
    async def go() -> list[torch.Tensor]:
        handles = [engine.submit(w) for w in works]  # all queued before the first step: one batch
        return [(await h.result()).tensors["x_0"] for h in handles]
    return asyncio.run(go())


def _diffusers_loop(model: LoadedModel, sampler: str, order: int, schedule: str, S: int, seed: int,
                    n: int) -> torch.Tensor:
    config = dict(model.scheduler_config)
    sched = reference(config, sampler, order, "flow" if model.kind == "flow" else schedule, S)
    x = draw(sample_generators(seed, n), model.sample_shape)
    for t in sched.timesteps:
        x = sched.step(model.eps(x, t.expand(n).float()), t, x).prev_sample
    return x


CASES = [("tiny", "dpmsolver++", 2, "linspace", 10), ("tiny", "unipc", 2, "trailing", 7),
         ("tiny", "dpmsolver++", 3, "karras", 20), ("tiny", "unipc", 1, "leading", 5),
         ("tiny-plain-flow", "dpmsolver++", 2, "linspace", 8), ("tiny-plain-flow", "unipc", 3, "linspace", 12)]


@pytest.mark.parametrize("name,sampler,order,schedule,S", CASES)
def test_a_request_equals_diffusers_own_scheduler_loop(engine: Engine, name: str, sampler: str, order: int,
                                                        schedule: str, S: int) -> None:
    (got,) = _generate(engine, [GenerateWork(model=name, n=3, steps=S, seed=11, sampler=sampler,
                                             solver_order=order, schedule=schedule)])
    want = _diffusers_loop(engine.model(name), sampler, order, schedule, S, 11, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_rows_of_every_sampler_and_S_share_forwards_and_answer_as_alone(engine: Engine) -> None:
    works: list[dict[str, Any]] = [
        {"steps": 10, "sampler": "dpmsolver++", "seed": 1}, {"steps": 25, "sampler": "unipc", "solver_order": 3,
                                                              "seed": 2},
        {"steps": 15, "seed": 3}, {"steps": 6, "sampler": "dpmsolver++", "solver_order": 1, "seed": 4},
        {"steps": 12, "eta": 1.0, "seed": 5}, {"steps": 20, "sampler": "unipc", "schedule": "karras", "seed": 6},
    ]
    alone = [_generate(engine, [GenerateWork(n=2, **w)])[0] for w in works]
    forwards = engine.metrics.batch_size.labels("tiny")._sum.get()
    together = _generate(engine, [GenerateWork(n=2, **w) for w in works])
    assert engine.metrics.batch_size.labels("tiny")._sum.get() - forwards == 2 * sum(w["steps"] for w in works)
    for a, b in zip(alone, together):  # the forward's own float32 sums vary with the batch's size: 1e-5 relative
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("fields,field", [
    ({"sampler": "dpmsolver++", "eta": 0.5}, "eta"), ({"sampler": "unipc", "variance": "large"}, "variance"),
    ({"sampler": "unipc", "clip_denoised": True}, "clip_denoised"), ({"solver_order": 2}, "solver_order"),
    ({"sampler": "dpmsolver++", "schedule": "quadratic"}, "schedule"), ({"schedule": "karras"}, "schedule"),
])
def test_what_a_sampler_cannot_do_is_refused(engine: Engine, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        engine.submit(GenerateWork(steps=5, **fields))
    assert e.value.field == field
