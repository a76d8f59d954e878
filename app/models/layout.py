"""DDIM_CHANNELS_LAST=auto: both memory layouts timed in a throwaway process, the faster one kept.

Why not in the server's own process: in two runs of the comparison in benchmarks/layout_choice.py
on this machine (20 fresh processes of each kind per run, measured in turn), 8 of the 40 processes
that timed both layouts before their forward loop ran it 11-31 % slower than the mean of those that
loaded the layout directly, for their whole life; none of the 40 direct ones fell below 0.92 of it
(docs/benchmarks.md). So the server's process only ever runs the layout it keeps.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from app.models.memory import keep_freed_memory
from app.models.store import ModelStoreError, load_model

log = logging.getLogger(__name__)


def faster_layouts(folders: list[Path], *, device: torch.device, dtype: str, batch: int, threads: int = 0,
                   keep_freed: bool = True, allow_pickle: bool = False, rounds: int = 3) -> list[bool]:
    """For each model folder, True if channels_last runs its forward faster at this batch size: timed one
    model after another in one spawned process, set up as the server is (device, dtype, threads, malloc)."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint) as pool:
            timings = pool.submit(_time_layouts, folders, str(device), dtype, batch, threads, keep_freed,
                                  allow_pickle, rounds).result()
    except ModelStoreError:  # a broken model folder: the user's error, reported as loading it would
        raise
    except Exception as e:  # no process could start (a daemonic parent, say), or it died or ran out of memory
        log.warning("timing the memory layouts failed (%r); every model keeps the contiguous layout", e)
        return [False] * len(folders)
    for folder, best in zip(folders, timings):
        log.info("%s: channels_last=%s, %.1f ms per forward at batch %d (the other layout: %.1f ms), timed in a "
                 "process of its own", folder.name, best[True] < best[False], 1000 * min(best.values()), batch,
                 1000 * max(best.values()))
    return [best[True] < best[False] for best in timings]


def _ignore_sigint() -> None:
    """Ctrl-C during startup is the server's to handle (uvicorn shuts down cleanly), not this process's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _time_layouts(folders: list[Path], device: str, dtype: str, batch: int, threads: int, keep_freed: bool,
                  allow_pickle: bool, rounds: int) -> list[dict[bool, float]]:
    if threads:
        torch.set_num_threads(threads)
    if keep_freed:
        keep_freed_memory()
    timings = []
    for folder in folders:
        model = load_model(folder, device=torch.device(device), dtype=dtype, allow_pickle=allow_pickle)
        timings.append(model.forward.time_layouts(batch, model.sample_shape, rounds))
        del model
    return timings
