"""Tests that read a data set skip where it is missing (so `make test` passes on a fresh machine), and fail
instead under DDIM_REQUIRE_DATASETS=1, as CI sets it (.ci/run), so that CI never passes by skipping them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/eval/test_quality.py::test_shipped_classifier_is_small_and_accurate"


def run_pytest(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DDIM_REQUIRE_DATASETS"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", TEST], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**environ, "DDIM_FASHION_MNIST_DIR": str(data_dir), **env})


def test_a_missing_data_set_skips_with_its_reason(tmp_path: Path) -> None:
    r = run_pytest(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "1 skipped" in r.stdout and "apt-get install dataset-fashion-mnist" in r.stdout, r.stdout


def test_ci_turns_the_skip_into_a_failure(tmp_path: Path) -> None:
    r = run_pytest(tmp_path, DDIM_REQUIRE_DATASETS="1")
    assert r.returncode == 1, r.stdout
    assert "1 error" in r.stdout and "DDIM_REQUIRE_DATASETS=1 but the data set" in r.stdout, r.stdout  # fails in setup
