"""Measurements in a fresh process of their own, each in a thread that is not the process's main
thread, as the server runs each model.

A process that has run torch work before (this benchmark's own, say) carries thread pools and
allocator state that a server process does not, and on this machine the same forward loop runs
5–15 % faster in a fresh process's second thread than in its main thread. So each side of a ratio
(limit, peer, engine, ladder) runs where the server's forwards run: a spawned process, a thread.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch

from app.models import load_model
from app.models.memory import keep_freed_memory
from benchmarks.fastpaths import rate

T = TypeVar("T")
SPAWN = mp.get_context("spawn")


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread of a fresh spawned process (fn must be importable); its result or exception."""
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        return pool.submit(in_thread, fn, *args).result()


def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a new thread, waited for; its result or its exception."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as e:
            done.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return done.result()


def _forward_loop(conn: Connection, folder: Path, batch: int, dtype: str, channels_last: bool,
                  keep_freed: bool) -> None:
    if keep_freed:
        keep_freed_memory()
    m = load_model(folder, dtype=dtype, channels_last=channels_last)
    x, t = torch.randn(batch, *m.sample_shape), torch.randint(0, 1000, (batch,))
    m.eps(x, t)
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        conn.send(rate(m.eps, x, t, seconds))


class ForwardLoop:
    """The limit, kept loaded in its own process: rate(seconds) runs a bare forward loop at batch B
    there while the caller waits, so it can be measured again and again between served windows."""

    def __init__(self, folder: Path, batch: int, dtype: str, channels_last: bool, keep_freed: bool) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=in_thread, args=(_forward_loop, child, folder, batch, dtype, channels_last,
                                                        keep_freed),
                                  daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the forward-loop process did not start")

    def rate(self, seconds: float) -> float:
        self.conn.send(seconds)
        return float(self.conn.recv())

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()

    def __enter__(self) -> ForwardLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
