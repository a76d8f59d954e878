"""DDIM_CHANNELS_LAST=auto: the memory layout of each model, timed per model and machine, then kept.

Both memory layouts are timed in a throwaway process and the choice is kept in a cache file (DDIM_LAYOUT_CACHE),
keyed by the model's architecture, the device, dtype, threads, batch size and torch version. The server and the CLI
choose through layouts_for, so with the same model and settings they run the same layout on every start, and so
compute the same numbers: the two layouts sum in different orders (in bfloat16 a few pixel levels apart).

The rule (decide): contiguous is the default, and channels_last is chosen only when it wins decisively: the two
layouts are timed in ROUNDS (5) rounds that alternate which goes first (A B, B A, ...), and channels_last must take
at most MARGIN (0.9) of contiguous's time in every round, that is be at least 10 % faster each time. A timing taken
while other processes used more than MAX_OTHERS_LOAD (25 %) of the machine's CPU time (Linux: /proc/stat, less the
timing process's own), or whose rounds spread by more than MAX_SPREAD (25 %: slowest over fastest round of a layout)
is not evidence either way: it keeps contiguous, is marked provisional in the cache and is timed again at the next
start. A busy start can therefore never switch a model to channels_last, and once a quiet start has decided, the
choice stays until the key changes or an operator times again (`ddim layouts --retime`). Entries kept by the earlier
rule (the faster of the best of 3 forwards, no load recorded) count as provisional.

Why not in the server's own process: in two runs of the comparison in benchmarks/layout_choice.py
on this machine (20 fresh processes of each kind per run, measured in turn), 8 of the 40 processes
that timed both layouts before their forward loop ran it 11-31 % slower than the mean of those that
loaded the layout directly, for their whole life; none of the 40 direct ones fell below 0.92 of it
(docs/benchmarks.md). So the server's process only ever runs the layout it keeps.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import signal
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.models.fast import Forward, bf16_supported
from app.models.kinds import KINDS, check_folder
from app.models.store import ModelFiles, ModelStoreError, load_model
from app.startup.memory import keep_freed_memory

log = logging.getLogger(__name__)

ROUNDS = 5
MARGIN = 0.9  # channels_last / contiguous, at most, in every round
MAX_OTHERS_LOAD = 0.25  # share of the machine's CPU time used by other processes while timing
MAX_SPREAD = 0.25  # slowest over fastest round of a layout, less 1


@dataclass(frozen=True)
class LayoutTimes:
    """One model's timing: seconds per forward in each round, per layout, and how busy the machine was meanwhile."""

    contiguous: Sequence[float]
    channels_last: Sequence[float]
    others_load: float | None = None  # None where it cannot be measured (no /proc/stat)

    @property
    def spread(self) -> float:
        return max(max(r) / min(r) - 1 for r in (self.contiguous, self.channels_last))


@dataclass(frozen=True)
class LayoutChoice:
    channels_last: bool
    provisional: bool
    reason: str


def decide(times: LayoutTimes, margin: float = MARGIN, max_others_load: float = MAX_OTHERS_LOAD,
           max_spread: float = MAX_SPREAD) -> LayoutChoice:
    """The rule of this module's docstring: channels_last only if it took at most margin of contiguous's time in
    every round of a quiet timing; a busy or noisy timing keeps contiguous, provisionally."""
    ratios = [c / d for c, d in zip(times.channels_last, times.contiguous)]
    load = times.others_load
    if load is not None and load > max_others_load:
        return LayoutChoice(False, True, f"other processes used {load:.0%} of the CPU while timing (over "
                            f"{max_others_load:.0%}): contiguous until a quieter start times again")
    if times.spread > max_spread:
        return LayoutChoice(False, True, f"the rounds spread by {times.spread:.0%} (over {max_spread:.0%}): "
                            "contiguous until a steadier start times again")
    if max(ratios) <= margin:
        return LayoutChoice(True, False, f"channels_last took {min(ratios):.2f}-{max(ratios):.2f} of contiguous's "
                            f"time in every round (at most {margin} needed)")
    return LayoutChoice(False, False, f"channels_last took {min(ratios):.2f}-{max(ratios):.2f} of contiguous's "
                        f"time (at most {margin} in every round needed to leave the default)")


def layouts_for(folders: list[Path], device: torch.device, settings: Settings,
                retime_provisional: bool = True) -> list[bool]:
    """For each model folder, whether it runs channels_last (_layouts_for); a latent pipeline's denoiser always runs
    the contiguous layout."""
    plain = [f for f in folders if check_folder(f).kind in (None, KINDS["DDPMPipeline"])]
    chosen = dict(zip(plain, _layouts_for(plain, device, settings, retime_provisional) if plain else []))
    return [chosen.get(f, False) for f in folders]


def _layouts_for(folders: list[Path], device: torch.device, settings: Settings,
                 retime_provisional: bool = True) -> list[bool]:
    """For each model folder, whether it runs channels_last: as DDIM_CHANNELS_LAST says, or (auto) the choice kept
    in settings.layout_cache for this model and machine, timed first where there is none or (retime_provisional: a
    server's start) it is provisional. The CLI passes False: it runs what the servers started with, never a choice
    of its own. Without warm-up nothing is timed, and a model with no kept choice runs contiguous; so does every
    model when the cache cannot be written, so that the layout never changes from one start to the next."""
    s = settings
    if s.channels_last != "auto":
        return [s.channels_last is True] * len(folders)
    keys = _keys(folders, device, s)
    try:
        with _locked(s.layout_cache) as cache:
            stale = [(f, k) for f, k in zip(folders, keys) if needs_timing(cache.get(k), retime_provisional)]
            if stale and s.warmup:
                log.info("timing the memory layouts of %s (%s; kept in %s)", ", ".join(f.name for f, _ in stale),
                         "again: the kept choice is provisional" if any(k in cache for _, k in stale)
                         else "once for this model and machine", s.layout_cache)
                cache.update(_timed(stale, device, s))
    except OSError as e:
        log.warning("cannot keep the layout choice in %s (%s): every model runs the contiguous layout; set "
                    "DDIM_LAYOUT_CACHE to a writable file, or DDIM_CHANNELS_LAST=true or false", s.layout_cache, e)
        return [False] * len(folders)
    chosen = [bool(cache.get(k, {}).get("channels_last", False)) for k in keys]
    for folder, key, on in zip(folders, keys, chosen):
        log.info("%s: channels_last=%s (%s)", folder.name, on,
                 "kept in " + str(s.layout_cache) if key in cache else "no choice kept, and none timed")
    return chosen


def kept_layouts(folders: list[Path], device: torch.device, settings: Settings) -> list[dict[str, Any] | None]:
    """The cache's entry for each model folder under these settings (None where nothing is kept)."""
    keys = _keys(folders, device, settings)
    with _locked(settings.layout_cache) as cache:
        return [cache.get(k) for k in keys]


def retime_layouts(folders: list[Path], device: torch.device, settings: Settings) -> list[dict[str, Any]] | None:
    """Time each model folder now and keep the result, whatever was kept before (`ddim layouts --retime`); the new
    entries, or None where no process could time them (nothing is written then)."""
    keys = _keys(folders, device, settings)
    with _locked(settings.layout_cache) as cache:
        timed = _timed(list(zip(folders, keys)), device, settings)
        cache.update(timed)
    return [timed[k] for k in keys] if timed else None


def _keys(folders: list[Path], device: torch.device, s: Settings) -> list[str]:
    threads = s.threads or torch.get_num_threads()
    return [layout_key(folder, device, s.dtype, threads, s.max_batch_size, s.allow_pickle) for folder in folders]


def needs_timing(entry: dict[str, Any] | None, retime_provisional: bool = True) -> bool:
    """Whether a start times this entry's model (again): nothing kept, or (retime_provisional) a provisional choice,
    or one kept by the earlier rule, which recorded no such field."""
    return entry is None or (retime_provisional and bool(entry.get("provisional", True)))


def _timed(todo: list[tuple[Path, str]], device: torch.device, s: Settings) -> dict[str, dict[str, Any]]:
    """Cache entries for (folder, key) pairs, timed in one throwaway process; none where it failed."""
    loadavg = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else None
    timed = layout_timings([f for f, _ in todo], device=device, dtype=s.dtype, batch=s.max_batch_size,
                           threads=s.threads, keep_freed=s.keep_freed_memory, allow_pickle=s.allow_pickle)
    return {key: layout_entry(folder.name, times, loadavg) for (folder, key), times in zip(todo, timed or [])}


def layout_entry(model: str, times: LayoutTimes, loadavg: float | None = None) -> dict[str, Any]:
    """What the cache keeps for one model: the choice and the evidence for it."""
    choice = decide(times, MARGIN, MAX_OTHERS_LOAD, MAX_SPREAD)
    ms = {"contiguous": times.contiguous, "channels_last": times.channels_last}
    return {"channels_last": choice.channels_last, "provisional": choice.provisional, "reason": choice.reason,
            "model": model, "ms": {k: round(1000 * statistics.median(v), 3) for k, v in ms.items()},
            "rounds_ms": {k: [round(1000 * x, 3) for x in v] for k, v in ms.items()},
            "others_load": None if times.others_load is None else round(times.others_load, 3),
            "loadavg_per_core": None if loadavg is None else round(loadavg, 2),
            "spread": round(times.spread, 3), "timed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def layout_key(folder: Path, device: torch.device, dtype: str, threads: int, batch: int,
               allow_pickle: bool = False) -> str:
    """What the timing depends on: the architecture (the UNet config; not the weights), device, dtype, threads, batch
    size and torch version."""
    config = json.loads(ModelFiles.find(folder, allow_pickle).unet_config.read_text())
    arch = {k: v for k, v in config.items() if not k.startswith("_")}  # _diffusers_version and such
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    if dtype == "auto":
        dtype = "bfloat16" if bf16_supported(device) else "float32"
    return (f"unet {digest} | {_hardware(device)} | {dtype} | {threads} threads | batch {batch} | "
            f"torch {torch.__version__}")


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    name = platform.machine()
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return f"{device.type} {name}, {os.cpu_count()} cores"


class _locked:
    """The cache's entries as a dict, under an exclusive lock on the file (so that a server and a CLI started
    together time once); written back, atomically, if changed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            self.entries: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (ValueError, UnicodeDecodeError):
            log.warning("%s is not a layout cache; it is replaced", self.path)
            self.entries = {}
        self.before = json.dumps(self.entries, sort_keys=True)
        return self.entries

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and json.dumps(self.entries, sort_keys=True) != self.before:
                tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True) + "\n")
                tmp.replace(self.path)
        finally:
            self.lock.close()  # releases the lock


def faster_layouts(folders: list[Path], *, device: torch.device, dtype: str, batch: int, threads: int = 0,
                   keep_freed: bool = True, allow_pickle: bool = False, rounds: int = ROUNDS) -> list[bool]:
    """For each model folder, whether decide() picks channels_last from a timing now (layout_timings); False for
    every model where they could not be timed."""
    timings = layout_timings(folders, device=device, dtype=dtype, batch=batch, threads=threads, keep_freed=keep_freed,
                             allow_pickle=allow_pickle, rounds=rounds)
    return [decide(t).channels_last for t in timings] if timings else [False] * len(folders)


def layout_timings(folders: list[Path], *, device: torch.device, dtype: str, batch: int, threads: int = 0,
                   keep_freed: bool = True, allow_pickle: bool = False,
                   rounds: int = ROUNDS) -> list[LayoutTimes] | None:
    """For each model folder, the seconds per forward of each layout in each round at this batch size: timed one
    model after another in one spawned process, set up as the server is (device, dtype, threads, malloc). None where
    no process could time them."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint) as pool:
            timings = pool.submit(_time_layouts, folders, str(device), dtype, batch, threads, keep_freed,
                                  allow_pickle, rounds).result()
    except ModelStoreError:  # a broken model folder: the user's error, reported as loading it would
        raise
    except Exception as e:  # no process could start (a daemonic parent, say), or it died or ran out of memory
        log.warning("timing the memory layouts failed (%r); every model keeps the contiguous layout", e)
        return None
    for folder, times in zip(folders, timings):
        choice = decide(times, MARGIN, MAX_OTHERS_LOAD, MAX_SPREAD)
        log.info("%s: channels_last=%s%s: %.1f ms per forward contiguous, %.1f ms channels_last (medians of %d "
                 "rounds at batch %d, timed in a process of its own); %s", folder.name, choice.channels_last,
                 " (provisional)" if choice.provisional else "", 1000 * statistics.median(times.contiguous),
                 1000 * statistics.median(times.channels_last), rounds, batch, choice.reason)
    return timings


def _ignore_sigint() -> None:
    """Ctrl-C during startup is the server's to handle (uvicorn shuts down cleanly), not this process's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _time_layouts(folders: list[Path], device: str, dtype: str, batch: int, threads: int, keep_freed: bool,
                  allow_pickle: bool, rounds: int) -> list[LayoutTimes]:
    if threads:
        torch.set_num_threads(threads)
    if keep_freed:
        keep_freed_memory()
    timings = []
    for folder in folders:
        model = load_model(folder, device=torch.device(device), dtype=dtype, allow_pickle=allow_pickle)
        assert isinstance(model.forward, Forward), "pipeline denoisers run contiguous (layouts_for)"
        busy, own, started = _machine_cpu_seconds(), time.process_time(), time.perf_counter()
        times = model.forward.time_layouts(batch, model.sample_shape, rounds)
        others = None
        if busy is not None and (busy_after := _machine_cpu_seconds()) is not None:
            capacity = (time.perf_counter() - started) * (os.cpu_count() or 1)
            others = round(min(1.0, max(0.0, (busy_after - busy - (time.process_time() - own)) / capacity)), 3)
        timings.append(LayoutTimes(times[False], times[True], others))
        del model
    return timings


def _machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (niced processes included), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
