"""Served throughput against the limit, the engine and the peer, in paired slices.

This machine's speed drifts by 5-10 % over tens of seconds, and one process running a forward loop
can run it up to 10 % slower than another for its whole life. So each round starts fresh processes
(a server, a limit loop and an engine without HTTP), keeps the server at saturation with HTTP
clients, and alternates short slices in which only one of them computes: a served window; the
limit, with the server stopped (SIGSTOP); the engine, with the server stopped. The peer runs once
per round, with the server stopped. Each ratio pairs numbers taken seconds apart, and the medians
over rounds span several processes of each kind.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.fastpaths import engine_loop
from benchmarks.isolated import Resident, forward_loop
from benchmarks.load import Background, edge_window, steps_at

MIN_FORWARDS = 25  # forwards per served window at the least: the step counter moves a whole batch at a time


@contextmanager
def _signalled(pid: int, first: signal.Signals, last: signal.Signals) -> Iterator[None]:
    os.kill(pid, first)
    try:
        yield
    finally:
        os.kill(pid, last)


def stopped(pid: int) -> AbstractContextManager[None]:
    return _signalled(pid, signal.SIGSTOP, signal.SIGCONT)


def resumed(pid: int) -> AbstractContextManager[None]:
    return _signalled(pid, signal.SIGCONT, signal.SIGSTOP)


def served_window(url: str, seconds: float) -> float:
    """image-steps/s from the server's own step counter, after 0.5 s to settle, over whole forwards (the
    window opens and closes as a forward finishes; the counter is polled every 10 ms at the edges)."""
    with httpx.Client() as client:
        return edge_window(lambda: steps_at(url, client), seconds, 0.01)


def paired_round(url: str, server: int, store: Path, folder: Path, batch: int, facts: dict[str, Any],
                 keep_freed: bool, peer: Callable[[], float], steps: int, slices: int, warmup: float,
                 seconds: float) -> dict[str, Any]:
    """One round against the running server (process id `server`), with a fresh limit and engine."""
    dtype, channels_last = facts["dtype"], bool(facts["channels_last"])
    with Resident(forward_loop, folder, batch, dtype, channels_last, keep_freed) as limit, \
            Resident(engine_loop, store, batch, dtype, channels_last, keep_freed, steps) as engine:
        out = paired_slices(url, server, limit, engine, {"n": 1, "steps": steps}, batch, slices, warmup, seconds,
                            peer)
    out["served_over_peer"] = out["served"] / out["peer"]
    return out


def paired_slices(url: str, server: int, limit: Resident, engine: Resident, body: dict[str, Any], batch: int,
                  slices: int, warmup: float, seconds: float,
                  peer: Callable[[], float] | None = None) -> dict[str, Any]:
    """The server at saturation under 2 x batch closed-loop clients posting body, and slices in which one process
    computes at a time: the limit and the engine (kept stopped between its own windows) with the server stopped,
    then a served window; the peer once at the end, with the server stopped. Per-slice rates, their means (equal
    windows: the pooled rates) and the ratios to the limit."""
    out: dict[str, Any] = {"slices": []}
    with stopped(engine.proc.pid), Background(url, body, 2 * batch) as load:
        time.sleep(warmup)
        window = seconds
        for _ in range(slices):
            with stopped(server):
                lim = limit(seconds)
                window = max(window, MIN_FORWARDS * batch / lim)
                with resumed(engine.proc.pid):
                    eng = engine(window)
            out["slices"].append({"limit": lim, "engine": eng, "served": served_window(url, window)})
        if peer is not None:
            with stopped(server):
                out["peer"] = peer()
        out["answered"], out["errors"] = len(load.answered), load.errors
    for key in ("limit", "engine", "served"):  # equal windows: the mean is the pooled rate
        out[key] = statistics.mean(s[key] for s in out["slices"])
    out["served_over_limit"], out["engine_over_limit"] = out["served"] / out["limit"], out["engine"] / out["limit"]
    return out


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds, of the rates and of each round's own ratios."""
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    return {"limit": med("limit"), "engine": med("engine"), "peer": med("peer"),
            "served": {"image_steps_per_s": med("served"), "requests": sum(r["answered"] for r in rounds),
                       "errors": sum(r["errors"] for r in rounds)},
            "served_over_limit": med("served_over_limit"), "engine_over_limit": med("engine_over_limit"),
            "served_over_peer": med("served_over_peer"), "peers": [r["peer"] for r in rounds]}
