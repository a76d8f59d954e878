"""HTTP load against a running ddim-serve: closed-loop clients, latencies and throughput."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    image_steps: int = 0
    seconds: float = 0.0
    errors: int = 0

    @property
    def image_steps_per_s(self) -> float:
        return self.image_steps / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


async def closed_loop(url: str, body: dict[str, Any], concurrency: int, seconds: float,
                      warmup: float = 0.0) -> LoadResult:
    """concurrency clients, each posting body again as soon as its last answer came; counts only
    requests that both start after warmup and finish before the end of the window."""
    res = LoadResult()
    start = time.monotonic()
    window_start, window_end = start + warmup, start + warmup + seconds
    steps = int(body.get("steps", 50)) * int(body.get("n", 1))
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def worker(i: int) -> None:
            k = 0
            while time.monotonic() < window_end:
                t0 = time.monotonic()
                r = await client.post("/generate", json={**body, "seed": 1000 * i + k},
                                      headers={"accept": "application/x-npy"})
                t1 = time.monotonic()
                k += 1
                if r.status_code != 200:
                    res.errors += 1
                    continue
                if t0 >= window_start and t1 <= window_end:
                    res.latencies.append(t1 - t0)
                    res.image_steps += steps
                elif t1 > window_start and t1 <= window_end:
                    # a request straddling the window start: count the share of its steps inside it
                    res.image_steps += int(steps * (t1 - window_start) / (t1 - t0))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    res.seconds = seconds
    return res


async def latencies_with_background(url: str, probe: dict[str, Any], probes: int,
                                    background: dict[str, Any] | None, background_clients: int) -> LoadResult:
    """probes sequential probe requests, while background_clients loop background requests."""
    res = LoadResult()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def bg(i: int) -> None:
            k = 0
            while not stop.is_set():
                await client.post("/generate", json={**background, "seed": 5000 + 100 * i + k},  # type: ignore[dict-item]
                                  headers={"accept": "application/x-npy"})
                k += 1

        tasks = [asyncio.create_task(bg(i)) for i in range(background_clients if background else 0)]
        if tasks:
            await asyncio.sleep(2.0)  # let the background fill the batch
        for k in range(probes):
            t0 = time.monotonic()
            r = await client.post("/generate", json={**probe, "seed": k}, headers={"accept": "application/x-npy"})
            res.latencies.append(time.monotonic() - t0)
            res.errors += r.status_code != 200
            await asyncio.sleep(0.05)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return res
