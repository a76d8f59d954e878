from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.server import running_server


@pytest.fixture(scope="session")
def server(tiny_store: Path) -> Iterator[str]:
    """One real server over the tiny store, shared by the API tests."""
    with running_server(tiny_store, DDIM_DEFAULT_MODEL="tiny") as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
