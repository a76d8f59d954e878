"""`make soak`: this machine's capacity, then an open-loop offer of twice that for minutes, to loopback only.

1. capacity: closed-loop clients on the bundled model (n = 1, S = 20) saturate the server; its rate in requests/s.
2. 1x: requests arrive at that rate (open loop) for --base-seconds: the p99 to compare against.
3. 2x: requests arrive at twice that rate for --seconds (default 300); every arrival is sent, whatever the server
   answers, with at most --max-in-flight open at once (past that an arrival counts as shed by the client).

Recorded: status counts, connection errors, p50/p99 latency of admitted (200) requests, the server's RSS every
second. Writes docs/reliability.md's soak table (benchmarks/soak.json) and docs/img/soak.png (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import closed_loop
from harness.server import server_process

ROOT = Path(__file__).resolve().parents[1]
BODY = {"n": 1, "steps": 20}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def open_loop(url: str, rate: float, seconds: float, max_in_flight: int, pid: int) -> dict[str, Any]:
    """Arrivals at `rate` per second for `seconds` (bounded: rate x seconds requests at most)."""
    statuses: collections.Counter[str] = collections.Counter()
    admitted: list[tuple[float, float]] = []  # (arrival offset, latency) of 200s
    rss: list[tuple[float, float]] = []
    sem = asyncio.Semaphore(max_in_flight)
    start = time.monotonic()

    async def one(client: httpx.AsyncClient, k: int) -> None:
        t0 = time.monotonic()
        try:
            r = await client.post("/generate", json={**BODY, "seed": k}, headers={"accept": "application/x-npy"})
            statuses[str(r.status_code)] += 1
            if r.status_code == 200:
                admitted.append((t0 - start, time.monotonic() - t0))
        except httpx.HTTPError as e:
            statuses[f"connection error ({type(e).__name__})"] += 1
        finally:
            sem.release()

    async def sample_rss() -> None:
        while True:
            rss.append((time.monotonic() - start, rss_mib(pid)))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        sampler = asyncio.create_task(sample_rss())
        tasks, total = [], int(rate * seconds)
        for k in range(total):
            await asyncio.sleep(max(0.0, start + k / rate - time.monotonic()))
            if sem.locked():
                statuses["shed by the client (too many in flight)"] += 1
                continue
            await sem.acquire()
            tasks.append(asyncio.create_task(one(client, k)))
        await asyncio.gather(*tasks)
        sampler.cancel()
    lat = sorted(latency for _, latency in admitted)
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))  # noqa: E731
    return {"rate": rate, "seconds": seconds, "offered": int(rate * seconds), "statuses": dict(statuses),
            "p50_s": q(0.5), "p99_s": q(0.99), "admitted": admitted, "rss": rss}


def plot(base: dict[str, Any], soak: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t, lat = zip(*soak["admitted"]) if soak["admitted"] else ((), ())
    a.plot(t, lat, ".", markersize=2, alpha=0.5, label="admitted requests at 2x")
    a.axhline(base["p99_s"], color="k", linestyle="--", label="p99 at 1x")
    a.axhline(3 * base["p99_s"], color="r", linestyle=":", label="3 x p99 at 1x (target)")
    a.set_ylabel("latency (s)")
    a.legend(loc="upper right", fontsize=8)
    rt, rv = zip(*soak["rss"])
    b.plot(rt, rv)
    b.set_ylabel("server RSS (MiB)")
    b.set_xlabel("seconds into the 2x soak")
    fig.suptitle("Overload soak: 2x capacity, open loop")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--seconds", type=float, default=300.0, help="length of the 2x phase")
    p.add_argument("--base-seconds", type=float, default=60.0, help="length of the 1x phase")
    p.add_argument("--capacity-seconds", type=float, default=20.0)
    p.add_argument("--max-in-flight", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--queue", type=int, default=64, help="DDIM_MAX_QUEUE of the soaked server (samples)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "soak.json")
    a = p.parse_args(argv)
    env = {"DDIM_MAX_BATCH_SIZE": str(a.batch), "DDIM_MAX_QUEUE": str(a.queue), "DDIM_THREADS": "0",
           "OMP_NUM_THREADS": "2", "DDIM_DEFAULT_MODEL": "fashion-mnist"}
    with server_process(ROOT / "model_store", plain=False, ready_timeout=600, **env) as (url, proc):
        cap = closed_loop(url, BODY, 2 * a.batch, a.capacity_seconds, warmup=3.0)
        capacity = cap.image_steps_per_s / (BODY["n"] * BODY["steps"])
        print(f"capacity: {capacity:.1f} requests/s", flush=True)
        base = asyncio.run(open_loop(url, capacity, a.base_seconds, a.max_in_flight, proc.pid))
        print(f"1x: {base['statuses']} p50 {base['p50_s']:.3f} s p99 {base['p99_s']:.3f} s", flush=True)
        soak = asyncio.run(open_loop(url, 2 * capacity, a.seconds, a.max_in_flight, proc.pid))
        print(f"2x: {soak['statuses']} p50 {soak['p50_s']:.3f} s p99 {soak['p99_s']:.3f} s", flush=True)
    warm = [v for t, v in soak["rss"] if t >= min(30.0, a.seconds / 4)]
    out = {"args": vars(a) | {"out": str(a.out)}, "body": BODY, "capacity_rps": capacity,
           "base": {k: v for k, v in base.items() if k not in ("admitted", "rss")},
           "soak": {k: v for k, v in soak.items() if k not in ("admitted", "rss")},
           "p99_ratio": soak["p99_s"] / base["p99_s"],
           "rss_after_warmup_mib": [min(warm), max(warm)] if warm else None,
           "rss_drift": (warm[-1] - warm[0]) / warm[0] if warm else None,
           "rss_median_mib": statistics.median(v for _, v in soak["rss"])}
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(base, soak, ROOT / "docs" / "img" / "soak.png")
    write_section(ROOT / "docs" / "reliability.md", soak_section(out))
    print(json.dumps({k: out[k] for k in ("capacity_rps", "p99_ratio", "rss_drift")}), flush=True)
    return out



def soak_section(r: dict[str, Any]) -> str:
    """docs/reliability.md's soak table, from soak.json."""
    a, b, s = r["args"], r["base"], r["soak"]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))
    drift = r["rss_drift"]
    return "\n".join([
        f"Bundled model, n = {r['body']['n']}, S = {r['body']['steps']}; server with DDIM_MAX_BATCH_SIZE={a['batch']} "
        f"and DDIM_MAX_QUEUE={a['queue']} (the admission bound: a few batches, so that overload is answered with "
        "429 rather than a long queue). Reproduce: `make soak` "
        f"(`python -m benchmarks.soak --seconds {a['seconds']:g}`).", "",
        "| phase | offered | statuses | p50 admitted | p99 admitted |", "|---|---|---|---|---|",
        f"| capacity (closed loop) | {r['capacity_rps']:.2f} requests/s | | | |",
        f"| 1x, {b['seconds']:g} s | {b['offered']} | {', '.join(f'{k}: {v}' for k, v in b['statuses'].items())} "
        f"| {b['p50_s']:.2f} s | {b['p99_s']:.2f} s |",
        f"| 2x, {s['seconds']:g} s | {s['offered']} | {statuses} | {s['p50_s']:.2f} s | {s['p99_s']:.2f} s |", "",
        "| target | measured |", "|---|---|",
        f"| only 200 and 429, 0 connection errors | {'yes' if set(s['statuses']) <= {'200', '429'} else 'NO'} |",
        f"| p99 at 2x <= 3 x p99 at 1x | {r['p99_ratio']:.2f} x |",
        f"| RSS drift after warm-up < 10 % | {100 * drift:+.1f} % ({r['rss_after_warmup_mib'][0]:.0f}-"
        f"{r['rss_after_warmup_mib'][1]:.0f} MiB) |" if drift is not None else "| RSS drift | not measured |",
        "", "![latency of admitted requests and RSS over the soak](img/soak.png)"])


def write_section(doc: Path, text: str) -> None:
    body = doc.read_text()
    start, end = body.index("<!-- soak -->") + len("<!-- soak -->"), body.index("<!-- /soak -->")
    doc.write_text(body[:start] + "\n" + text + "\n" + body[end:])


if __name__ == "__main__":
    main()
