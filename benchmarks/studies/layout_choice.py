"""Why the server times memory layouts in a throwaway process (app/startup/layout.py).

Fresh processes run the same raw forward loop on the bundled model with the server's defaults.
Half of them first time both layouts themselves, as the server did before ("in-process"); the
other half load the layout chosen in a throwaway process directly, as the server does now
("throwaway"). Both kinds then loop in that same layout. In each group the processes are measured
in turn, a few slices each, so that only one computes at a time; each process's median is taken
relative to the mean of its group's throwaway processes.

    python -m benchmarks.studies.layout_choice [--groups 4] [--per-group 10] [--seconds 2]

It writes benchmarks/studies/layout_choice.json, which `python -m benchmarks.report` renders.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.models import load_model
from app.startup.layout import faster_layouts
from app.startup.memory import keep_freed_memory
from benchmarks.isolated import Resident, forward_loop, in_turn, warmed_loop
from benchmarks.studies import save_study

ROOT = Path(__file__).resolve().parents[2]


def in_process(folder: Path, batch: int, dtype: str, channels_last: bool) -> Callable[[float], float]:
    """Setup for Resident: the server's old warm-up (both layouts timed here), then the forward loop in the
    given layout (the throwaway's choice, so that both kinds run the same kernels)."""
    keep_freed_memory()
    m = load_model(folder, dtype=dtype)
    m.forward.time_layouts(batch, m.sample_shape)
    m.forward.use_channels_last(channels_last)
    return warmed_loop(m, batch)


def group(folder: Path, batch: int, dtype: str, chosen: bool, size: int, slices: int,
          seconds: float) -> list[dict[str, Any]]:
    """size fresh processes, alternating kinds, each measured slices times in turn; their rates."""
    kinds = ["in-process" if i % 2 == 0 else "throwaway" for i in range(size)]
    procs = [Resident(in_process, folder, batch, dtype, chosen) if kind == "in-process"
             else Resident(forward_loop, folder, batch, dtype, chosen, True) for kind in kinds]
    return [{"kind": kind, "rates": rs, "median": statistics.median(rs)}
            for kind, rs in zip(kinds, in_turn(procs, slices, seconds))]


def summary(groups: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per kind: each process's median over its group's throwaway mean; their mean, min, max, count < 0.9."""
    rel: dict[str, list[float]] = {"in-process": [], "throwaway": []}
    for g in groups:
        base = statistics.mean(p["median"] for p in g if p["kind"] == "throwaway")
        for p in g:
            rel[p["kind"]].append(p["median"] / base)
    return {k: {"processes": len(v), "mean": statistics.mean(v), "min": min(v), "max": max(v),
                "below_0.9": sum(r < 0.9 for r in v), "relative": sorted(v)} for k, v in rel.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=10, help="fresh processes per group, half of each kind")
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default=str(ROOT / "model_store" / "fashion-mnist"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "studies" / "layout_choice.json"))
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    folder, dtype = Path(a.model), "auto"
    chosen = faster_layouts([folder], device=torch.device("cpu"), dtype=dtype, batch=a.batch)[0]
    groups = []
    for k in range(a.groups):
        groups.append(group(folder, a.batch, dtype, chosen, a.per_group, a.slices, a.seconds))
        print(f"group {k + 1}: " + ", ".join(f"{p['kind']} {p['median']:.0f}" for p in groups[-1]), flush=True)
    out = save_study(vars(a), ROOT, model=folder.name, batch=a.batch, channels_last=chosen, groups=groups,
                     summary=summary(groups))
    for kind, s in out["summary"].items():
        print(f"{kind}: {s['processes']} processes, mean {s['mean']:.3f} of throwaway, "
              f"range {s['min']:.2f}-{s['max']:.2f}, {s['below_0.9']} below 0.9")


if __name__ == "__main__":
    main()
