"""Measurements in a fresh process of their own, each in a thread that is not the process's main
thread, as the server runs each model.

A process that has run torch work before (this benchmark's own, say) carries thread teams and heap
state that a server process does not, and with glibc's default malloc settings the same forward
loop runs at different speeds in a process's main thread and in its other threads (their heaps
give memory back to the OS differently; `allocator_effect` measures it). So each side of a ratio
(limit, peer, engine, ladder) runs where the server's forwards run: a spawned process, a thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import statistics
import threading
from collections.abc import Callable
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
    try:
        if keep_freed:
            keep_freed_memory()
        m = load_model(folder, dtype=dtype, channels_last=channels_last)
        x, t = torch.randn(batch, *m.sample_shape), torch.randint(0, 1000, (batch,))
        m.eps(x, t)
    except BaseException as e:
        conn.send(f"failed: {e!r}")
        raise
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        conn.send(rate(m.eps, x, t, seconds))


class ForwardLoop:
    """The limit, kept loaded in its own process: rate(seconds) runs a bare forward loop at batch B
    there while the caller waits, so it can be measured again and again between served windows.
    thread=False runs it in the process's main thread instead (for allocator_effect)."""

    def __init__(self, folder: Path, batch: int, dtype: str, channels_last: bool, keep_freed: bool,
                 thread: bool = True) -> None:
        self.conn, child = SPAWN.Pipe()
        args = (child, folder, batch, dtype, channels_last, keep_freed)
        self.proc = SPAWN.Process(target=in_thread, args=(_forward_loop, *args), daemon=True) if thread \
            else SPAWN.Process(target=_forward_loop, args=args, daemon=True)
        self.proc.start()
        child.close()  # the child's end lives in the child only: if it dies, recv() raises EOFError
        if (answer := self.conn.recv()) != "ready":
            self.close()
            raise RuntimeError(f"the forward-loop process did not start: {answer}")

    def rate(self, seconds: float) -> float:
        self.conn.send(seconds)
        return float(self.conn.recv())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()

    def __enter__(self) -> ForwardLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def allocator_effect(folder: Path, batch: int, dtype: str, seconds: float, rounds: int) -> dict[str, Any]:
    """The raw forward (contiguous layout) with glibc's default malloc settings and with freed memory kept
    (DDIM_KEEP_FREED_MEMORY), each in a process's main thread and in another thread: four processes,
    measured in turn, rounds times; medians."""
    variants = {f"{'kept' if keep else 'default'}, {'thread' if thread else 'main thread'}": (keep, thread)
                for keep in (False, True) for thread in (True, False)}
    loops = {name: ForwardLoop(folder, batch, dtype, False, keep, thread) for name, (keep, thread) in variants.items()}
    try:
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(rounds):
            for name in (list(loops) if r % 2 == 0 else list(reversed(loops))):
                rates[name].append(loops[name].rate(seconds))
    finally:
        for loop in loops.values():
            loop.close()
    return {name: {"rates": rs, "image_steps_per_s": statistics.median(rs)} for name, rs in rates.items()}
