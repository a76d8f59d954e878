"""DDIM_CHANNELS_LAST=auto: the memory layout of each model, timed once per model and machine, then kept.

Both memory layouts are timed in a throwaway process and the faster one is kept in a cache file (DDIM_LAYOUT_CACHE),
keyed by the model's architecture, the device, dtype, threads, batch size and torch version. The server and the CLI
choose through layouts_for, so with the same model and settings they run the same layout on every start, and so
compute the same numbers: the two layouts sum in different orders (in bfloat16 a few pixel levels apart).

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
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.models.fast import Forward, bf16_supported
from app.models.kinds import KINDS, check_folder
from app.models.store import ModelFiles, ModelStoreError, load_model
from app.startup.memory import keep_freed_memory

log = logging.getLogger(__name__)


def layouts_for(folders: list[Path], device: torch.device, settings: Settings) -> list[bool]:
    """For each model folder, whether it runs channels_last (_layouts_for); a latent pipeline's denoiser always runs
    the contiguous layout."""
    plain = [f for f in folders if check_folder(f).kind in (None, KINDS["DDPMPipeline"])]
    chosen = dict(zip(plain, _layouts_for(plain, device, settings) if plain else []))
    return [chosen.get(f, False) for f in folders]


def _layouts_for(folders: list[Path], device: torch.device, settings: Settings) -> list[bool]:
    """For each model folder, whether it runs channels_last: as DDIM_CHANNELS_LAST says, or (auto) the choice kept
    in settings.layout_cache for this model and machine, timed first where there is none. Without warm-up nothing
    is timed, and a model with no kept choice runs contiguous; so does every model when the cache cannot be written,
    so that the layout never changes from one start to the next."""
    s = settings
    if s.channels_last != "auto":
        return [s.channels_last is True] * len(folders)
    threads = s.threads or torch.get_num_threads()
    keys = [layout_key(folder, device, s.dtype, threads, s.max_batch_size, s.allow_pickle) for folder in folders]
    try:
        with _locked(s.layout_cache) as cache:
            missing = [(f, k) for f, k in zip(folders, keys) if k not in cache]
            if missing and s.warmup:
                log.info("timing the memory layouts of %s (once for this model and machine; kept in %s)",
                         ", ".join(f.name for f, _ in missing), s.layout_cache)
                timed = layout_timings([f for f, _ in missing], device=device, dtype=s.dtype, batch=s.max_batch_size,
                                       threads=s.threads, keep_freed=s.keep_freed_memory, allow_pickle=s.allow_pickle)
                for (folder, key), best in zip(missing, timed or []):
                    cache[key] = {"channels_last": best[True] < best[False], "model": folder.name,
                                  "ms": {"contiguous": round(1000 * best[False], 3),
                                         "channels_last": round(1000 * best[True], 3)},
                                  "timed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    except OSError as e:
        log.warning("cannot keep the layout choice in %s (%s): every model runs the contiguous layout; set "
                    "DDIM_LAYOUT_CACHE to a writable file, or DDIM_CHANNELS_LAST=true or false", s.layout_cache, e)
        return [False] * len(folders)
    chosen = [bool(cache.get(k, {}).get("channels_last", False)) for k in keys]
    for folder, key, on in zip(folders, keys, chosen):
        log.info("%s: channels_last=%s (%s)", folder.name, on,
                 "kept in " + str(s.layout_cache) if key in cache else "no choice kept, and none timed")
    return chosen


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
                   keep_freed: bool = True, allow_pickle: bool = False, rounds: int = 3) -> list[bool]:
    """For each model folder, True if channels_last runs its forward faster at this batch size (layout_timings);
    False for every model where they could not be timed."""
    timings = layout_timings(folders, device=device, dtype=dtype, batch=batch, threads=threads, keep_freed=keep_freed,
                             allow_pickle=allow_pickle, rounds=rounds)
    return [best[True] < best[False] for best in timings] if timings else [False] * len(folders)


def layout_timings(folders: list[Path], *, device: torch.device, dtype: str, batch: int, threads: int = 0,
                   keep_freed: bool = True, allow_pickle: bool = False,
                   rounds: int = 3) -> list[dict[bool, float]] | None:
    """For each model folder, the best seconds per forward in each layout (channels_last: False, True) at this
    batch size: timed one model after another in one spawned process, set up as the server is (device, dtype,
    threads, malloc). None where no process could time them."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint) as pool:
            timings = pool.submit(_time_layouts, folders, str(device), dtype, batch, threads, keep_freed,
                                  allow_pickle, rounds).result()
    except ModelStoreError:  # a broken model folder: the user's error, reported as loading it would
        raise
    except Exception as e:  # no process could start (a daemonic parent, say), or it died or ran out of memory
        log.warning("timing the memory layouts failed (%r); every model keeps the contiguous layout", e)
        return None
    for folder, best in zip(folders, timings):
        log.info("%s: channels_last=%s, %.1f ms per forward at batch %d (the other layout: %.1f ms), timed in a "
                 "process of its own", folder.name, best[True] < best[False], 1000 * min(best.values()), batch,
                 1000 * max(best.values()))
    return timings


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
        assert isinstance(model.forward, Forward), "pipeline denoisers run contiguous (layouts_for)"
        timings.append(model.forward.time_layouts(batch, model.sample_shape, rounds))
        del model
    return timings
