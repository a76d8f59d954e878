"""The server's output is JSON lines only, library messages included; messages that carry no information are gone."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging

from app import logs
from harness.server import running_server

NO_INFORMATION = "should be kept in float32"  # diffusers says so on every dtype cast, with an empty list of modules


def test_a_bfloat16_server_writes_only_json_lines(tiny_store: Path) -> None:
    # bfloat16 and the layout timed in a spawned process: the start that printed diffusers' warning as plain text
    with running_server(tiny_store, plain=False, DDIM_DTYPE="bfloat16", DDIM_CHANNELS_LAST="auto") as url:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-{url.rsplit(':', 1)[1]}.log"
        text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any('"model tiny ready' in line for line in lines), text[-2000:]
    for line in lines:
        entry = json.loads(line)  # raises on a plain-text line
        assert {"ts", "level", "logger", "msg"} <= set(entry)
    assert NO_INFORMATION not in text


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    diffusers_root = logging.getLogger("diffusers")
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    diffusers_root.propagate = False
    diffusers_logging.enable_default_handler()


def test_library_warnings_become_json_lines(root_logging: None, capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup(json_lines=True)
    diffusers_logging.get_logger("diffusers.models.modeling_utils").warning("a diffusers warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a Python warning", UserWarning, stacklevel=1)
    err = capfd.readouterr().err
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert [(e["logger"], e["level"]) for e in entries] == [("diffusers.models.modeling_utils", "warning"),
                                                            ("py.warnings", "warning")], err
    assert "a diffusers warning" in entries[0]["msg"] and "a Python warning" in entries[1]["msg"]
