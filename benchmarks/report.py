"""docs/benchmarks.md from the JSON results of benchmarks.run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.features import FEATURES_JSON, report_lines
from benchmarks.format import fmt
from benchmarks.ray_bench import report_lines as ray_lines
from benchmarks.solvers import SOLVERS_JSON
from benchmarks.solvers import report_lines as solver_lines

NOTES = """## How to read these numbers

- **Noise, and pairing.** This 2-core virtual machine's speed drifts by 5–10 % over tens of
  seconds, and one process can run the same forward loop up to 15 % slower than another for its
  whole life (seen with several fresh limit processes measured in turn). So each config runs
  rounds, each with a fresh server, a fresh limit process and a fresh engine process
  (`benchmarks/paired.py`). In a round the server stays at saturation under its HTTP clients, and
  short slices alternate in which only one of them computes: the limit and the engine run while the
  server is stopped (SIGSTOP), the served window while they idle. Each ratio pairs numbers taken
  seconds apart; the table shows the medians over the rounds of the rates and of each round's own
  ratios. The JSON keeps every slice of every round (`rounds`). The served and engine windows open
  and close as a forward finishes (`benchmarks.load.step_edge`): the step counter moves a whole
  batch at a time, so a window with arbitrary ends would be off by up to one batch at each end,
  3 % of a 4 s window on the bundled model. Re-run `make bench` for a second sample.
- **Where served loses to the limit.** (1) In one thread of one process, the server's own
  `BatchWorker.step` loop (batch assembly, the forward, the Eq. 12 update, bookkeeping) ran at
  1.007× a bare forward loop on the same model, alternating 2.5 s slices: the step itself costs
  nothing measurable. (2) HTTP costs about 2 %: in one bundled-model server process, HTTP load
  and the same closed loop submitted inside the process alternated at 0.98 (median of 6 cycles).
  At saturation its event loop used about 2 % of one core (some 1.8 ms of CPU per request, from
  /proc) and the load generator 0.3 %; on two cores each such millisecond stalls a forward whose
  two threads hold both of them. (3) The process itself: fresh processes that had timed both
  memory layouts before settling on one ran the kept one slower, some of them for their whole life
  (the layout-choice table above). Before the layout choice moved into a throwaway process, the server
  did exactly that at warm-up; it
  now times the layouts in a throwaway process and loads each model directly in the faster one
  (`app/startup/layout.py`). Directly loaded processes still differed: in float32 with
  channels_last on the bundled model, some servers and some engine processes ran 8-15 % slower
  than others in every slice of their life. The likely cause was glibc's thread arena, which unmapped and
  faulted in one of its heaps every step in some processes and not in others (see "Keep freed
  memory" below, and the top-pad study above); it may well be behind the layout-choice finding
  too, as timing two layouts leaves a different arena behind. Since the top pad, the five float32 rounds of the
  bundled model span 0.973-0.986 served / limit (0.853-1.030 in the run before it). Huge pages for
  torch's large buffers (`THP_MEM_ALLOC_ENABLE=1`), a lead of the run before, measured within noise
  of the default in fresh processes measured in turn, and stay off. Every round starts fresh
  processes, and the tables show medians.
- **Fresh processes.** The limit, the engine, the peer and the ladder each run in a spawned process
  of their own, in a thread that is not its main thread, as the server runs each model. Torch work
  from an earlier measurement leaves thread teams and heap state behind that a server process does
  not have; and under glibc's default malloc settings the same forward loop runs at different
  speeds in a process's main thread and in its other threads (the malloc table of each model).
- **Keep freed memory.** Under glibc's defaults every forward faulted its activations in again as
  fresh zeroed pages. `DDIM_KEEP_FREED_MEMORY=true` (the server's default) fixes malloc's mmap and
  trim thresholds and its top pad once at startup (`app/startup/memory.py`); the malloc table measures
  it against the defaults, side by side. The top pad is new in this run: without it, a worker
  thread's arena unmapped one of its 64 MiB heaps and faulted it in again every step, in some
  processes and slices and not in others (the top-pad study above: 14,000-18,000 page faults
  per forward at 0.92 of the speed), the likeliest cause of the servers that ran slow for their whole
  life in earlier runs. The limit runs with the same setting as the server it is compared with.
  The peer runs with glibc's defaults, as diffusers users run it, so served / peer includes this
  gain.
- **Fast paths.** bfloat16 is the big win on this AVX512-BF16 CPU. channels_last helped the CIFAR-size
  UNet in the ladder; on the bundled one-channel model the ladder ranks it below the contiguous layout,
  yet the fp32 rounds' servers chose it in 4 of 5 starts: the two layouts are within this machine's noise
  there, and the choice is the server's to time (`DDIM_CHANNELS_LAST=auto`: once per model and machine, in
  a throwaway process, then kept in `DDIM_LAYOUT_CACHE`). `torch.compile` adds a little on top of bfloat16
  but costs compile time per batch bucket at startup (28 s for the bundled model's batch of 64 with a cold cache; the
  ladder's figure is with inductor's on-disk cache warm from earlier runs), so it stays off by
  default (`DDIM_COMPILE=true` turns it on, within `DDIM_COMPILE_BUDGET_SECONDS`). One torch thread
  per core is torch's default and the fastest. The ladder's first row is measured first and can
  absorb warm-up; rows within about 10 % of each other are equal within this machine's noise
  (no_grad and inference_mode run the same kernels).
- **The layout choice at startup, measured outside `make bench`.** How long timing the two layouts takes
  depends on the model, the dtype and how busy the machine is: about 3 s for the bundled model on an
  idle machine and 39 s under load, as reported; on a second 2-core machine (AMD EPYC without
  AVX512-BF16, torch 2.13.0, one core busy with a training job throughout) 44 s in float32 and 386 s in
  bfloat16, which that CPU emulates (a contiguous bfloat16 forward at batch 64 took 47.8 s there,
  channels_last 8.2 s). That machine chose channels_last for the bundled model in float32, in two
  timings of 2398 against 2784 ms and 2210 against 2221 ms per forward at batch 64: near a tie, where
  timing at every start could pick either layout, and so give other numbers from one start to the next
  (the batch-and-layout table above). The server now times once per model and machine and keeps the
  choice (`DDIM_LAYOUT_CACHE`), and leaves contiguous only when channels_last takes at most 0.9 of its
  time in each of 5 alternating rounds of a quiet timing (`app/startup/layout.py`). With that machine's
  busy core both timings above would be provisional, keep contiguous and be timed again at the next
  start; the second, a tie, would keep contiguous on a quiet machine too.
- **`make test` on a fresh clone, measured outside `make bench`.** On the second machine above (one core
  busy with a training job), with Debian's data sets hidden and pip's downloads served from a local wheel
  cache: 630 s in all, of which the tests took 536 s (211 passed, the 3 that read Fashion-MNIST skipped)
  and the clone and install the rest. Downloading torch over a network adds its own time to the first run.
- **p50 "nan"** in a scaling row: no request both started and finished inside the window (at
  saturation a request's latency is longer than the window); the throughput is still exact.
- **Mixed workload.** On a CPU a forward's cost grows almost linearly with the batch, so a short
  request that shares every forward with long ones is slowed by their number. Short-first stepping
  (the default) steps far shorter jobs alone while the long ones wait a few forwards; FIFO stepping
  and request-level batching are shown for contrast.
"""

CUDA_NOTE = """## The CUDA path (written, untested here)

No GPU runs on the machine these numbers come from, so the CUDA path is written and reasoned
through but **untested**: the device is picked at startup (cuda, then mps, then cpu); `DDIM_DTYPE=auto`
picks bfloat16 where `torch.cuda.is_bf16_supported()`; step noise is drawn on the CPU (the seed
contract names CPU generators) into pinned host memory and copied with `non_blocking=True`, as are
new samples' x_T when they join; the batch
state (x, per-sample paths, eta, coefficients) lives on the device, so a step gathers its
coefficients there; a step synchronises with the host only to time the forward (for the metrics),
to test which rows finished and, under short-first, which rows to step; `DDIM_COMPILE=true` compiles one graph per batch
bucket with `mode="reduce-overhead"`, which records a CUDA graph per bucket (batches are padded up
to the next bucket). Finished samples are copied back once, when they leave the batch. With
`DDIM_CHANNELS_LAST=auto` the layouts are timed in a spawned process, which holds a CUDA context
of its own (some hundreds of MiB of device memory) until it exits, before the server loads its models.
A pipeline's denoiser and VAE decoder run as traced graphs (`DDIM_TRACE`, app/models/trace.py), on CUDA as on
the CPU: each trace is checked against the eager call within its dtype's precision (16-bit kernels may round
differently), and a size that does not pass, or cannot be traced, runs eagerly with a warning.
"""

EXPLAIN = """Throughput is in image-steps/s (one image advanced by one denoising step). Every ratio is of two
numbers measured in this same run. **limit**: a bare loop of the eps-network forward at batch B,
with the server's dtype and memory layout. **served**: HTTP load on a real server at saturation:
2×B closed-loop clients, each request n = 1 and S as given; throughput is the server's own
`ddim_sample_steps_total` over the measurement window. **peer**: diffusers' `DDIMPipeline`, offline,
fp32, with the same UNet, S and batch, run once in every round while the server is stopped.
**fp32** is the server with `DDIM_DTYPE=float32` and its other defaults (the memory layout it
picks at startup);
**default** is what the server runs with no settings: `DDIM_DTYPE=auto` (bfloat16 on CPUs with
AVX512-BF16 or AMX and on CUDA, else float32) and `DDIM_CHANNELS_LAST=auto` (both layouts timed in a
throwaway process, the faster kept; each server here times them afresh, with a layout cache of its own)."""


def _ok(good: bool) -> str:
    return "yes" if good else "**no**"


def _target(r: dict[str, Any], good: bool) -> str:
    """The peer targets are the CIFAR-size model's; on the others the ratio is shown for information."""
    return f" ({_ok(good)})" if "cifar" in r["model"] else ""


def _summary(results: dict[str, Any]) -> list[str]:
    lines = ["## What the issue asks, as measured", "",
             "| model | served / limit (default) | served / limit (fp32) | served / peer (fp32) | "
             "served / peer (default) | mixed: busy p95 / alone p95 (short-first) |", "|---|---|---|---|---|---|"]
    for r in results["models"]:
        d, f = r["default"], r["fp32"]
        mixed = r["mixed"].get("step, short-first", {}).get("p95_over_alone", float("nan"))
        lines.append(f"| {r['model']} | {fmt(d['served_over_limit'], 3)} ({_ok(d['served_over_limit'] >= 0.95)}) | "
                     f"{fmt(f['served_over_limit'], 3)} ({_ok(f['served_over_limit'] >= 0.95)}) | "
                     f"{fmt(f['served_over_peer'], 2)}{_target(r, f['served_over_peer'] >= 1.0)} | "
                     f"{fmt(d['served_over_peer'], 2)}{_target(r, d['served_over_peer'] >= 1.5)} | "
                     f"{fmt(mixed, 2)} ({_ok(mixed <= 2.0)}) |")
    lines += ["", "Targets: served ≥ 0.95× limit; for the CIFAR-size model served ≥ 1.0× the peer at fp32 and",
              "≥ 1.5× with the default fast path; mixed-workload p95 ≤ 2× alone.", ""]
    return lines


def _quality(rows: list[dict[str, Any]], source: dict[str, Any] | None = None) -> list[str]:
    lines = ["## Does bfloat16 cost quality? (bundled model, FID-FMNIST)", "",
             *([f"These rows come from an earlier run (`--merge`) with arguments {source}.", ""] if source else []),
             "The same seeds sampled with η = 0 under fp32 and under bfloat16 + channels_last; FID-FMNIST",
             "against the 10,000 test images (see docs/quality.md for the metric). Noise is the bootstrap",
             "standard deviation of the fp32 FID (its samples resampled 50 times).", "",
             "| S | samples | FID fp32 | FID bf16 | difference | noise (sd) | same class | mean abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for q in rows:
        lines.append(f"| {q['steps']} | {q['n']} | {fmt(q['fid_fp32'], 2)} | {fmt(q['fid_fast'], 2)} | "
                     f"{q['fid_fast'] - q['fid_fp32']:+.2f} | {fmt(q['noise_sd'], 2)} | {q['same_class']:.1%} | "
                     f"{q['mean_abs_diff']:.4f} |")
    lines += ["", "Pixel differences are in the model's [-1, 1] range.", ""]
    return lines


def _allocator(r: dict[str, Any]) -> list[str]:
    """The raw forward under glibc's default malloc settings and with freed memory kept, by thread."""
    if "allocator" not in r:
        return []
    cols = ["default, thread", "default, main thread", "kept, thread", "kept, main thread", "kept, no top pad, thread"]
    cols = [c for c in cols if c in next(iter(r["allocator"].values()))]  # results from before the top pad: 4
    faults = "faults_per_forward" in next(iter(r["allocator"].values()))["kept, thread"]

    def cell(v: dict[str, Any]) -> str:
        return fmt(v["image_steps_per_s"]) + (f" ({fmt(v['faults_per_forward'])})" if faults else "")

    lines = ["### Malloc settings, side by side (raw forward, contiguous layout)", "",
             f"| dtype | {' | '.join(cols)} | kept / default (thread) |", "|---" * (len(cols) + 2) + "|"]
    for dtype, v in r["allocator"].items():
        rate = {c: v[c]["image_steps_per_s"] for c in cols}
        lines.append(f"| {dtype} | {' | '.join(cell(v[c]) for c in cols)} | "
                     f"{fmt(rate['kept, thread'] / rate['default, thread'], 2)} |")
    return [*lines, "", f"{len(cols)} processes measured in turn, the median of each"
            + (" (in brackets: minor page faults per forward)" if faults else "") + "; \"thread\": the loop runs",
            "in a thread other than the process's main thread, as the server's forwards do. \"kept, no top pad\":",
            "DDIM_KEEP_FREED_MEMORY as it was before it set the top pad (app/startup/memory.py says why)"
            + ("." if "top_pad" in next(iter(r["allocator"].values())).get("kept, no top pad, thread", {"top_pad": 0})
               else "; in this run with a top pad of 0 instead of glibc's 128 KiB."), ""]


def _rounds(r: dict[str, Any]) -> list[str]:
    """Each round's own rates and ratios (a fresh server, limit and engine process per round)."""
    if "rounds" not in r["default"]:  # results from before paired rounds
        return []
    lines = ["| config | round | channels_last | limit | engine | served | peer | served / limit | engine / limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cfg in ("fp32", "default"):
        for i, x in enumerate(r[cfg]["rounds"], 1):
            lines.append(f"| {cfg} | {i} | {x['channels_last']} | {fmt(x['limit'])} | {fmt(x['engine'])} | "
                         f"{fmt(x['served'])} | {fmt(x['peer'])} | {fmt(x['served_over_limit'], 3)} | "
                         f"{fmt(x['engine_over_limit'], 3)} |")
    return [*lines, ""]


def _model(r: dict[str, Any]) -> list[str]:
    store = r.get("store", [r["model"]])
    lines = [f"## {r['model']} (B = {r['batch']}, S = {r['steps']})", "",
             f"Served from a store of {', '.join(store)} "
             f"({'every bundled model loaded, the others idle' if len(store) > 1 else 'this model alone'}).",
             "",
             f"### Fast paths, one at a time (raw forward at batch {r['batch']})", "",
             "| path | image-steps/s | × plain | compile s |", "|---|---|---|---|"]
    for p in r["fast_paths"]:
        lines.append(f"| {p['path']} | {fmt(p['image_steps_per_s'])} | {fmt(p['over_plain'], 2)} | "
                     f"{fmt(p['compile_seconds']) if 'compile_seconds' in p else ''} |")
    lines += ["", f"Peer (DDIMPipeline, fp32): {fmt(r['peer'])} image-steps/s, the median of "
              f"{len(r.get('peers', [])) or 'its'} runs; each config's rows use the runs of its own rounds.", "",
              *_allocator(r), "### Served against the limit and the peer", "",
              "| config | dtype | channels_last | DDIM_KEEP_FREED_MEMORY | limit | engine | engine / limit | served "
              "| served / limit | peer | served / peer | startup s | RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in ("fp32", "default"):
        c = r[cfg]
        lines.append(f"| {cfg} | {c['dtype']} | {c['channels_last']} | {c.get('keep_freed_memory', False)} | "
                     f"{fmt(c['limit'])} | {fmt(c['engine'])} | "
                     f"{fmt(c['engine_over_limit'], 3)} | {fmt(c['served']['image_steps_per_s'])} | "
                     f"{fmt(c['served_over_limit'], 3)} | {fmt(c.get('peer', r['peer']))} | "
                     f"{fmt(c['served_over_peer'], 2)} | {fmt(c['startup_s'])} | {fmt(c['rss_mib'], 0)} |")
    lines += ["", "Rates and ratios: medians over the rounds (fresh processes each, paired slices: see the notes).",
              "engine: the same batching loop as the server (a BatchWorker serving from the thread that loaded it,",
              "2×B samples of n = 1 jobs) with no HTTP. Startup is the server's `ddim_startup_seconds`: loading,",
              "warm-up, the layout choice (and compiling, when on).", "", *_rounds(r),
              "### Mixed workload", "",
              "Latency (s) of S = 10, n = 1 requests, sent one after another, alone and then with a background",
              "of clients looping S = 250, n = 8 requests (default dtype).", "",
              "| mode | probes | alone p50 | alone p95 | busy p50 | busy p95 | busy p95 / alone p95 |",
              "|---|---|---|---|---|---|---|"]
    for mode, x in r["mixed"].items():
        lines.append(f"| {mode} | {x['probes']} | {fmt(x['alone_p50'], 3)} | {fmt(x['alone_p95'], 3)} | "
                     f"{fmt(x['busy_p50'], 3)} | {fmt(x['busy_p95'], 3)} | {fmt(x['p95_over_alone'], 2)} |")
    lines += ["", "### Scaling (default dtype, S = {}, n = 1 requests)".format(r["steps"]), "",
              "| max_batch_size (2× as many clients) | image-steps/s | p50 s |", "|---|---|---|"]
    for k, v in r["scaling"]["max_batch_size"].items():
        lines.append(f"| {k} | {fmt(v['image_steps_per_s'])} | {fmt(v['p50_s'], 2)} |")
    lines += ["", f"| concurrency (max_batch_size {r['batch']}) | image-steps/s | p50 s |", "|---|---|---|"]
    for k, v in r["scaling"]["concurrency"].items():
        lines.append(f"| {k} | {fmt(v['image_steps_per_s'])} | {fmt(v['p50_s'], 2)} |")
    return [*lines, ""]


def write_report(results: dict[str, Any], out: Path, studies: list[str] | None = None) -> None:
    """docs/benchmarks.md from make bench's results, with the studies' sections (benchmarks.studies)."""
    m = results["machine"]
    lines = ["# Benchmarks", "",
             f"Machine: {m['cpus']} CPU cores ({m.get('cpu', '?')}, AVX512-BF16/AMX: {m.get('bf16')}), "
             f"{m['platform']}, torch {m['torch']}, CUDA: {m['cuda']}.",
             f"Reproduce: `make bench` (`python -m benchmarks.run`, arguments {results['args']}).",
             *([f"The other models' rows (`--merge`) come from an earlier run with arguments "
                f"{results['merged_from']}."] if results.get("merged_from") else []), "",
             EXPLAIN, "", *_summary(results)]
    if results.get("quality"):
        lines += _quality(results["quality"], results.get("quality_from"))
    for r in results["models"]:
        lines += _model(r)
    lines += [*report_lines(FEATURES_JSON), *solver_lines(SOLVERS_JSON), *ray_lines(), *(studies or []), NOTES,
              CUDA_NOTE]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


if __name__ == "__main__":  # python -m benchmarks.report results.json docs/benchmarks.md: rewrite from the JSON
    import sys

    from benchmarks.studies import study_sections

    write_report(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), study_sections())
