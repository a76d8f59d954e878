"""docs/benchmarks.md from the JSON results of benchmarks.run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CUDA_NOTE = """## The CUDA path (written, untested here)

No GPU runs on the machine these numbers come from, so the CUDA path is written and reasoned
through but **untested**: the device is picked at startup (cuda, then mps, then cpu); `DDIM_DTYPE=auto`
picks bfloat16 where `torch.cuda.is_bf16_supported()`; step noise is drawn on the CPU (the seed
contract names CPU generators) into pinned host memory and copied with `non_blocking=True`; the batch
state (x, per-sample paths, eta, coefficients) lives on the device, so a step gathers its
coefficients there without host round trips; `DDIM_COMPILE=true` compiles one graph per batch
bucket with `mode="reduce-overhead"`, which records a CUDA graph per bucket (batches are padded up
to the next bucket). Finished samples are copied back once, when they leave the batch.
"""


def _f(x: float, d: int = 1) -> str:
    return f"{x:.{d}f}"


def write_report(results: dict[str, Any], out: Path) -> None:
    m = results["machine"]
    lines = ["# Benchmarks", "",
             f"Machine: {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}, CUDA: {m['cuda']}.",
             f"Reproduce: `make bench` (`python -m benchmarks.run`, arguments {results['args']}).", "",
             "Throughput is in image-steps/s (one image advanced by one denoising step). `limit` is a bare",
             "forward loop at batch B; `served` is HTTP load on a real server at saturation (2×B concurrent",
             "requests, n = 1, S as given); `peer` is diffusers' DDIMPipeline offline with the same UNet,",
             "S and batch (always fp32). `fast` is the default fast path: `DDIM_DTYPE=auto` (bfloat16 on",
             "CPUs with AVX512-BF16/AMX and on CUDA) with channels_last.", ""]
    for r in results["models"]:
        lines += [f"## {r['model']} (B = {r['batch']}, S = {r['steps']})", "",
                  "| config | limit | served | served / limit | peer (fp32) | served / peer | startup s | RSS MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for cfg in ("fp32", "fast"):
            c = r[cfg]
            lines.append(f"| {cfg} | {_f(c['limit'])} | {_f(c['served']['image_steps_per_s'])} | "
                         f"{_f(c['served_over_limit'], 3)} | {_f(c['peer'])} | {_f(c['served_over_peer'], 2)} | "
                         f"{_f(c['startup_s'])} | {_f(c['rss_mib'], 0)} |")
        lines += ["", "Mixed workload: latency (s) of S = 10, n = 1 requests, alone and with a background of",
                  "S = 250, n = 8 requests (2 clients).", "",
                  "| batching | alone p50 | alone p95 | busy p50 | busy p95 | busy p95 / alone p95 |",
                  "|---|---|---|---|---|---|"]
        for mode, x in r["mixed"].items():
            lines.append(f"| {mode} | {_f(x['alone_p50'], 3)} | {_f(x['alone_p95'], 3)} | {_f(x['busy_p50'], 3)} | "
                         f"{_f(x['busy_p95'], 3)} | {_f(x['p95_over_alone'], 2)} |")
        lines += ["", "Scaling (fp32):", "", "| max_batch_size | image-steps/s | p50 s |", "|---|---|---|"]
        for k, v in r["scaling"]["max_batch_size"].items():
            lines.append(f"| {k} | {_f(v['image_steps_per_s'])} | {_f(v['p50_s'], 2)} |")
        lines += ["", f"| concurrency (max_batch_size {r['batch']}) | image-steps/s | p50 s |", "|---|---|---|"]
        for k, v in r["scaling"]["concurrency"].items():
            lines.append(f"| {k} | {_f(v['image_steps_per_s'])} | {_f(v['p50_s'], 2)} |")
        lines.append("")
    lines.append(CUDA_NOTE)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
