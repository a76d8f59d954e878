"""A tiny Stable Diffusion pipeline, served against a plain loop of the same denoiser forward with CFG (issue 26 §6).

- plain: in this process, B images guided by one prompt, both rows of each in one forward, the DDIM update, S steps
  (LoadedModel.network with prompts: the encodings computed once, outside the timed loop);
- served: a fresh server (DDIM_MAX_BATCH_SIZE = 2B rows: B guided samples) under 2B closed-loop clients posting
  n = 1 requests with the same prompt (B running, B waiting); image-steps per second from the server's own
  counter over the window, VAE decode, PNG encoding and HTTP included;
- the prompt cache: encode calls, hits and misses, and encode seconds, from the server's metrics; a new prompt
  costs one encoder call, a repeated one none;
- previews: one VAE decode of x0-hat per preview, against the mean denoiser forward.

    python -m benchmarks.studies.text_pipeline [--batch 8] [--steps 20] [--seconds 10] [--dtype float32]

It writes benchmarks/studies/text_pipeline.json, which `python -m benchmarks.report` renders.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from app.models import load_model
from app.sampling import draw, sample_generators
from app.sampling.loop import run_plan
from benchmarks.load import closed_loop
from benchmarks.serving import CORES
from benchmarks.studies import save_study
from harness.pipelines import tiny_sd
from harness.server import running_server

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a cat"


def plain_loop(folder: Path, batch: int, steps: int, seconds: float, dtype: str, threads: int) -> float:
    """Image-steps per second of the plain loop (after one untimed run)."""
    torch.set_num_threads(threads)
    model = load_model(folder, dtype=dtype)
    net = model.network(guidance_scale=7.5, prompts=[PROMPT] * batch, negative_prompts=[""] * batch)
    plan = model.plan(steps, model.spacings[0], "generate")
    x_T = draw(sample_generators(0, batch), model.sample_shape)
    run_plan(net, x_T, plan, prediction_type=model.prediction_type)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs == 0:
        run_plan(net, x_T, plan, prediction_type=model.prediction_type)
        runs += 1
    return batch * steps * runs / (time.perf_counter() - started)


def engine_loop(folder: Path, batch: int, steps: int, seconds: float, dtype: str, threads: int) -> float:
    """Image-steps per second of the engine alone (no HTTP): a BatchWorker in its own thread, 2B jobs of n = 1 kept
    in flight (each finished job replaced at once), prompts through the stages, latents decoded at the end."""
    from app.config import Settings
    from app.engine.client import Engine
    from app.engine.worker import BatchWorker
    from app.metrics import Metrics

    model = load_model(folder, dtype=dtype)
    metrics = Metrics()
    engine = Engine(Settings(), metrics)
    worker = BatchWorker(model, metrics, max_batch_size=2 * batch)
    stop, seeds = threading.Event(), iter(range(10**9))

    def submit(_: object = None) -> None:
        if not stop.is_set():
            job, _seed = engine.generate_job(model, n=1, steps=steps, eta=0.0, large=False, schedule=None,
                                             seed=next(seeds), guidance_scale=7.5, prompts=[PROMPT],
                                             negative_prompts=[""])
            job.future.add_done_callback(submit)
            worker.submit(job)

    def counted() -> float:
        return float(metrics.sample_steps.labels(model.name)._value.get())

    threading.Thread(target=lambda: (torch.set_num_threads(threads), worker.run_here()), daemon=True).start()
    for _ in range(2 * batch):
        submit()
    time.sleep(2)
    before, started = counted(), time.perf_counter()
    time.sleep(seconds)
    rate = (counted() - before) / (time.perf_counter() - started)
    stop.set()
    worker.stop()
    return rate


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads of both (1: a tiny model on a shared "
                   "machine runs fastest on one; with a core taken by another process, OpenMP's spin-waits cost "
                   "more than the second thread gains)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "studies" / "text_pipeline.json"))
    a = p.parse_args()
    store = Path(tempfile.mkdtemp(prefix="ddim-text-bench-")) / "store"
    folder = tiny_sd(store / "sd")
    plain = plain_loop(folder, a.batch, a.steps, a.seconds, a.dtype, a.threads)
    print(f"plain loop: {plain:.1f} img*steps/s", flush=True)
    engine = engine_loop(folder, a.batch, a.steps, a.seconds, a.dtype, a.threads)
    print(f"engine: {engine:.1f} img*steps/s", flush=True)
    with running_server(store, plain=False, DDIM_MAX_BATCH_SIZE=str(2 * a.batch), DDIM_THREADS=str(a.threads),
                        OMP_NUM_THREADS=str(a.threads), DDIM_DTYPE=a.dtype, DDIM_DEFAULT_MODEL="sd",
                        DDIM_CHANNELS_LAST="false") as url:
        # 2B clients for B slots: a finished request's slot is taken at the next step by a waiting one, as in
        # benchmarks.run's served rounds, not left empty while its client reads the answer and posts again
        load = closed_loop(url, {"model": "sd", "prompt": PROMPT, "n": 1, "steps": a.steps}, 2 * a.batch,
                           a.seconds, a.warmup)
        print(f"served: {load.image_steps_per_s:.1f} img*steps/s", flush=True)
        text = httpx.get(f"{url}/metrics").text
        cache = {k: metric(text, "ddim_prompt_cache_total", model="sd", result=k) for k in ("hit", "miss")}
        forward = (metric(text, "ddim_model_forward_seconds_sum", model="sd")
                   / max(1.0, metric(text, "ddim_model_forward_seconds_count", model="sd")))
        decode = (metric(text, "ddim_vae_decode_seconds_sum", model="sd")
                  / max(1.0, metric(text, "ddim_vae_decode_seconds_count", model="sd")))
        repeat = cache_facts(url)
    save_study(vars(a), ROOT, machine=f"{platform.machine()}, {CORES} cores, torch {torch.__version__}",
               plain_image_steps_per_s=plain, engine_image_steps_per_s=engine,
               served_image_steps_per_s=load.image_steps_per_s,
               ratio=load.image_steps_per_s / plain, requests=len(load.latencies), errors=load.errors,
               cache=cache, hit_rate=cache["hit"] / max(1.0, cache["hit"] + cache["miss"]), repeat=repeat,
               forward_ms=1000 * forward, decode_ms=1000 * decode)
    print(f"served / plain = {load.image_steps_per_s / plain:.3f}; cache {cache}; repeat {repeat}", flush=True)


if __name__ == "__main__":
    main()
