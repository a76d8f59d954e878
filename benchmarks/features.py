"""`python -m benchmarks.features` (part of `make bench`): what this round's features cost, side by side.

- guidance: img·steps/s of guided requests (w = 3) over unguided conditional ones on the same flow model,
  in alternating slices on one server (target >= 0.48: guidance doubles the rows, not the forwards);
- the flow model's served throughput over its raw forward limit, in paired slices (benchmarks/paired.py);
- previews: img·steps/s of event-streamed requests with preview_every=1 over preview_every=0;
- event latency: from a step's end (the progress event's `at`) to the client's receipt, p50 and p99.

Writes benchmarks/features.json; benchmarks/report.py renders it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.models.folder import random_model_folder
from app.train.ddpm import FLOW_SCHEDULER_CONFIG, UNET_CONFIG
from benchmarks.load import closed_loop, steps_at
from benchmarks.paired import paired_round, summary
from benchmarks.serving import serve, server_facts, server_pid

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "model_store" / "fashion-mnist-flow"
FEATURES_JSON = ROOT / "benchmarks" / "features.json"


def flow_folder() -> tuple[Path, str]:
    """The bundled flow model, or (before it is trained) a random one of its architecture."""
    if (FLOW / "model_index.json").exists():
        return FLOW, "bundled"
    folder = Path(tempfile.mkdtemp()) / "fashion-mnist-flow"
    random_model_folder(folder, {**UNET_CONFIG, "num_class_embeds": 11}, FLOW_SCHEDULER_CONFIG,
                        class_names=[str(i) for i in range(10)])
    return folder, "random weights (the bundled model was not there)"


def alternating(url: str, bodies: dict[str, dict[str, Any]], concurrency: int, slices: int, seconds: float,
                warmup: float) -> dict[str, Any]:
    """img·steps/s of each body in turn, slices times: medians, and the median of per-slice-pair ratios."""
    rates: dict[str, list[float]] = {k: [] for k in bodies}
    for _ in range(slices):
        for name, body in bodies.items():
            rates[name].append(closed_loop(url, body, concurrency, seconds, warmup).image_steps_per_s)
    first, second = list(bodies)
    return {"rates": rates, **{k: statistics.median(v) for k, v in rates.items()},
            "ratio": statistics.median(b / a for a, b in zip(rates[first], rates[second]))}


async def _streams(url: str, body: dict[str, Any], clients: int, seconds: float) -> tuple[float, list[float]]:
    """clients event-streaming /generate in a closed loop for seconds: (img·steps/s, event latencies in s)."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < stop:
            k += 1
            async with http.stream("POST", "/generate", json={**body, "seed": 1000 * i + k},
                                   headers={"accept": "text/event-stream"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"at"' in line:
                        latencies.append(time.time() - json.loads(line[5:])["at"])

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        s0, t0 = steps_at(url), time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        s1, t1 = steps_at(url), time.monotonic()
    return (s1 - s0) / (t1 - t0), latencies


def previews(url: str, clients: int, slices: int, seconds: float) -> dict[str, Any]:
    body = {"n": 4, "steps": 20}
    rates: dict[int, list[float]] = {0: [], 1: []}
    lat: list[float] = []
    for _ in range(slices):
        for every in (0, 1):
            rate, latencies = asyncio.run(_streams(url, {**body, "preview_every": every}, clients, seconds))
            rates[every].append(rate)
            lat += latencies if every == 0 else []
    lat.sort()
    return {"body": body, "clients": clients, "rate_without": statistics.median(rates[0]),
            "rate_with": statistics.median(rates[1]),
            "ratio": statistics.median(b / a for a, b in zip(rates[0], rates[1])),
            "event_latency_p50_ms": 1000 * lat[len(lat) // 2], "event_latency_p99_ms": 1000 * lat[int(0.99 * len(lat))],
            "events": len(lat)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.features", description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--slices", type=int, default=3, help="alternating slices per comparison")
    p.add_argument("--seconds", type=float, default=8.0, help="length of one slice")
    p.add_argument("--rounds", type=int, default=2, help="paired rounds of served against the limit")
    p.add_argument("--out", default=str(FEATURES_JSON))
    a = p.parse_args(argv)
    folder, origin = flow_folder()
    store = Path(tempfile.mkdtemp()) / "store"
    store.mkdir()
    (store / "fashion-mnist-flow").symlink_to(folder.resolve())
    out: dict[str, Any] = {"model": origin, "batch": a.batch}
    unguided = {"n": 1, "steps": 20, "class_label": 7}
    with serve(store, a.batch) as url:
        out["guidance"] = alternating(url, {"unguided": unguided, "guided": {**unguided, "guidance_scale": 3.0}},
                                      2 * a.batch, a.slices, a.seconds, 2.0)
        print(f"guidance: {out['guidance']}", flush=True)
        out["previews"] = previews(url, 8, a.slices, a.seconds)
        print(f"previews: {out['previews']}", flush=True)
    rounds = []
    for _ in range(a.rounds):
        with serve(store, a.batch) as url:
            facts = server_facts(url)
            rounds.append({**facts, **paired_round(url, server_pid(url), store, folder, a.batch, facts, True,
                                                   lambda: float("nan"), 20, 3, 3.0, 2.0)})
    out["flow_served"] = {k: v for k, v in summary(rounds).items() if "peer" not in k}
    print(f"flow served: {out['flow_served']}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()


def report_lines(path: Path) -> list[str]:
    """docs/benchmarks.md's section for features.json (none if it was not measured)."""
    if not path.exists():
        return []
    f = json.loads(path.read_text())
    g, pv, fs = f["guidance"], f["previews"], f["flow_served"]
    return ["", "## This round's features (`python -m benchmarks.features`)", "",
            f"Flow model: {f['model']}, batch {f['batch']}. Alternating slices on one server; ratios are medians "
            "of slice pairs.", "",
            "| measure | value | target |", "|---|---|---|",
            f"| guided (w = 3) / unguided img·steps/s | **{g['ratio']:.3f}** ({g['guided']:.0f} / {g['unguided']:.0f}) "
            "| >= 0.48 |",
            f"| flow model: served / raw forward limit | **{fs['served_over_limit']:.3f}** "
            f"({fs['served']['image_steps_per_s']:.0f} / {fs['limit']:.0f} img·steps/s) | >= 0.95 |",
            f"| flow model: engine without HTTP / limit | {fs['engine_over_limit']:.3f} | |",
            f"| event-streamed requests, preview_every=1 / 0 | **{pv['ratio']:.3f}** ({pv['rate_with']:.0f} / "
            f"{pv['rate_without']:.0f}; n = {pv['body']['n']}, S = {pv['body']['steps']}, {pv['clients']} clients) | |",
            f"| event latency, step end to client, p50 / p99 | {pv['event_latency_p50_ms']:.1f} / "
            f"{pv['event_latency_p99_ms']:.1f} ms ({pv['events']} events) | |", ""]
