"""SIGTERM on a real server: /readyz turns 503 (or the port closes), work in flight finishes within the drain,
what outlasts it gets a 503, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from harness.server import server_process
from tests.api.helpers import sse_events


def _post_in_thread(url: str, body: dict, out: dict) -> threading.Thread:
    def go() -> None:
        try:
            out["response"] = httpx.post(f"{url}/generate", json=body, timeout=120)
        except httpx.HTTPError as e:
            out["error"] = e
    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_running(client: httpx.Client, body: dict, samples: int) -> None:
    """Start a job and read its events until it has done a step, then wait until the engine holds samples in all
    (the synchronous request's too): the engine is busy with both from here on (bounded polls)."""
    job = client.post("/jobs/generate", json=body).json()
    with client.stream("GET", f"/jobs/{job['id']}/events") as r:
        for kind, data in sse_events(r):
            if kind != "progress" or data["step"] >= 1:
                break
    for _ in range(200):
        model = client.get("/models").json()["models"][0]
        if model["waiting"] + model["active"] >= samples:
            return
        time.sleep(0.05)
    raise AssertionError("the synchronous request never reached the engine")


def test_sigterm_finishes_work_in_flight_and_exits_0(tiny_store: Path) -> None:
    with server_process(tiny_store, DDIM_DRAIN_SECONDS="60") as (url, proc), httpx.Client(base_url=url) as c:
        out: dict = {}
        sync = _post_in_thread(url, {"n": 2, "steps": 400, "seed": 1}, out)
        _wait_running(c, {"steps": 300}, 3)
        proc.send_signal(signal.SIGTERM)
        try:  # a probe on an open connection sees 503; a new connection may be refused
            r = c.get("/readyz")
            assert r.status_code == 503 and r.headers["retry-after"]
            assert c.post("/generate", json={"steps": 2}).status_code == 503
        except httpx.TransportError:
            pass
        sync.join(120)
        assert out["response"].status_code == 200 and len(out["response"].json()["images"]) == 2
        assert proc.wait(60) == 0


def test_work_that_outlasts_the_drain_gets_503_and_the_process_exits_0(tiny_store: Path) -> None:
    with server_process(tiny_store, DDIM_DRAIN_SECONDS="0.5") as (url, proc), \
            httpx.Client(base_url=url) as c:
        out: dict = {}
        sync = _post_in_thread(url, {"n": 8, "steps": 1000, "seed": 1}, out)  # seconds: longer than the drain
        _wait_running(c, {"steps": 20}, 8)
        proc.send_signal(signal.SIGTERM)
        sync.join(60)
        r = out["response"]
        assert r.status_code == 503 and "shut down" in r.json()["detail"] and r.headers["retry-after"]
        assert proc.wait(60) == 0
