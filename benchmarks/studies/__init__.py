"""The studies behind some of the server's defaults, each a script of its own that writes a JSON file
next to make bench's results: why the layout is timed in a throwaway process (benchmarks.studies.layout_choice),
why DDIM_KEEP_FREED_MEMORY sets glibc's top pad (benchmarks.studies.top_pad), and how far outputs move with the
batch and the layout (benchmarks.studies.batch_composition). Rendered into
docs/benchmarks.md by benchmarks.report when their JSON files are there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.format import fmt, git_commit

HERE = Path(__file__).resolve().parent


def study_sections() -> list[str]:
    """The sections of the studies whose JSON files are here (benchmarks/studies/)."""
    lines: list[str] = []
    for name, render in STUDIES.items():
        if (path := HERE / f"{name}.json").exists():
            lines += render(json.loads(path.read_text()))
    return lines


def save_study(args: dict[str, Any], root: Path, **fields: Any) -> dict[str, Any]:
    """Write a study's JSON file (args["json"]): its arguments for the record, paths inside the repository
    relative to it, the commit it ran at (metadata, never prose), then fields. What was written."""
    out = {"args": {k: str(Path(v).resolve().relative_to(root)) if k in ("model", "json")
                    and Path(v).resolve().is_relative_to(root) else v for k, v in args.items()},
           "commit": git_commit(root), **fields}
    Path(args["json"]).write_text(json.dumps(out, indent=2))
    return out


def _layout_choice(c: dict[str, Any]) -> list[str]:
    a = c["args"]
    lines = ["## The layout choice: in the server's process, or in a throwaway one", "",
             f"`python -m benchmarks.studies.layout_choice` (arguments {a}). Fresh processes ran the raw forward "
             "loop of "
             f"{c['model']} at batch {c['batch']} (channels_last: {c['channels_last']}, the server's defaults "
             "otherwise), in groups of "
             f"{a['per_group']} measured in turn, {a['slices']} slices of {a['seconds']} s each. **in-process**: the "
             "process timed both layouts before its loop, as the server's warm-up did before the layout choice "
             "moved into a throwaway process. "
             "**throwaway**: it loaded the layout that a throwaway process chose, as the server does now. Each "
             "process's median rate is taken relative to the mean of its group's throwaway processes.", "",
             "| kind | processes | mean | min | max | below 0.9 |", "|---|---|---|---|---|---|"]
    for kind, x in c["summary"].items():
        lines.append(f"| {kind} | {x['processes']} | {fmt(x['mean'], 3)} | {fmt(x['min'], 2)} | {fmt(x['max'], 2)} | "
                     f"{x['below_0.9']} |")
    return [*lines, ""]


def _top_pad(c: dict[str, Any]) -> list[str]:
    a = c["args"]
    lines = ["## Keeping freed memory: with glibc's top pad, or without", "",
             f"`python -m benchmarks.studies.top_pad` (arguments {a}). Fresh processes ran the raw forward loop of "
             f"{c['model']} at batch {a['batch']} in {a['dtype']} (channels_last: {c['channels_last']}) in a thread "
             "other than their main thread, as the server's worker does, in groups of "
             f"{a['per_group']} measured in turn, {a['slices']} slices of {a['seconds']} s each. **kept**: "
             "DDIM_KEEP_FREED_MEMORY as the server sets it now. **kept, no top pad**: as it was before "
             "(app/startup/memory.py says why the pad matters). Rates are relative to the mean of the group's kept "
             "processes; a slice faults above 1,000 minor page faults per forward.", "",
             "| kind | processes | mean | min | max | faulting slices | rate of faulting slices | rate of the others |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, x in c["summary"].items():
        lines.append(f"| {kind} | {x['processes']} | {fmt(x['mean'], 3)} | {fmt(x['min'], 2)} | {fmt(x['max'], 2)} | "
                     f"{x['faulting_slices']} of {x['slices']} | {fmt(x['faulting_rate'], 2)} | "
                     f"{fmt(x['other_rate'], 2)} |")
    return [*lines, ""]


def _batch_composition(c: dict[str, Any]) -> list[str]:
    a = c["args"]
    lines = ["## How far outputs move with the batch and the layout", "",
             f"`python -m benchmarks.studies.batch_composition` (arguments {a}; {c['machine']}). {c['model']} "
             "samples seeds "
             f"0..{a['n'] - 1} with DDIM (η = 0, S = {a['steps']}) as one batch of {a['n']} in the contiguous layout, "
             "the reference; each row runs the same seeds another way and compares the images with the "
             "reference as 8-bit pixels (as the PNGs carry them) and as latents ([-1, 1] range).", "",
             "| dtype | the same seeds | max difference (levels of 255) | pixels that differ | max latent difference |",
             "|---|---|---|---|---|"]
    for r in c["rows"]:
        lines.append(f"| {r['dtype']} | {r['variant']} | {r['max_levels']} | {100 * r['pixels_differing']:.1f} % | "
                     f"{r['max_latent']:.1e} |")
    return [*lines, ""]


def _text_pipeline(c: dict[str, Any]) -> list[str]:
    a, r, n = c["args"], c["repeat"], c["cache"]
    lines = ["## A latent text pipeline: served against a plain loop with CFG", "",
             f"`python -m benchmarks.studies.text_pipeline` (arguments {a}; {c['machine']}). A tiny Stable Diffusion "
             f"pipeline (harness/pipelines.py, 32x32 pixels, 8x8 latents), {a['dtype']}: B = {a['batch']} guided "
             "samples (2B rows a forward). All three run the denoiser traced (DDIM_TRACE, the default). **plain**: "
             "the same denoiser forward with both CFG rows and the DDIM update in a loop, prompts encoded once outside "
             "it. **served**: 2B closed-loop clients (B running, B waiting) "
             "posting n = 1 requests with one prompt; the server's own image-step counter (VAE decode, PNG and HTTP "
             "included). **engine**: the server's Engine without HTTP, 2B jobs of n = 1 in flight (VAE decode "
             "included). Each round has a fresh server, plain process and engine process and alternates short slices "
             "in which only one of them computes (benchmarks/paired.py); the table shows medians over the rounds, of "
             "the rates and of each round's own ratios.", "",
             "| S | plain img·steps/s | engine | engine / plain | served | **served / plain** | rounds' served / "
             "plain | requests | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for x in c["runs"]:
        lines.append(f"| {x['steps']} | {fmt(x['plain'], 1)} | {fmt(x['engine'], 1)} | "
                     f"{fmt(x['engine_over_plain'], 3)} | {fmt(x['served'], 1)} | **{fmt(x['served_over_plain'], 3)}** "
                     f"| {', '.join(fmt(y['served_over_limit'], 3) for y in x['rounds'])} | {x['requests']} | "
                     f"{x['errors']} |")
    return [*lines, "",
            "Target (issue 26 §6): served >= 0.9x plain. S = 50 is the server's default; a request's own costs "
            "(HTTP, job set-up, the VAE decode of its image and the PNG) are spread over its S steps, so fewer steps "
            "pay more of them per image-step.", "",
            f"Prompt cache over the served runs: {int(n['hit'])} hits, {int(n['miss'])} misses (hit rate "
            f"{100 * c['hit_rate']:.1f} %). A new prompt: {int(r['new prompt']['encoder_calls'])} encoder call "
            f"({fmt(r['new prompt']['encode_ms'], 2)} ms); the same prompt again: "
            f"{int(r['same prompt again']['encoder_calls'])} calls ({fmt(r['same prompt again']['encode_ms'], 2)} ms). "
            f"Previews decode x0-hat with the VAE: one decode of B latents took {fmt(c['decode_ms'], 2)} ms against "
            f"{fmt(c['forward_ms'], 2)} ms for a guided denoiser forward of the batch (medians in one process).", "",
            *_tracing(c.get("tracing"))]


def _tracing(t: dict[str, float] | None) -> list[str]:
    if t is None:
        return []
    return ["Tracing (app/models/trace.py), one guided forward of the batch in a fresh process, in ms (medians):", "",
            "| denoiser | alone | beside a Python thread that spins |", "|---|---|---|",
            f"| traced (DDIM_TRACE=true, the default) | {fmt(t['traced_ms'], 2)} | "
            f"{fmt(t['traced_beside_spinner_ms'], 1)} |",
            f"| eager (DDIM_TRACE=false) | {fmt(t['eager_ms'], 2)} | {fmt(t['eager_beside_spinner_ms'], 1)} |", "",
            "An eager forward takes the GIL back after each of its hundreds of small ops, and waits whenever another "
            "Python thread holds it; a traced one runs in one call that releases it. The server's event loop and "
            "decode thread are such threads.", ""]


def _idle_model(c: dict[str, Any]) -> list[str]:
    a = c["args"]
    lines = ["## An idle model beside the busy one", "",
             f"`python -m benchmarks.studies.idle_model` (arguments {a}). fashion-mnist served n = 1, S = "
             f"{a['steps']} at {2 * a['batch']} concurrent clients, against its raw forward loop in paired slices, "
             "three fresh servers per round in alternating order. The threads' CPU is read from /proc under load.",
             "", "| store | served / limit (median) | rounds | busiest threads' CPU (cores) |", "|---|---|---|---|"]
    for name, rounds in c["rounds"].items():
        lines.append(f"| {name} | **{fmt(c['served_over_limit'][name], 3)}** | "
                     f"{', '.join(fmt(x['served_over_limit'], 3) for x in rounds)} | "
                     f"{'; '.join(' / '.join(f'{v:.2f}' for v in x['thread_cpu'][:2]) for x in rounds)} |")
    return [*lines, "", "Target (issue 24): served >= 0.95x the raw forward with the store as shipped.", ""]


STUDIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {"layout_choice": _layout_choice, "top_pad": _top_pad,
                                                             "batch_composition": _batch_composition,
                                                             "text_pipeline": _text_pipeline,
                                                             "idle_model": _idle_model}
