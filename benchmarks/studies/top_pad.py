"""Why DDIM_KEEP_FREED_MEMORY sets glibc's top pad (app/startup/memory.py).

Fresh processes run the raw forward loop of the bundled model in a thread other than their main
thread, as the server's worker does, with the server's layout choice. Half of them keep freed
memory as the server does ("kept"); the other half as it did before it set the top pad ("kept, no
top pad"). In each group the processes are measured in turn, a few slices each, so that only one
computes at a time, after a slice each to warm up. Each slice records the rate and the minor page
faults per forward; a slice "faults" above 1,000 per forward (a warmed loop has next to none).

    python -m benchmarks.studies.top_pad [--groups 4] [--per-group 4] [--slices 5] [--seconds 2]

It writes benchmarks/studies/top_pad.json, which `python -m benchmarks.report` renders.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from app.startup.layout import faster_layouts
from benchmarks.isolated import Resident, in_turn, malloc_loop
from benchmarks.studies import save_study

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("kept", "kept, no top pad")
FAULTING = 1000  # page faults per forward


def group(folder: Path, batch: int, dtype: str, chosen: bool, size: int, slices: int,
          seconds: float, first: int) -> list[dict[str, Any]]:
    """size fresh processes, alternating kinds (starting with KINDS[first]), measured in turn."""
    kinds = [KINDS[(i + first) % 2] for i in range(size)]
    procs = [Resident(malloc_loop, folder, batch, dtype, kind, chosen) for kind in kinds]
    for p in procs:  # a slice each to warm up (the arena grows to the loop's working set), not recorded
        p(seconds)
    return [{"kind": kind, "rates": [x[0] for x in xs], "faults_per_forward": [x[1] for x in xs]}
            for kind, xs in zip(kinds, in_turn(procs, slices, seconds))]


def summary(groups: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per kind: each process's mean rate over the mean of its group's "kept" processes; faulting slices,
    and the mean rate of the slices that fault and of those that do not."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        rel, slow, fast, n = [], [], [], 0
        for g in groups:
            base = statistics.mean(statistics.mean(p["rates"]) for p in g if p["kind"] == "kept")
            for p in (p for p in g if p["kind"] == kind):
                rel.append(statistics.mean(p["rates"]) / base)
                for r, f in zip(p["rates"], p["faults_per_forward"]):
                    (slow if f > FAULTING else fast).append(r / base)
                    n += 1
        out[kind] = {"processes": len(rel), "mean": statistics.mean(rel), "min": min(rel), "max": max(rel),
                     "slices": n, "faulting_slices": len(slow),
                     "faulting_rate": statistics.mean(slow) if slow else None,
                     "other_rate": statistics.mean(fast) if fast else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=4, help="fresh processes per group, half of each kind")
    p.add_argument("--slices", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default=str(ROOT / "model_store" / "fashion-mnist"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "studies" / "top_pad.json"))
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    folder = Path(a.model)
    chosen = faster_layouts([folder], device=torch.device("cpu"), dtype=a.dtype, batch=a.batch)[0]
    groups = []
    for k in range(a.groups):
        groups.append(group(folder, a.batch, a.dtype, chosen, a.per_group, a.slices, a.seconds, k % 2))
        print(f"group {k + 1}: " + "; ".join(
            f"{p['kind']} {statistics.mean(p['rates']):.0f} ({max(p['faults_per_forward']):.0f} faults/forward at "
            "most)" for p in groups[-1]), flush=True)
    out = save_study(vars(a), ROOT, model=folder.name, channels_last=chosen, groups=groups, summary=summary(groups))
    for kind, s in out["summary"].items():
        print(f"{kind}: {s['processes']} processes, mean {s['mean']:.3f} of kept, range {s['min']:.2f}-"
              f"{s['max']:.2f}; {s['faulting_slices']} of {s['slices']} slices faulting")


if __name__ == "__main__":
    main()
