"""Schema fuzzing with schemathesis against a real server over a tiny model: `make fuzz` (python -m tests.fuzz),
and a short seeded run in the test suite (tests/api/test_fuzz.py).

Every operation of /openapi.json, with the checks not_a_server_error and response_schema_conformance; 503 and 504
are 5xx by design (schemathesis.toml). The server's limits are small, so that no generated request runs long.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from app.models.folder import random_model_folder
from harness.server import running_server
from tests.conftest import LINEAR_SCHEDULER, TINY_CLASSES, TINY_UNET

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"DDIM_MAX_STEPS": "20", "DDIM_MAX_N": "4", "DDIM_MAX_REQUEST_SECONDS": "5", "DDIM_MAX_JOBS": "50",
          "DDIM_MAX_BODY_BYTES": "1000000", "DDIM_DEFAULT_MODEL": "tiny"}


def fuzz_store(root: Path) -> Path:
    """A tiny unconditional model and a tiny class-conditional one; and a tiny Stable Diffusion pipeline where
    open_clip_torch (CLIP's BPE file) is installed."""
    random_model_folder(root / "tiny", TINY_UNET, LINEAR_SCHEDULER, seed=0)
    random_model_folder(root / "tiny-cond", {**TINY_UNET, "num_class_embeds": len(TINY_CLASSES) + 1},
                        LINEAR_SCHEDULER, seed=3, class_names=TINY_CLASSES)
    if importlib.util.find_spec("open_clip") is not None:
        from harness.pipelines import tiny_sd

        tiny_sd(root / "tiny-sd")
    return root


def fuzz(examples: int, seed: int, report: Path | None = None) -> tuple[int, str]:
    """Run schemathesis; returns (its exit code, its output)."""
    with tempfile.TemporaryDirectory() as tmp, running_server(fuzz_store(Path(tmp)), **LIMITS) as url:
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
               "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", str(examples),
               "--seed", str(seed), "--request-timeout", "30", "--no-color"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    if report is not None:
        report.write_text(output)
    return done.returncode, output


def cases(output: str) -> tuple[int, int]:
    """(generated, passed) test cases from schemathesis' summary."""
    m = re.search(r"(\d+) generated, (\d+) passed", output)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--examples", type=int, default=200, help="examples per operation and phase")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report", type=Path, help="write schemathesis' output here too")
    a = p.parse_args()
    code, output = fuzz(a.examples, a.seed, a.report)
    print(output)
    generated, passed = cases(output)
    print(f"fuzz: {generated} cases, {passed} passed, exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
