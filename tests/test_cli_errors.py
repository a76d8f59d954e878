"""The `ddim` command fails like a command: one line on stderr (`ddim: error: ...`), no traceback; exit status 2 for a
usage error (argparse's own, a bad flag value, an unknown model), 1 for a failure (a file it cannot read or write, a
model folder that cannot load). Real processes of `python -m app.cli`, on tiny model stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def ddim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # the plain layout: no timing, so that each case fails (or not) on its own error, and fast
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "DDIM_CHANNELS_LAST": "false",
                                         "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def broken_store(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny and tiny-rgb beside folders that cannot load: a config that is not JSON, weights that are not
    safetensors, a config diffusers cannot build (listed first, so that it is the store's first model)."""
    store = tmp_path_factory.mktemp("broken_store")
    for name in ("tiny", "tiny-rgb"):
        shutil.copytree(tiny_store / name, store / name)
    (store / "bad-json").mkdir()
    (store / "bad-json" / "config.json").write_text("{not json")
    shutil.copytree(tiny_store / "tiny", store / "bad-weights")
    (store / "bad-weights" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    shutil.copytree(tiny_store / "tiny", store / "aaa-bad-config")
    config = store / "aaa-bad-config" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": 8}))
    return store


def assert_one_line(r: subprocess.CompletedProcess[str], status: int, needle: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == status, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("ddim: error: ") and needle in lines[0], r.stderr
    assert r.stdout == ""


def test_usage_errors_exit_2_in_one_line(tiny_store: Path, tmp_path: Path) -> None:
    store = ["--model-store", str(tiny_store)]
    cases = [
        (["sample", *store, "--model", "nope"], "no model 'nope'"),
        (["invert", *store, "--model", "nope", "x.png"], "no model 'nope'"),
        (["sample", *store, "--steps", "abc"], "argument --steps: not an integer: 'abc'"),
        (["sample", *store, "--steps", "0"], "argument --steps: must be at least 1"),
        (["sample", *store, "--eta", "1.5"], "argument --eta: must be at most 1.0"),
        (["sample", *store, "--schedule", "cosine"], "argument --schedule: invalid choice"),
        (["sample", *store, "--stpes", "10"], "unrecognized arguments: --stpes"),
        (["sampel"], "invalid choice: 'sampel'"),
        (["eval", *store, "--model", "nope"], "no model 'nope'"),
        (["eval", *store, "--model", "tiny", "--steps", "10,x"], "argument --steps: not an integer: 'x'"),
        (["train", "--lr", "-1"], "argument --lr: must be above 0"),
        (["layouts", *store, "--model", "nope"], "no model 'nope'"),
    ]
    for args, needle in cases:
        assert_one_line(ddim(*args), 2, needle)
    # known only once the model is loaded: still a usage error, still one line
    r = ddim("sample", *store, "--model", "tiny", "--steps", "5000", "--out", str(tmp_path / "a.png"))
    assert_one_line(r, 2, "steps must be between 1 and 1000")
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    r = ddim("invert", *store, "--model", "tiny", "--class-label", "cat", str(tmp_path / "a.png"),
             "--out", str(tmp_path / "xT.npy"))
    assert_one_line(r, 2, "model 'tiny' is not class-conditional; leave out --class-label")


def test_failures_exit_1_in_one_line(tiny_store: Path, broken_store: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    store = ["--model-store", str(broken_store)]
    out = ["--out", str(tmp_path / "out.npy")]
    assert_one_line(ddim("invert", *store, "--model", "tiny", str(notes), *out), 1,
                    f"{notes}: not an image this command reads")
    assert_one_line(ddim("invert", *store, "--model", "tiny", str(tmp_path / "missing.png"), *out), 1,
                    f"cannot read {tmp_path / 'missing.png'}: No such file or directory")
    assert_one_line(ddim("sample", *store, "--model", "tiny", "--out", str(tmp_path / "no" / "grid.png")), 1,
                    "no folder")
    assert_one_line(ddim("sample", "--model-store", str(tmp_path / "no-store")), 1,
                    "model store folder does not exist")
    assert_one_line(ddim("sample", *store, "--model", "bad-json"), 1, "cannot load model 'bad-json'")
    assert_one_line(ddim("sample", *store, "--model", "bad-weights"), 1, "cannot read weights")
    assert_one_line(ddim("sample", *store), 1, "aaa-bad-config/unet/config.json: not a UNet2DModel config")
    assert_one_line(ddim("export", "--workdir", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")), 1,
                    "checkpoint.pt: No such file or directory")


def test_debug_shows_the_traceback(broken_store: Path) -> None:
    for r in (ddim("sample", "--model-store", str(broken_store), "--model", "aaa-bad-config", "--debug"),
              ddim("sample", "--model-store", str(broken_store), "--model", "aaa-bad-config",
                   env={"DDIM_DEBUG": "1"})):
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, r.stderr
        assert r.stderr.splitlines()[-1].startswith("ddim: error: cannot load model 'aaa-bad-config': ")
        assert "not a UNet2DModel config" in r.stderr.splitlines()[-1]


def test_sample_loads_only_the_model_it_names(broken_store: Path, tmp_path: Path) -> None:
    """Broken folders beside it change nothing for `ddim sample --model tiny`, layout timing included: only tiny's
    folder is read and timed."""
    cache = tmp_path / "layouts.json"
    r = ddim("sample", "--model-store", str(broken_store), "--model", "tiny", "--steps", "2", "-n", "1",
             "--out", str(tmp_path / "one.png"), env={"DDIM_CHANNELS_LAST": "auto", "DDIM_LAYOUT_CACHE": str(cache),
                                                      "DDIM_MAX_BATCH_SIZE": "2", "DDIM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "wrote 1 samples of tiny" in r.stdout and (tmp_path / "one.png").exists()
    assert [e["model"] for e in json.loads(cache.read_text()).values()] == ["tiny"]
    assert "Traceback" not in r.stderr and "error" not in r.stderr.lower(), r.stderr
