"""Each fast path of the eps-network forward on its own: raw image-steps/s at batch B, side by side."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.models import load_model
from benchmarks.load import edge_window

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rate(fn: Forward, x: torch.Tensor, t: torch.Tensor, seconds: float) -> float:
    """image-steps/s of fn(x, t) in a loop, after one untimed call."""
    fn(x, t)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        fn(x, t)
        n += 1
    return len(x) * n / (time.perf_counter() - start)


def ladder(folder: Path, batch: int, seconds: float, compile_path: bool = True) -> list[dict[str, Any]]:
    """Raw forward rates: plain (no_grad, fp32), then one fast path more per row."""
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()

    def add(name: str, fn: Forward, sample_shape: tuple[int, ...], **extra: Any) -> None:
        x, t = torch.randn(batch, *sample_shape), torch.randint(0, 1000, (batch,))
        r = rate(fn, x, t, seconds)
        rows.append({"path": name, "image_steps_per_s": r, "over_plain": r / rows[0]["image_steps_per_s"] if rows
                     else 1.0, **extra})
        print(f"  {name}: {r:.1f} image-steps/s", flush=True)

    m = load_model(folder)

    def no_grad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m.unet(x, t).sample

    add("fp32, no_grad (plain)", no_grad, m.sample_shape)
    torch.set_num_threads(1)
    add("fp32, inference_mode, 1 thread", m.eps, m.sample_shape)
    torch.set_num_threads(threads)
    add(f"fp32, inference_mode, {threads} threads", m.eps, m.sample_shape)
    add("+ channels_last", load_model(folder, channels_last=True).eps, m.sample_shape)
    add("bf16", load_model(folder, dtype="bfloat16").eps, m.sample_shape)
    fast = load_model(folder, dtype="bfloat16", channels_last=True)
    add("bf16 + channels_last", fast.eps, m.sample_shape)
    if compile_path:
        started = time.perf_counter()
        fast.forward.compile(batch, 1e9, fast.sample_shape, buckets=[batch])
        add("bf16 + channels_last + torch.compile", fast.eps, m.sample_shape,
            compile_seconds=time.perf_counter() - started)
    return rows


def engine_loop(store: Path, batch: int, dtype: str, channels_last: bool, keep_freed: bool,
                steps: int) -> Callable[[float], float]:
    """Setup for benchmarks.isolated.Resident: the engine without HTTP, the server's own Engine.load (one
    thread loads, warms up and serves each model) on a store of one model, kept at 2×B waiting plus
    active samples of n = 1 jobs from now on (stop the process, SIGSTOP, while others are measured).
    The measure is image-steps/s over `seconds` from the engine's step counter, after 0.5 s to settle, over
    whole forwards (benchmarks.load.edge_window)."""
    from app.config import Settings
    from app.engine.client import Engine
    from app.engine.jobs import SampleJob
    from app.metrics import Metrics
    from app.sampling import draw, sample_generators

    engine = Engine(Settings(model_store=store, dtype=dtype, channels_last=channels_last,
                             keep_freed_memory=keep_freed, max_batch_size=batch), Metrics())
    engine.load()
    m = engine.model(None)
    worker = engine.workers[m.name]
    seq, seeds = m.plan(steps, m.spacings[0], "generate"), iter(range(10**9))

    def submit(_: object = None) -> None:
        job = SampleJob("generate", draw(sample_generators(next(seeds), 1), m.sample_shape), seq)
        job.future.add_done_callback(submit)  # one finishes, the next comes: a closed loop
        worker.submit(job)

    counter = engine.metrics.sample_steps.labels(m.name)
    for _ in range(2 * batch):
        submit()

    def measure(seconds: float) -> float:
        return float(edge_window(counter._value.get, seconds, 0.005))

    measure.stop = engine.stop  # type: ignore[attr-defined]
    return measure
