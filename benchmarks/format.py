"""Number formatting shared by the report and the studies."""

from __future__ import annotations

import subprocess
from pathlib import Path


def fmt(x: float | None, d: int = 1) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def git_commit(root: Path) -> str | None:
    """The commit the working tree is at (for results' metadata), `-dirty` when tracked files differ from it, or
    None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    commit = out.stdout.strip()
    if commit and subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, timeout=10).returncode:
        commit += "-dirty"  # the working tree differs from it
    return commit or None
