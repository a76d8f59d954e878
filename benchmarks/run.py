"""`make bench`: side-by-side throughput and latency numbers -> docs/benchmarks.md and a JSON file.

Every comparison is a ratio of two numbers measured in this same run, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.models.fast import bf16_supported
from app.models.folder import DDPM_CIFAR10_SCHEDULER, DDPM_CIFAR10_UNET, random_model_folder
from benchmarks.fastpaths import ladder
from benchmarks.isolated import Resident, allocator_effect, in_child
from benchmarks.load import closed_loop, latencies_with_background
from benchmarks.paired import paired_round, summary
from benchmarks.peer import ddim_pipeline
from benchmarks.quality import dtype_quality
from benchmarks.report import write_report
from benchmarks.serving import CORES, serve, server_facts, server_pid
from benchmarks.studies import study_sections

ROOT = Path(__file__).resolve().parents[1]
# fp32: float32 with the server's other defaults (the layout it picks at warm-up); default: all its defaults,
# the fast path it turns on by itself
CONFIGS = {"fp32": {"DDIM_DTYPE": "float32"}, "default": {}}
MIXED_MODES = {"step, short-first": {"DDIM_BATCHING": "step", "DDIM_PRIORITY": "short-first"},
               "step, fifo": {"DDIM_BATCHING": "step", "DDIM_PRIORITY": "fifo"},
               "request": {"DDIM_BATCHING": "request"}}
PROBE, BACKGROUND = {"n": 1, "steps": 10}, {"n": 8, "steps": 250}


def served(url: str, body: dict[str, Any], concurrency: int, a: argparse.Namespace) -> dict[str, float]:
    r = closed_loop(url, body, concurrency, a.seconds, a.warmup)
    return {"image_steps_per_s": r.image_steps_per_s, "p50_s": r.p50, "requests": len(r.latencies),
            "errors": r.errors}


def bench_model(name: str, folder: Path, batch: int, a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "batch": batch, "steps": a.steps}
    store = Path(tempfile.mkdtemp()) / "store"
    store.mkdir()
    (store / name).symlink_to(folder.resolve())
    if folder.resolve().parent == (ROOT / "model_store").resolve():
        # a bundled model is served from the store as shipped: every bundled model loaded, this one busy (the
        # others idle), as `make serve` runs them (issue 24 found an idle model slowing the busy one)
        for other in sorted((ROOT / "model_store").iterdir()):
            if other.is_dir() and other.name != name:
                (store / other.name).symlink_to(other.resolve())
    out["store"] = sorted(p.name for p in store.iterdir())
    print(f"{name}: fast paths, raw forward at batch {batch}", flush=True)
    out["fast_paths"] = in_child(ladder, folder, batch, a.limit_seconds, not a.no_compile)
    out["allocator"] = {}
    for dtype in ("float32", "bfloat16"):
        out["allocator"][dtype] = allocator_effect(folder, batch, dtype, a.limit_seconds, a.rounds)
        print(f"{name} {dtype} malloc settings x thread: {out['allocator'][dtype]}", flush=True)
    body = {"n": 1, "steps": a.steps}
    all_peers: list[float] = []
    with Resident(ddim_pipeline, folder, batch, a.steps) as peer:
        for cfg, env in CONFIGS.items():
            keep = Settings(**{k.removeprefix("DDIM_").lower(): v for k, v in env.items()}).keep_freed_memory
            rounds = []
            for _ in range(a.rounds):  # a fresh server each round (benchmarks/paired.py says why)
                with serve(store, batch, **env) as url:
                    facts = server_facts(url)
                    paired = paired_round(url, server_pid(url), store, folder, batch, facts, keep, peer, a.steps,
                                          a.slices, a.warmup, a.slice_seconds)
                    rounds.append({**facts, **paired})
            row: dict[str, Any] = {**{k: rounds[0][k] for k in ("dtype", "channels_last")},
                                   "startup_s": statistics.median(r["startup_s"] for r in rounds),
                                   "rss_mib": statistics.median(r["rss_mib"] for r in rounds),
                                   "layouts": [r["channels_last"] for r in rounds], "keep_freed_memory": keep,
                                   **summary(rounds), "rounds": rounds}
            print(f"{name} {cfg}: {row}", flush=True)
            out[cfg] = row
            all_peers += row["peers"]
    out["peers"], out["peer"] = all_peers, statistics.median(all_peers)
    out["mixed"] = {}
    for mode, env in MIXED_MODES.items():
        # under FIFO or request-level batching a probe can wait for whole background requests
        probes = a.probes if mode == "step, short-first" or batch > 2 * BACKGROUND["n"] else a.request_probes
        with serve(store, batch, **env) as url:
            alone = asyncio.run(latencies_with_background(url, PROBE, probes, None, 0))
            busy = asyncio.run(latencies_with_background(url, PROBE, probes, BACKGROUND, a.background_clients))
        out["mixed"][mode] = {"probes": probes, "alone_p50": alone.p50, "alone_p95": alone.percentile(95),
                              "busy_p50": busy.p50, "busy_p95": busy.percentile(95),
                              "p95_over_alone": busy.percentile(95) / alone.percentile(95)}
        print(f"{name} mixed {mode}: {out['mixed'][mode]}", flush=True)
    out["scaling"] = {"max_batch_size": {}, "concurrency": {}}
    sizes = sorted({max(1, batch // 4), max(1, batch // 2), batch, 2 * batch})
    for mbs in sizes:
        with serve(store, mbs) as url:
            out["scaling"]["max_batch_size"][mbs] = served(url, body, 2 * mbs, a)
    with serve(store, batch) as url:
        for conc in sorted({1, max(1, batch // 4), batch, 2 * batch}):
            out["scaling"]["concurrency"][conc] = served(url, body, conc, a)
    print(f"{name} scaling: {out['scaling']}", flush=True)
    return out


def cpu_model() -> str:
    try:
        return next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                    if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seconds", type=float, default=12.0, help="HTTP measurement window per scaling point")
    p.add_argument("--warmup", type=float, default=4.0, help="HTTP load before each window")
    p.add_argument("--limit-seconds", type=float, default=6.0, help="raw forward loop per fast-path and malloc row")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per config, each with a fresh server, limit and engine process (benchmarks/paired.py)")
    p.add_argument("--slices", type=int, default=3, help="slices of limit, engine and served window per round")
    p.add_argument("--slice-seconds", type=float, default=4.0,
                   help="limit per slice; engine and served windows too, stretched to span 25 forwards")
    p.add_argument("--probes", type=int, default=20, help="S=10 requests per mixed-workload phase")
    p.add_argument("--request-probes", type=int, default=3,
                   help="probes where each may wait for whole background requests (request mode; FIFO mode "
                   "when the background fills the batch)")
    p.add_argument("--background-clients", type=int, default=2, help="clients looping S=250, n=8 requests")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it compiles for minutes)")
    p.add_argument("--quality-n", type=int, default=1000, help="samples per S for fp32 vs bf16 FID (0: skip)")
    p.add_argument("--fashion-batch", type=int, default=64)
    p.add_argument("--cifar-batch", type=int, default=16)
    p.add_argument("--models", default="fashion-mnist,cifar10-arch")
    p.add_argument("--merge", action="store_true", help="keep the other models' results from --json")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = CORES  # the measuring processes get the servers' thread count
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "cpu": cpu_model(), "bf16": bf16_supported(torch.device("cpu")),
                                           "torch": torch.__version__, "cuda": torch.cuda.is_available()},
                               "args": vars(a), "models": []}
    if a.quality_n:
        print("fp32 vs bfloat16 + channels_last: FID-FMNIST on the same seeds", flush=True)
        results["quality"] = dtype_quality(ROOT / "model_store" / "fashion-mnist",
                                           {"dtype": "bfloat16", "channels_last": True}, (10, 50), a.quality_n)
    if a.merge and Path(a.json).exists():  # keep the models (and quality rows) of an earlier run not re-run now
        earlier = json.loads(Path(a.json).read_text())
        if not results.get("quality") and earlier.get("quality"):
            results["quality"] = earlier["quality"]
            results["quality_from"] = earlier.get("quality_from") or earlier.get("args")
        results["models"] = [m for m in earlier["models"] if m["model"] not in a.models.split(",")]
        results["merged_from"] = earlier.get("args")
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
    write_report(results, Path(a.out), study_sections())
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
