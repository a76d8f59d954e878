"""ruff is clean on the code (the rules are in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    r = subprocess.run([str(ruff), "check", "app", "tests", "benchmarks", "clients", "harness"], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout


def test_mypy_clean() -> None:
    """mypy passes (strict for app/sampling and app/engine; the configuration is in pyproject.toml)."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    assert mypy is not None, "mypy is in the dev extra: pip install -e '.[dev]'"
    r = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout
