"""`make bench`: side-by-side throughput and latency numbers -> docs/benchmarks.md and a JSON file.

Every comparison is a ratio of two numbers measured in this same run, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.models import load_model
from app.models.folder import DDPM_CIFAR10_SCHEDULER, DDPM_CIFAR10_UNET, random_model_folder
from benchmarks.load import closed_loop, latencies_with_background
from benchmarks.report import write_report
from tests.server import running_server

ROOT = Path(__file__).resolve().parents[1]
CORES = str(os.cpu_count() or 1)
CONFIGS = {"fp32": {"DDIM_DTYPE": "float32", "DDIM_CHANNELS_LAST": "false"},
           "fast": {"DDIM_DTYPE": "auto", "DDIM_CHANNELS_LAST": "true"}}


def raw_forward(folder: Path, batch: int, env: dict[str, str], seconds: float) -> float:
    """The limit: image-steps/s of a bare forward loop at batch B, same device and dtype as the server."""
    m = load_model(folder, dtype=env["DDIM_DTYPE"], channels_last=env["DDIM_CHANNELS_LAST"] == "true")
    x, t = torch.randn(batch, *m.sample_shape), torch.randint(0, 1000, (batch,))
    m.eps(x, t)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        m.eps(x, t)
        n += 1
    return batch * n / (time.perf_counter() - start)


def ddim_pipeline(folder: Path, batch: int, steps: int, dtype: str) -> float:
    """The peer: diffusers' DDIMPipeline offline with the same UNet, S and batch."""
    from diffusers import DDIMPipeline, DDIMScheduler

    m = load_model(folder, dtype=dtype)
    pipe = DDIMPipeline(unet=m.unet, scheduler=DDIMScheduler.from_config(m.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, num_inference_steps=2, output_type="np")
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np", eta=0.0)
    return batch * steps / (time.perf_counter() - start)


async def served(url: str, batch: int, steps: int, seconds: float, warmup: float) -> dict[str, float]:
    r = await closed_loop(url, {"n": 1, "steps": steps}, concurrency=2 * batch, seconds=seconds, warmup=warmup)
    return {"image_steps_per_s": r.image_steps_per_s, "p50_s": r.p50, "requests": len(r.latencies),
            "errors": r.errors}


def bench_model(name: str, folder: Path, batch: int, a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "batch": batch, "steps": a.steps}
    store = Path(tempfile.mkdtemp()) / "store"
    store.mkdir()
    (store / name).symlink_to(folder.resolve())
    for cfg, env in CONFIGS.items():
        row: dict[str, Any] = {"limit": raw_forward(folder, batch, env, a.seconds)}
        row["peer"] = ddim_pipeline(folder, batch, a.steps, env["DDIM_DTYPE"] if cfg == "fp32" else "float32")
        t0 = time.monotonic()
        with running_server(store, DDIM_MAX_BATCH_SIZE=str(batch), DDIM_THREADS="0", OMP_NUM_THREADS=CORES,
                            **env) as url:
            row["startup_s"] = time.monotonic() - t0
            row["served"] = asyncio.run(served(url, batch, a.steps, a.seconds, a.warmup))
            row["rss_mib"] = server_rss(url)
        s = row["served"]["image_steps_per_s"]
        row["served_over_limit"], row["served_over_peer"] = s / row["limit"], s / row["peer"]
        out[cfg] = row
    out["mixed"] = {}
    for mode in ("step", "request"):
        with running_server(store, DDIM_MAX_BATCH_SIZE=str(batch), DDIM_BATCHING=mode, DDIM_THREADS="0",
                            OMP_NUM_THREADS=CORES) as url:
            probe = {"n": 1, "steps": 10}
            alone = asyncio.run(latencies_with_background(url, probe, a.probes, None, 0))
            busy = asyncio.run(latencies_with_background(url, probe, a.probes, {"n": 8, "steps": 250}, 2))
        out["mixed"][mode] = {"alone_p50": alone.p50, "alone_p95": alone.percentile(95),
                              "busy_p50": busy.p50, "busy_p95": busy.percentile(95),
                              "p95_over_alone": busy.percentile(95) / alone.percentile(95)}
    out["scaling"] = {"max_batch_size": {}, "concurrency": {}}
    for mbs in sorted({max(1, batch // 4), max(1, batch // 2), batch}):
        with running_server(store, DDIM_MAX_BATCH_SIZE=str(mbs), DDIM_THREADS="0", OMP_NUM_THREADS=CORES) as url:
            out["scaling"]["max_batch_size"][mbs] = asyncio.run(served(url, mbs, a.steps, a.seconds, a.warmup))
    with running_server(store, DDIM_MAX_BATCH_SIZE=str(batch), DDIM_THREADS="0", OMP_NUM_THREADS=CORES) as url:
        for conc in sorted({max(1, batch // 4), max(1, batch // 2), batch}):
            r = asyncio.run(closed_loop(url, {"n": 1, "steps": a.steps}, conc, a.seconds, a.warmup))
            out["scaling"]["concurrency"][conc] = {"image_steps_per_s": r.image_steps_per_s, "p50_s": r.p50}
    return out


def server_rss(url: str) -> float:
    """RSS of the server process, read from /proc by the port it listens on."""
    port = url.rsplit(":", 1)[1]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.main" in cmd and port.encode() in cmd:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seconds", type=float, default=40.0, help="measurement window per point")
    p.add_argument("--warmup", type=float, default=15.0, help="load before each window")
    p.add_argument("--probes", type=int, default=20, help="S=10 requests per mixed-workload phase")
    p.add_argument("--fashion-batch", type=int, default=64)
    p.add_argument("--cifar-batch", type=int, default=16)
    p.add_argument("--models", default="fashion-mnist,cifar10-arch")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    a = p.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__, "cuda": torch.cuda.is_available()},
                               "args": vars(a), "models": []}
    for name in a.models.split(","):
        if name == "fashion-mnist":
            folder, batch = ROOT / "model_store" / "fashion-mnist", a.fashion_batch
        elif Path(name).is_dir():  # any model folder, e.g. a tiny one for a smoke run
            folder, batch, name = Path(name), a.fashion_batch, Path(name).name
        elif name == "cifar10-arch":
            folder = random_model_folder(Path(tempfile.mkdtemp()) / name, DDPM_CIFAR10_UNET, DDPM_CIFAR10_SCHEDULER,
                                         layout="flat")
            batch = a.cifar_batch
        else:
            raise SystemExit(f"unknown model {name!r}: fashion-mnist, cifar10-arch or a model folder")
        results["models"].append(bench_model(name, folder, batch, a))
        Path(a.json).write_text(json.dumps(results, indent=2))
    write_report(results, Path(a.out))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
