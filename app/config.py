"""One Settings object, read from DDIM_* environment variables (and flags), passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of ddim-serve. Environment: DDIM_<NAME>, e.g. DDIM_MODEL_STORE=/models."""

    model_config = SettingsConfigDict(env_prefix="DDIM_", extra="ignore")

    model_store: Path = Field(Path("model_store"), description="folder of model folders")
    default_model: str = Field("fashion-mnist", description="used when a request names none "
                               "(falls back to the first model in the store)")
    device: str = Field("auto", description="auto (cuda, mps, cpu), or a torch device string")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32 "
        "(bfloat16's FID is within noise of float32's: docs/benchmarks.md)")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format for the eps-network; auto: contiguous unless channels_last "
        "is decisively faster for this model and machine (the rule in app/startup/layout.py), timed in a "
        "throwaway process and kept in layout_cache")
    layout_cache: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddim-serve"
        / "layouts.json", description="channels_last=auto: the layout chosen for each model and machine, kept here "
        "(`ddim layouts` shows it; a provisional one is timed again at the next start, `ddim layouts "
        "--retime` times it now)")
    compile: bool = Field(False, description="torch.compile one graph per batch bucket at warm-up")
    trace: bool = Field(True, description="pipelines (SD, SD3, DiT): run the denoiser and the VAE decoder as "
                        "TorchScript graphs traced once per input shape, which compute what the eager calls do but "
                        "release the GIL for the whole forward, so that the server's other threads do not stall the "
                        "worker (a shape that cannot be traced runs eagerly, with a warning)")
    compile_budget_seconds: float = Field(600.0, ge=0, description="warm-up time allowed for compiling")
    keep_freed_memory: bool = Field(True, description="raise glibc malloc's mmap and trim thresholds and its top "
                                    "pad at startup, so each forward reuses the last one's memory instead of "
                                    "faulting it in again")
    require_all_models: bool = Field(False, description="/readyz says 503 while any model of the store failed to "
                                     "load (by default it is 200 once every model that can load is ready)")
    allow_pickle: bool = Field(False, description="load pickled .bin weights (runs code from the file)")

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = Field(64, ge=1, description="samples per eps-network forward")
    max_queue: int = Field(1024, ge=1, description="waiting + active samples per model before 429")
    max_n: int = Field(64, ge=1, description="images per request")
    max_steps: int = Field(1000, ge=1, description="largest S a request may ask for")
    max_work: int = Field(64_000, ge=1, description="largest n x S of one request, a guided sample counting twice "
                          "(inversions and reconstructions count their steps too)")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    warmup: bool = True
    batching: Literal["step", "request"] = Field(
        "step", description="step: join the running batch at the next step; request: admit only "
        "between whole requests (for comparison)")
    priority: Literal["short-first", "fifo"] = Field(
        "short-first", description="short-first: while the batch mixes short and far longer jobs (S over 4x "
        "the shortest), step the short ones alone; fifo: always step every active sample together")
    max_defer_steps: int = Field(32, ge=1, description="short-first: the long rows get a forward of their own "
                                 "at least this often")
    release_idle_threads: bool = Field(True, description="a model idle for a second gives its OpenMP threads back, so "
                                       "that an idle model does not slow a busy one (app/startup/openmp.py)")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default)")
    prompt_cache_size: int = Field(256, ge=1, description="text models: prompt encodings kept per model (an LRU "
                                   "cache keyed by the text)")
    max_request_seconds: float = Field(600.0, gt=0, description="the longest a request or job may take, queueing "
                                       "included; a request's timeout_s is capped by it")
    max_jobs: int = Field(1000, ge=1, description="unfinished and retained jobs held at once; past it, 429")
    job_ttl_seconds: float = Field(600.0, gt=0, description="how long a finished job's result is kept")
    drain_seconds: float = Field(30.0, ge=0, description="on SIGTERM, how long work in flight may take to finish")
    log_json: bool = True
    api_keys: str = Field("", description="comma-separated API keys; when set (or api_keys_file), work and job "
                          "endpoints need Authorization: Bearer <key>")
    api_keys_file: Path | None = Field(None, description="a file of API keys, one per line (or sha256:<hex digest>)")
    metrics_auth: bool = Field(False, description="with API keys: /metrics needs a key too")
    cors_origins: str = Field("", description="comma-separated origins allowed cross-origin access (none by default)")
