"""`ddim layouts` shows the memory layout kept for each model under the current DDIM_* settings; `--retime` times
them again and rewrites their entries. Real processes of `python -m app.cli` on the tiny store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ddim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env})


def row(stdout: str, model: str) -> list[str]:
    [line] = [line for line in stdout.splitlines() if line.startswith(model + " ")]
    return line.split()


def test_layouts_shows_and_retimes_the_kept_choice(tiny_store: Path, tmp_path: Path) -> None:
    cache = tmp_path / "layouts.json"
    env = {"DDIM_MODEL_STORE": str(tiny_store), "DDIM_LAYOUT_CACHE": str(cache), "DDIM_MAX_BATCH_SIZE": "2",
           "DDIM_THREADS": "1", "DDIM_DTYPE": "float32"}
    r = ddim("layouts", env=env)
    assert r.returncode == 0, r.stderr
    assert row(r.stdout, "tiny")[1:3] == ["not", "timed:"] and row(r.stdout, "tiny-rgb")[1:3] == ["not", "timed:"]
    assert r.stdout.startswith(f"{cache}: cpu ") and "float32 | 1 threads | batch 2 | torch " in r.stdout

    r = ddim("layouts", "--retime", "--model", "tiny", env=env)
    assert r.returncode == 0, r.stderr
    [entry] = json.loads(cache.read_text()).values()
    assert entry["model"] == "tiny" and len(entry["rounds_ms"]["contiguous"]) == 5
    kept = "channels_last" if entry["channels_last"] else "contiguous"
    assert row(r.stdout, "tiny")[1] == kept and f"tiny: {entry['reason']}" in r.stdout
    assert ("(provisional)" in row(r.stdout, "tiny")) == entry["provisional"]
    assert row(r.stdout, "tiny")[-1] == entry["timed_at"]
    assert "tiny-rgb" not in r.stdout  # --model: that model only

    # without --retime the table is the cache's, for every model of the store
    retimed, before = row(r.stdout, "tiny"), cache.read_text()
    r = ddim("layouts", env=env)
    assert row(r.stdout, "tiny") == retimed and row(r.stdout, "tiny-rgb")[1] == "not"
    assert cache.read_text() == before

    # --retime rewrites a kept entry, whatever it says
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {**entry, "channels_last": True, "provisional": False,
                                       "timed_at": "2000-01-01T00:00:00Z"}}))
    assert row(ddim("layouts", env=env).stdout, "tiny")[1] == "channels_last"
    r = ddim("layouts", "--retime", "--model", "tiny", env=env)
    again = json.loads(cache.read_text())[key]
    assert r.returncode == 0 and again["timed_at"] != "2000-01-01T00:00:00Z" and "rounds_ms" in again
