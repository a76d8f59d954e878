"""A tiny Stable Diffusion pipeline, served against a plain loop of the same denoiser forward with CFG (issue 26 §6).

- plain: B images guided by one prompt, both rows of each in one forward, the DDIM update, S steps
  (LoadedModel.network with prompts: the encodings computed once, outside the timed loop);
- engine: the server's own Engine.load on the same store, 2B jobs of n = 1 with the prompt kept in flight, no HTTP
  (prompts through the stages, latents decoded at the end);
- served: a fresh server (DDIM_MAX_BATCH_SIZE = 2B rows: B guided samples) under 2B closed-loop clients posting
  n = 1 requests with the same prompt (B running, B waiting); image-steps per second from the server's own
  counter over whole forwards, VAE decode, PNG encoding and HTTP included.

This 2-core machine's speed drifts, and one process can run the same forward loop 10-15 % slower than another for
its whole life (docs/benchmarks.md, "How to read these numbers"). So, as `make bench`'s served rounds do
(benchmarks/paired.py), each round starts a fresh server, a fresh plain process and a fresh engine process, and
alternates short slices in which only one of them computes; the ratio is the median over the rounds of each round's
own ratio. Also recorded:
- the prompt cache: encode calls, hits and misses, and encode seconds, from the server's metrics; a new prompt
  costs one encoder call, a repeated one none;
- previews: one VAE decode of x0-hat (B latents) against one guided forward of the batch, medians, timed in a
  fresh process;
- tracing: one guided forward traced (DDIM_TRACE, the default, which all three above run) and eager, alone and
  beside a Python thread that spins, in a fresh process.

    python -m benchmarks.studies.text_pipeline [--batch 8] [--steps 50,20] [--rounds 3] [--slices 3] [--seconds 4]

It writes benchmarks/studies/text_pipeline.json, which `python -m benchmarks.report` renders.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from app.models import load_model
from app.sampling import draw, sample_generators
from app.sampling.loop import run_plan
from app.startup.memory import keep_freed_memory
from benchmarks.isolated import Resident, in_child
from benchmarks.load import edge_window
from benchmarks.paired import paired_slices
from benchmarks.serving import CORES
from benchmarks.studies import save_study
from harness.pipelines import tiny_sd
from harness.server import server_process

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a cat"


def plain_loop(folder: Path, batch: int, steps: int, dtype: str, threads: int,
               keep_freed: bool) -> Callable[[float], float]:
    """Setup for benchmarks.isolated.Resident: the model loaded, the prompts encoded, one untimed run; the measure is
    image-steps per second of whole runs over about `seconds`."""
    if keep_freed:  # the allocator setting the server runs with (DDIM_KEEP_FREED_MEMORY)
        keep_freed_memory()
    torch.set_num_threads(threads)
    model = load_model(folder, dtype=dtype)
    net = model.network(guidance_scale=7.5, prompts=[PROMPT] * batch, negative_prompts=[""] * batch)
    plan = model.plan(steps, model.spacings[0], "generate")
    x_T = draw(sample_generators(0, batch), model.sample_shape)
    run_plan(net, x_T, plan, prediction_type=model.prediction_type)

    def measure(seconds: float) -> float:
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or runs == 0:
            run_plan(net, x_T, plan, prediction_type=model.prediction_type)
            runs += 1
        return batch * steps * runs / (time.perf_counter() - started)

    return measure


def engine_loop(store: Path, batch: int, steps: int, dtype: str, threads: int,
                keep_freed: bool) -> Callable[[float], float]:
    """Setup for Resident: the engine without HTTP, loaded and warmed by the server's own Engine.load, 2B jobs of
    n = 1 with the prompt kept in flight (each finished job replaced at once; stop the process while others are
    measured). The measure is image-steps/s from the engine's step counter over whole forwards."""
    from app.config import Settings
    from app.engine.client import Engine
    from app.metrics import Metrics

    engine = Engine(Settings(model_store=store, dtype=dtype, channels_last=False, keep_freed_memory=keep_freed,
                             max_batch_size=2 * batch, threads=threads), Metrics())
    engine.load()
    model = engine.model("sd")
    worker, seeds = engine.workers[model.name], iter(range(10**9))

    def submit(_: object = None) -> None:
        job, _seed = engine.generate_job(model, n=1, steps=steps, eta=0.0, large=False, schedule=None,
                                         seed=next(seeds), guidance_scale=7.5, prompts=[PROMPT],
                                         negative_prompts=[""])
        job.future.add_done_callback(submit)
        worker.submit(job)

    counter = engine.metrics.sample_steps.labels(model.name)
    for _ in range(2 * batch):
        submit()

    def measure(seconds: float) -> float:
        return float(edge_window(counter._value.get, seconds, 0.005))

    measure.stop = engine.stop  # type: ignore[attr-defined]
    return measure


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")) and (not labels or want in line):
            return float(line.split()[-1])
    return 0.0


def cache_facts(url: str) -> dict[str, Any]:
    """The encoder's cost for a new prompt, and for the same prompt again."""
    def encodes() -> tuple[float, float]:
        text = httpx.get(f"{url}/metrics").text
        return (metric(text, "ddim_text_encode_seconds_count", model="sd"),
                metric(text, "ddim_text_encode_seconds_sum", model="sd"))

    out: dict[str, Any] = {}
    for kind in ("new prompt", "same prompt again"):
        before = encodes()
        httpx.post(f"{url}/generate", json={"model": "sd", "prompt": "a red house by a lake", "steps": 2, "seed": 0},
                   timeout=600).raise_for_status()
        after = encodes()
        out[kind] = {"encoder_calls": after[0] - before[0], "encode_ms": 1000 * (after[1] - before[1])}
    return out


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def preview_costs(folder: Path, batch: int, dtype: str, threads: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one VAE decode of B latents (a preview's x0-hat) and of one guided forward (2B rows), in this
    process, each the median of repeats."""
    torch.set_num_threads(threads)
    model = load_model(folder, dtype=dtype)
    assert model.codec is not None
    net = model.network(guidance_scale=7.5, prompts=[PROMPT] * batch, negative_prompts=[""] * batch)
    x, t = draw(sample_generators(0, batch), model.sample_shape), torch.full((batch,), 500.0)
    with torch.inference_mode():
        return {"decode_ms": _median_ms(lambda: model.codec.decode(x), repeats),  # type: ignore[union-attr]
                "forward_ms": _median_ms(lambda: net(x, t), repeats)}


def trace_costs(folder: Path, batch: int, dtype: str, threads: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one guided forward of the batch (2B rows), traced (DDIM_TRACE, the default) and eager, each
    alone and beside a Python thread that only spins (as the server's event loop does while it works), in this
    process: medians of repeats (5 beside the spinner)."""
    torch.set_num_threads(threads)
    out: dict[str, float] = {}
    for name, trace in (("traced", True), ("eager", False)):
        model = load_model(folder, dtype=dtype, trace=trace)
        net = model.network(guidance_scale=7.5, prompts=[PROMPT] * batch, negative_prompts=[""] * batch)
        x, t = draw(sample_generators(0, batch), model.sample_shape), torch.full((batch,), 500.0)
        out[f"{name}_ms"] = _median_ms(lambda: net(x, t), repeats)  # noqa: B023 -- called at once
        stop = threading.Event()
        spinner = threading.Thread(target=_spin, args=(stop,))
        spinner.start()
        try:
            out[f"{name}_beside_spinner_ms"] = _median_ms(lambda: net(x, t), 5)  # noqa: B023
        finally:
            stop.set()
            spinner.join()
    return out


def _spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1


def paired_rounds(store: Path, folder: Path, a: argparse.Namespace, steps: int) -> dict[str, Any]:
    """a.rounds rounds at S = steps, each with a fresh server, plain process and engine process: the medians of the
    rates and of each round's own ratios, every round's slices, and the server's prompt-cache facts."""
    body = {"model": "sd", "prompt": PROMPT, "n": 1, "steps": steps}
    rounds: list[dict[str, Any]] = []
    cache: dict[str, float] = {"hit": 0.0, "miss": 0.0}
    for r in range(a.rounds):
        with server_process(store, plain=False, DDIM_MAX_BATCH_SIZE=str(2 * a.batch), DDIM_THREADS=str(a.threads),
                            OMP_NUM_THREADS=str(a.threads), DDIM_DTYPE=a.dtype, DDIM_DEFAULT_MODEL="sd",
                            DDIM_CHANNELS_LAST="false") as (url, proc), \
                Resident(plain_loop, folder, a.batch, steps, a.dtype, a.threads, True) as plain, \
                Resident(engine_loop, store, a.batch, steps, a.dtype, a.threads, True) as engine:
            out = paired_slices(url, proc.pid, plain, engine, body, a.batch, a.slices, a.warmup, a.seconds)
            text = httpx.get(f"{url}/metrics").text
            for k in cache:
                cache[k] += metric(text, "ddim_prompt_cache_total", model="sd", result=k)
        rounds.append(out)
        print(f"S = {steps}, round {r + 1}: plain {out['limit']:.1f}, engine {out['engine']:.1f}, served "
              f"{out['served']:.1f} img*steps/s; served / plain {out['served_over_limit']:.3f}", flush=True)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    return {"steps": steps, "plain": med("limit"), "engine": med("engine"), "served": med("served"),
            "served_over_plain": med("served_over_limit"), "engine_over_plain": med("engine_over_limit"),
            "requests": sum(x["answered"] for x in rounds), "errors": sum(x["errors"] for x in rounds),
            "cache": cache, "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", default="50,20", help="S values, comma-separated (50: the server's default)")
    p.add_argument("--rounds", type=int, default=3, help="fresh server, plain and engine processes per round")
    p.add_argument("--slices", type=int, default=3, help="paired slices per round")
    p.add_argument("--seconds", type=float, default=4.0, help="one slice's window")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads of all three (1: a tiny model on a shared "
                   "machine runs fastest on one; with a core taken by another process, OpenMP's spin-waits cost "
                   "more than the second thread gains)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "studies" / "text_pipeline.json"))
    a = p.parse_args()
    store = Path(tempfile.mkdtemp(prefix="ddim-text-bench-")) / "store"
    folder = tiny_sd(store / "sd")
    runs = [paired_rounds(store, folder, a, int(s)) for s in a.steps.split(",")]
    with server_process(store, plain=False, DDIM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
                        DDIM_DTYPE=a.dtype, DDIM_DEFAULT_MODEL="sd", DDIM_CHANNELS_LAST="false") as (url, _proc):
        repeat = cache_facts(url)
    cache = {k: sum(r["cache"][k] for r in runs) for k in ("hit", "miss")}
    save_study(vars(a), ROOT, machine=f"{platform.machine()}, {CORES} cores, torch {torch.__version__}", runs=runs,
               cache=cache, hit_rate=cache["hit"] / max(1.0, cache["hit"] + cache["miss"]), repeat=repeat,
               **in_child(preview_costs, folder, a.batch, a.dtype, a.threads),
               tracing=in_child(trace_costs, folder, a.batch, a.dtype, a.threads))
    for r in runs:
        print(f"S = {r['steps']}: served / plain = {r['served_over_plain']:.3f} (median of {a.rounds} rounds)")
    print(f"cache {cache}; repeat {repeat}", flush=True)


if __name__ == "__main__":
    main()
