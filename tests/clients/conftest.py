"""The client under test is this checkout's clients/python (as `python -m pytest` makes `app` this checkout's)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.server import running_server

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python"
sys.path.insert(0, str(CLIENT_SRC))


@pytest.fixture(scope="module")
def server(tiny_store: Path) -> Iterator[str]:
    """A real server over the tiny store; a small queue (DDIM_MAX_QUEUE) so that 429 is easy to reach."""
    with running_server(tiny_store, DDIM_DEFAULT_MODEL="tiny", DDIM_MAX_QUEUE="8") as url:
        yield url
