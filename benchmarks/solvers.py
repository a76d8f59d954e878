"""`python -m benchmarks.solvers` (part of `make bench`): what the multistep samplers cost (issue 28).

- per step, in process, on the bundled fashion-mnist at batch 64: the network forward; the DDIM update of 64 rows;
  the multistep update (DPM-Solver++ order 2) of 64 rows, coefficients, gathers and scatters of the batch's columns
  included; and the update of a batch mixing both half and half. Medians of many repetitions, interleaved.
- served: img·steps/s of n = 1 requests, all ddim, against half ddim and half dpmsolver++ at the same concurrency,
  in alternating slices on one server of the bundled store (ratios: medians of slice pairs).

Writes benchmarks/solvers.json; benchmarks/report.py renders it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.engine.batch import ActiveBatch, Row
from app.engine.jobs import SampleJob
from app.models import load_model
from app.sampling import draw, sample_generators, take_step
from benchmarks.load import Background, steps_at
from benchmarks.serving import serve

ROOT = Path(__file__).resolve().parents[1]
SOLVERS_JSON = ROOT / "benchmarks" / "solvers.json"


def _batch(model: Any, batch: int, solver_share: float, steps: int = 20) -> ActiveBatch:
    b = ActiveBatch(model.device)
    rows = []
    for i in range(batch):
        x = draw(sample_generators(i, 1), model.sample_shape)
        if i < solver_share * batch:
            solver, plan = model.solver_plan("dpmsolver++", steps, model.schedule_for("dpmsolver++"), 2)
            job = SampleJob("generate", x, plan, solver=solver)
        else:
            job = SampleJob("generate", x, model.plan(steps, model.spacings[0], "generate"))
        job.cond = model.label_cond(None, 1)  # what the worker's admission stage sets (unconditional)
        rows.append(Row(job, 0))
    b.add(rows)
    return b


def _update(model: Any, b: ActiveBatch, out: torch.Tensor) -> None:
    """The worker's update of every row (worker.step without the forward)."""
    x, _, clip = b.inputs()
    out = out.reshape(x.shape)  # the batch keeps each row flattened
    stepped = take_step(x, out, b.coefficients(), prediction_type=model.prediction_type, clip_denoised=clip)
    if bool(b.multistep.any()):
        sub = b.multistep.nonzero().squeeze(1)
        b.multistep_step(sub, x.index_select(0, sub), out.index_select(0, sub))
    assert stepped.prev_sample is not None


def in_process(batch: int, reps: int) -> dict[str, Any]:
    model = load_model(ROOT / "model_store" / "fashion-mnist")
    batches = {"ddim": _batch(model, batch, 0.0), "dpmsolver++": _batch(model, batch, 1.0),
               "mixed": _batch(model, batch, 0.5)}
    x, t = batches["ddim"].inputs()[:2]
    x = x.reshape(-1, *model.sample_shape)
    out = model.eps(x, t)
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in batches}}
    for _ in range(reps):
        started = time.perf_counter()
        model.eps(x, t)
        times["forward"].append(time.perf_counter() - started)
        for name, b in batches.items():
            started = time.perf_counter()
            _update(model, b, out)
            times[name].append(time.perf_counter() - started)
            b.pos.zero_()  # the same step again: the columns stay in range
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "reps": reps, "dtype": str(model.dtype), "ms": {k: 1000 * v for k, v in med.items()},
            "solver_over_forward": med["dpmsolver++"] / med["forward"],
            "solver_extra_over_forward": (med["dpmsolver++"] - med["ddim"]) / med["forward"],
            "mixed_over_solver": med["mixed"] / med["dpmsolver++"]}


def _rate(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float, warmup: float) -> float:
    share = max(1, concurrency // len(bodies))
    loads = [Background(url, body, share) for body in bodies]
    for load in loads:
        load.__enter__()
    try:
        time.sleep(warmup)
        s0, t0 = steps_at(url), time.monotonic()
        time.sleep(seconds)
        return (steps_at(url) - s0) / (time.monotonic() - t0)
    finally:
        for load in loads:
            load.stop()
        for load in loads:
            load.__exit__(None, None, None)


def served(batch: int, slices: int, seconds: float) -> dict[str, Any]:
    store = Path(__import__("tempfile").mkdtemp()) / "store"
    store.mkdir()
    for folder in sorted((ROOT / "model_store").iterdir()):
        if folder.is_dir():
            (store / folder.name).symlink_to(folder.resolve())
    ddim = {"n": 1, "steps": 20}
    solver = {**ddim, "sampler": "dpmsolver++"}
    rates: dict[str, list[float]] = {"ddim": [], "mixed": []}
    with serve(store, batch) as url:
        for _ in range(slices):
            rates["ddim"].append(_rate(url, [ddim, ddim], 2 * batch, seconds, 2.0))
            rates["mixed"].append(_rate(url, [ddim, solver], 2 * batch, seconds, 2.0))
    return {"body": ddim, "concurrency": 2 * batch, "rates": rates,
            **{k: statistics.median(v) for k, v in rates.items()},
            "ratio": statistics.median(m / d for d, m in zip(rates["ddim"], rates["mixed"]))}


def report_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    p, s = r["in_process"], r["served"]
    return ["", "## Multistep samplers (`python -m benchmarks.solvers`)", "",
            f"In process, fashion-mnist at batch {p['batch']} ({p['dtype']}), medians of {p['reps']} interleaved "
            "repetitions, per step:", "",
            "| work | ms |", "|---|---|",
            *[f"| {k} | {v:.3f} |" for k, v in p["ms"].items()], "",
            "| measure | value | target |", "|---|---|---|",
            f"| the multistep update (all rows dpmsolver++) / one forward | **{p['solver_over_forward']:.4f}** "
            "| <= 0.02 |",
            f"| its cost beyond the DDIM update / one forward | {p['solver_extra_over_forward']:.4f} | |",
            f"| update of a half-and-half batch / all dpmsolver++ | {p['mixed_over_solver']:.3f} | about 1 |",
            f"| served img·steps/s, half ddim + half dpmsolver++ / all ddim (n = 1, S = 20) | **{s['ratio']:.3f}** "
            f"({s['mixed']:.0f} / {s['ddim']:.0f}) | >= 0.95 |", ""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.solvers", description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", default=str(SOLVERS_JSON))
    a = p.parse_args(argv)
    out = {"in_process": in_process(a.batch, a.reps)}
    print(f"in process: {out['in_process']}", flush=True)
    out["served"] = served(a.batch, a.slices, a.seconds)
    print(f"served: {out['served']}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
