"""A fresh ddim-serve for a benchmark, and what it reports about itself (shared by benchmarks.run and .features)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import httpx

from harness.server import running_server

CORES = str(os.cpu_count() or 1)


def server_facts(url: str) -> dict[str, Any]:
    """The loaded model's dtype and layout, startup time and RSS, as the server reports them."""
    info = httpx.get(f"{url}/models").json()["models"][0]
    metrics = httpx.get(f"{url}/metrics").text
    startup = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("ddim_startup_seconds "))
    return {"dtype": info.get("dtype"), "channels_last": info.get("channels_last"), "startup_s": startup,
            "rss_mib": server_rss(url)}


def serve(store: Path, batch: int, **env: str) -> Any:
    """A fresh server; each one times the memory layouts afresh (a layout cache of its own), as every round did
    before the server kept its choice, so that the rounds sample the choice too."""
    cache = Path(tempfile.mkdtemp(prefix="ddim-bench-")) / "layouts.json"
    return running_server(store, ready_timeout=1800, plain=False, DDIM_MAX_BATCH_SIZE=str(batch), DDIM_THREADS="0",
                          OMP_NUM_THREADS=CORES, DDIM_LAYOUT_CACHE=str(cache), **env)


def server_pid(url: str) -> int:
    """The server process's id, found in /proc by the port it listens on."""
    port = url.rsplit(":", 1)[1].encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.main" in cmd and port in cmd:
            return int(pid)
    raise LookupError(f"no ddim-serve process listens on port {port.decode()}")


def server_rss(url: str) -> float:
    """RSS of the server process (MiB)."""
    for line in Path(f"/proc/{server_pid(url)}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
