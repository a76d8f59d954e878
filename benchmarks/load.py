"""HTTP load against a running ddim-serve: closed-loop clients, latencies and throughput."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable
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


def steps_at(url: str, client: httpx.Client | None = None) -> float:
    """The server's own count of sample-steps computed (ddim_sample_steps_total, all models)."""
    text = (client.get(f"{url}/metrics") if client else httpx.get(f"{url}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ddim_sample_steps_total{"))


def step_edge(read: Callable[[], float], poll: float, timeout: float = 120.0) -> tuple[float, float]:
    """Wait for a step counter to move, i.e. for a forward to finish: (its new value, the time then).

    A window that opens and closes on such edges holds whole forwards only. One with arbitrary ends
    counts a batch of B steps or none at each end, which at 35 forwards a window is up to 3 % either way.
    """
    first, deadline = read(), time.monotonic() + timeout
    while (value := read()) == first:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no step finished in {timeout} s")
        time.sleep(poll)
    return value, time.monotonic()


def edge_window(read: Callable[[], float], seconds: float, poll: float) -> float:
    """Steps per second of a step counter over about `seconds` of whole forwards, after 0.5 s to settle."""
    time.sleep(0.5)
    n0, t0 = step_edge(read, poll)
    time.sleep(seconds)
    n1, t1 = step_edge(read, poll)
    return (n1 - n0) / (t1 - t0)


async def idle(client: httpx.AsyncClient, timeout: float = 120.0) -> None:
    """Wait until no model has active or waiting samples (e.g. after cancelled clients)."""
    deadline = time.monotonic() + timeout
    while any(m["active"] or m["waiting"] for m in (await client.get("/models")).json()["models"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not drain")
        await asyncio.sleep(0.1)


async def drained(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await idle(client)


class Connection:
    """A minimal keep-alive HTTP/1.1 client for the load generator: on a 2-core machine the client shares
    the CPU with the server, and httpx costs several times more CPU per request than this."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any], accept: str = "application/x-npy") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: {accept}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = dict(h.split(":", 1) for h in head[1:] if ":" in h)
        length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Background:
    """concurrency closed-loop clients in a thread of their own, each posting body again as soon as its
    last answer came, until the block ends; they keep (start, end) of each answered request and count
    errors."""

    def __init__(self, url: str, body: dict[str, Any], concurrency: int) -> None:
        self.url, self.body, self.concurrency = url, body, concurrency
        self.answered: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._clients(),), daemon=True)

    async def _clients(self) -> None:
        async def client(i: int) -> None:
            conn, k = Connection(self.url), 0
            try:
                while not self._stop.is_set():
                    k, start = k + 1, time.monotonic()
                    try:
                        status, _ = await conn.post("/generate", {**self.body, "seed": 1000 * i + k})
                    except (OSError, asyncio.IncompleteReadError):  # e.g. an idle keep-alive connection closed
                        conn.close()
                        conn, status = Connection(self.url), 0
                    if status == 200:
                        self.answered.append((start, time.monotonic()))
                    else:
                        self.errors += 1
            finally:
                conn.close()

        tasks = [asyncio.create_task(client(i)) for i in range(self.concurrency)]
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Hang up the clients (without waiting for the server): stop every load first when several run at once,
        or the first to wait for an idle server waits on the others' traffic."""
        self._stop.set()
        self._thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        asyncio.run(drained(self.url))  # the server cancels the hung-up clients' jobs


def closed_loop(url: str, body: dict[str, Any], concurrency: int, seconds: float, warmup: float = 0.0) -> LoadResult:
    """concurrency clients, each posting body again as soon as its last answer came.

    Throughput is the server's sample-step counter over the window (after warmup), so requests
    that straddle the window's edges count exactly for the steps computed inside it. Latencies
    are those of requests that started and finished inside the window. At the end the clients
    hang up; the server cancels their jobs, and this waits until it is idle again.
    """
    with Background(url, body, concurrency) as load:
        time.sleep(warmup)
        steps0, t0 = steps_at(url), time.monotonic()
        time.sleep(seconds)
        steps1, t1 = steps_at(url), time.monotonic()
    return LoadResult(latencies=[end - start for start, end in load.answered if start >= t0 and end <= t1],
                      image_steps=int(steps1 - steps0), seconds=t1 - t0, errors=load.errors)


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
