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
import ctypes
import multiprocessing as mp
import resource
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch

from app.models import LoadedModel, load_model
from app.startup.memory import GLIBC, GLIBC_TOP_PAD, M_TOP_PAD, keep_freed_memory
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


def forward_loop(folder: Path, batch: int, dtype: str, channels_last: bool,
                 keep_freed: bool) -> Callable[[float], float]:
    """Setup for Resident: the model loaded and warmed; the measure is rate(seconds) of a bare forward loop."""
    if keep_freed:
        keep_freed_memory()
    return warmed_loop(load_model(folder, dtype=dtype, channels_last=channels_last), batch)


def warmed_loop(m: LoadedModel, batch: int) -> Callable[[float], float]:
    """rate(seconds) of m's forward at this batch size, after one forward."""
    x, t = torch.randn(batch, *m.sample_shape), torch.randint(0, 1000, (batch,))
    m.eps(x, t)
    return lambda seconds: rate(m.eps, x, t, seconds)


def _serve(conn: Connection, setup: Callable[..., Callable[[Any], Any]], args: tuple[Any, ...]) -> None:
    try:
        measure = setup(*args)
    except BaseException as e:
        conn.send(f"failed: {e!r}")
        raise
    conn.send("ready")
    while (request := conn.recv()) is not None:  # (arg,) to measure, None to stop
        conn.send(measure(request[0]))
    if callable(stop := getattr(measure, "stop", None)):  # e.g. an engine's worker threads, before the process ends
        stop()


class Resident:
    """A measurement kept loaded in a process of its own, so that it can be taken again and again between
    served windows: setup(*args) runs there once (it must be importable) and returns measure(arg);
    calling this runs measure there while the caller waits and returns its value. thread=False runs it in
    the process's main thread instead of another one (for allocator_effect)."""

    def __init__(self, setup: Callable[..., Callable[[Any], Any]], *args: Any, thread: bool = True) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=in_thread, args=(_serve, child, setup, args), daemon=True) if thread \
            else SPAWN.Process(target=_serve, args=(child, setup, args), daemon=True)
        self.proc.start()
        child.close()  # the child's end lives in the child only: if it dies, recv() raises EOFError
        if (answer := self.conn.recv()) != "ready":
            self.close()
            raise RuntimeError(f"the measuring process did not start: {answer}")

    def __call__(self, arg: Any = None) -> Any:
        """What measure(arg) returned there (a rate, as a rule)."""
        self.conn.send((arg,))
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()

    def __enter__(self) -> Resident:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def in_turn(measures: list[Resident], slices: int, arg: Any) -> list[list[Any]]:
    """Each measure taken slices times, one process computing at a time, the order reversed every slice;
    closes them all. What each returned, per measure."""
    taken: list[list[Any]] = [[] for _ in measures]
    try:
        for s in range(slices):
            for i in range(len(measures)) if s % 2 == 0 else reversed(range(len(measures))):
                taken[i].append(measures[i](arg))
    finally:
        for m in measures:
            m.close()
    return taken


def malloc_loop(folder: Path, batch: int, dtype: str, malloc: str,
                channels_last: bool = False) -> Callable[[float], tuple[float, float]]:
    """Setup for Resident: forward_loop under glibc's default settings ("default"), DDIM_KEEP_FREED_MEMORY
    ("kept"), or that without its top pad ("kept, no top pad", as before it had one); the measure is
    (image-steps/s, minor page faults per forward)."""
    if malloc == "kept, no top pad":  # before anything is allocated, as the server sets it
        keep_freed_memory()
        ctypes.CDLL(GLIBC).mallopt(M_TOP_PAD, GLIBC_TOP_PAD)
    loop = forward_loop(folder, batch, dtype, channels_last, malloc == "kept")

    def measure(seconds: float) -> tuple[float, float]:
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        rate = loop(seconds)
        forwards = rate * (time.perf_counter() - start) / batch  # the untimed first forward of rate() included
        return rate, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / forwards

    return measure


def allocator_effect(folder: Path, batch: int, dtype: str, seconds: float, rounds: int) -> dict[str, Any]:
    """The raw forward (contiguous layout) with glibc's default malloc settings, with freed memory kept
    (DDIM_KEEP_FREED_MEMORY), and kept without the top pad, each in a thread other than the process's main
    thread (as the server's forwards run); the first two also in a main thread. Five processes, measured in
    turn, rounds times: the median rate and page faults per forward of each."""
    variants = {"default, thread": ("default", True), "default, main thread": ("default", False),
                "kept, thread": ("kept", True), "kept, main thread": ("kept", False),
                "kept, no top pad, thread": ("kept, no top pad", True)}
    loops = [Resident(malloc_loop, folder, batch, dtype, malloc, thread=thread) for malloc, thread in variants.values()]
    taken = dict(zip(variants, in_turn(loops, rounds, seconds)))
    out = {name: {"rates": [x[0] for x in xs], "image_steps_per_s": statistics.median(x[0] for x in xs),
                  "faults_per_forward": statistics.median(x[1] for x in xs)} for name, xs in taken.items()}
    out["kept, no top pad, thread"]["top_pad"] = GLIBC_TOP_PAD
    return out
