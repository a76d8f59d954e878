"""DDIM_CHANNELS_LAST=auto: the layout is timed once per model and machine, kept, and read back on every start."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.startup.layout import layout_key, layouts_for

CPU = torch.device("cpu")


def settings(store: Path, cache: Path, **kw: object) -> Settings:
    return Settings(model_store=store, layout_cache=cache, max_batch_size=4, threads=1, **kw)  # type: ignore[arg-type]


def test_the_choice_is_timed_once_kept_and_read_back(tiny_store: Path, tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "layouts.json"
    folders = [tiny_store / "tiny", tiny_store / "tiny-rgb"]
    first = layouts_for(folders, CPU, settings(tiny_store, cache))
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and all(isinstance(e["channels_last"], bool) and e["ms"]["contiguous"] > 0
                                     for e in entries.values())
    assert first == [entries[layout_key(f, CPU, "auto", 1, 4)]["channels_last"] for f in folders]
    # the next start reads the kept choice (timed again, the milliseconds would differ), whatever it is
    assert layouts_for(folders, CPU, settings(tiny_store, cache)) == first
    assert json.loads(cache.read_text()) == entries
    flipped = {k: {**e, "channels_last": not e["channels_last"]} for k, e in entries.items()}
    cache.write_text(json.dumps(flipped))
    assert layouts_for(folders, CPU, settings(tiny_store, cache)) == [not c for c in first]


def test_the_key_is_the_architecture_and_the_hardware_not_the_folder(tiny_store: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_store / "tiny", tmp_path / "another-name")
    key = layout_key(tiny_store / "tiny", CPU, "float32", 1, 4)
    assert layout_key(copy, CPU, "float32", 1, 4) == key
    assert layout_key(tiny_store / "tiny-rgb", CPU, "float32", 1, 4) != key
    others = {layout_key(tiny_store / "tiny", CPU, *args) for args in (("bfloat16", 1, 4), ("float32", 2, 4),
                                                                      ("float32", 1, 8))}
    assert len(others) == 3 and key not in others


def test_explicit_settings_and_no_warmup_time_nothing(tiny_store: Path, tmp_path: Path) -> None:
    cache = tmp_path / "layouts.json"
    folders = [tiny_store / "tiny"]
    assert layouts_for(folders, CPU, settings(tiny_store, cache, channels_last=True)) == [True]
    assert layouts_for(folders, CPU, settings(tiny_store, cache, warmup=False)) == [False]
    assert json.loads(cache.read_text() if cache.exists() else "{}") == {}


def test_a_cache_that_cannot_be_written_means_contiguous(tiny_store: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "layouts.json"  # its folder is a file
    with caplog.at_level(logging.WARNING, "app.startup.layout"):
        assert layouts_for([tiny_store / "tiny-rgb"], CPU, settings(tiny_store, cache)) == [False]
    assert "cannot keep the layout choice" in caplog.text and "DDIM_LAYOUT_CACHE" in caplog.text
