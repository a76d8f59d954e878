"""The `ddim` command end to end, as a subprocess, on a tiny model store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def ddim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_sample_writes_png_grid_and_latents(tiny_store: Path, tmp_path: Path) -> None:
    out, lat = tmp_path / "grid.png", tmp_path / "x0.npy"
    r = ddim("sample", "--model-store", str(tiny_store), "--model", "tiny", "--steps", "5", "--eta", "0.5",
             "-n", "4", "--seed", "3", "--out", str(out), "--latents-out", str(lat))
    assert r.returncode == 0, r.stderr
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.size == (2 * 10 + 2, 2 * 10 + 2)  # 2x2 tiles of 8 px, 2 px gaps
    x0 = np.load(lat)
    assert x0.shape == (4, 1, 8, 8) and x0.dtype == np.float32 and x0.std() > 0
    # seed contract: image 2 of seed 3 is image 0 of seed 5
    r = ddim("sample", "--model-store", str(tiny_store), "--model", "tiny", "--steps", "5", "--eta", "0.5",
             "-n", "1", "--seed", "5", "--out", str(tmp_path / "one.png"), "--latents-out", str(tmp_path / "one.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "one.npy")[0], x0[2], rtol=1e-4, atol=1e-4)


def test_invert_uses_env_store_and_errors_are_clear(tiny_store: Path, tmp_path: Path) -> None:
    img = tmp_path / "in.png"
    Image.fromarray((np.arange(100 * 60) % 256).astype(np.uint8).reshape(60, 100)).save(img)
    r = ddim("invert", "--model", "tiny-rgb", "--steps", "4", str(img), "--out", str(tmp_path / "xT.npy"),
             env={"DDIM_MODEL_STORE": str(tiny_store)})
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "xT.npy").shape == (1, 3, 8, 8)
    r = ddim("sample", "--model-store", str(tiny_store), "--model", "nope")
    assert r.returncode != 0 and "no model 'nope'" in r.stderr and "tiny, tiny-rgb" in r.stderr
    r = ddim("sample", "--model-store", str(tiny_store), "--model", "tiny", "--steps", "5000")
    assert r.returncode == 2 and "steps must be between 1 and 1000" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_bfloat16_run_prints_no_library_noise(tiny_store: Path, tmp_path: Path) -> None:
    r = ddim("sample", "--model-store", str(tiny_store), "--model", "tiny", "--steps", "2", "-n", "1",
             "--out", str(tmp_path / "a.png"), env={"DDIM_DTYPE": "bfloat16"})
    assert r.returncode == 0, r.stderr
    assert "should be kept in float32" not in r.stderr, r.stderr


def test_sample_with_a_multistep_sampler_equals_the_server(tiny_store: Path, tmp_path: Path) -> None:
    import httpx

    from harness.server import running_server

    lat = tmp_path / "x0.npy"
    r = ddim("sample", "--model-store", str(tiny_store), "--model", "tiny", "--steps", "6", "--sampler", "unipc",
             "--solver-order", "3", "--schedule", "karras", "-n", "2", "--seed", "4", "--out", str(tmp_path / "g.png"),
             "--latents-out", str(lat), env={"DDIM_DTYPE": "float32", "DDIM_CHANNELS_LAST": "false"})
    assert r.returncode == 0, r.stderr
    with running_server(tiny_store, DDIM_DEFAULT_MODEL="tiny") as url:
        served = httpx.post(f"{url}/generate", json={"steps": 6, "sampler": "unipc", "solver_order": 3, "n": 2,
                                                     "schedule": "karras", "seed": 4},
                            headers={"accept": "application/x-npy"}, timeout=60)
    import io

    np.testing.assert_allclose(np.load(lat), np.load(io.BytesIO(served.content)), rtol=1e-5, atol=1e-6)
    refused = ddim("sample", "--model-store", str(tiny_store), "--model", "tiny", "--sampler", "dpmsolver++",
                   "--eta", "0.5", "--out", str(tmp_path / "no.png"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--eta" in refused.stderr


def test_edit_writes_the_offline_edit_and_refuses_k_zero(cond_store: Path, tmp_path: Path) -> None:
    """`ddim edit` is /edit offline: the same two legs (app/sampling/loop.edit) on the class-conditional flow model."""
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(img)
    out = tmp_path / "edit.png"
    r = ddim("edit", "--model-store", str(cond_store), "--model", "tiny-flow", "--steps", "6", "--strength", "0.5",
             "--source-class-label", "cat", "--class-label", "dog", "--guidance-scale", "2", str(img),
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "k=3" in r.stdout and Image.open(out).size == (8, 8)
    r = ddim("edit", "--model-store", str(cond_store), "--model", "tiny-flow", "--steps", "6", "--strength", "0.1",
             str(img), "--out", str(out))
    assert r.returncode == 2 and "strength" in r.stderr
