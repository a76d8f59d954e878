"""Number formatting shared by the report and the studies."""

from __future__ import annotations

import subprocess
from pathlib import Path


def fmt(x: float | None, d: int = 1) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def git_commit(root: Path) -> str | None:
    """The commit the working tree is at (for results' metadata), or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None
