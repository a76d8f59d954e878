"""DDIM_CHANNELS_LAST=auto: the layout is timed per model and machine, kept, and read back on every start; the rule
that leaves the contiguous default only for a decisive win in a quiet timing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.startup.layout import (
    MARGIN,
    MAX_OTHERS_LOAD,
    ROUNDS,
    LayoutChoice,
    LayoutTimes,
    decide,
    layout_entry,
    layout_key,
    layouts_for,
)

CPU = torch.device("cpu")


def settings(store: Path, cache: Path, **kw: object) -> Settings:
    return Settings(model_store=store, layout_cache=cache, max_batch_size=4, threads=1, **kw)  # type: ignore[arg-type]


def test_the_choice_is_timed_once_kept_and_read_back(tiny_store: Path, tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "layouts.json"
    folders = [tiny_store / "tiny", tiny_store / "tiny-rgb"]
    first = layouts_for(folders, CPU, settings(tiny_store, cache))
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and all(isinstance(e["channels_last"], bool) and e["ms"]["contiguous"] > 0
                                     and len(e["rounds_ms"]["channels_last"]) == ROUNDS for e in entries.values())
    assert first == [entries[layout_key(f, CPU, "auto", 1, 4)]["channels_last"] for f in folders]
    # a firm choice is read back on the next start (timed again, the milliseconds would differ), whatever it is
    firm = {k: {**e, "provisional": False} for k, e in entries.items()}
    cache.write_text(json.dumps(firm))
    assert layouts_for(folders, CPU, settings(tiny_store, cache)) == first
    assert json.loads(cache.read_text()) == firm
    flipped = {k: {**e, "channels_last": not e["channels_last"]} for k, e in firm.items()}
    cache.write_text(json.dumps(flipped))
    assert layouts_for(folders, CPU, settings(tiny_store, cache)) == [not c for c in first]


def test_a_provisional_choice_is_timed_again_at_the_next_start(tiny_store: Path, tmp_path: Path) -> None:
    """A provisional entry, or one kept by the earlier rule (no such field), is timed again by a server's start;
    the CLI (retime_provisional=False) runs it as kept, as the server that started with it does."""
    cache = tmp_path / "layouts.json"
    folder = tiny_store / "tiny"
    key = layout_key(folder, CPU, "auto", 1, 4)
    old_rule = {"channels_last": True, "model": "tiny", "ms": {"contiguous": 13.4, "channels_last": 11.9},
                "timed_at": "2000-01-01T00:00:00Z"}
    for kept in (old_rule, {**old_rule, "provisional": True}):
        cache.write_text(json.dumps({key: kept}))
        assert layouts_for([folder], CPU, settings(tiny_store, cache), retime_provisional=False) == [True]
        assert json.loads(cache.read_text()) == {key: kept}
        layouts_for([folder], CPU, settings(tiny_store, cache))
        again = json.loads(cache.read_text())[key]
        assert again["timed_at"] != kept["timed_at"] and "provisional" in again and "rounds_ms" in again


def times(contiguous: list[float], channels_last: list[float], load: float | None = 0.0) -> LayoutTimes:
    return LayoutTimes(contiguous, channels_last, load)


def test_channels_last_only_when_it_wins_by_the_margin_in_every_round() -> None:
    base = [20.0, 20.5, 19.8, 20.2, 20.1]
    decisive = decide(times(base, [0.85 * c for c in base]))
    assert decisive == LayoutChoice(True, False, decisive.reason) and "0.85-0.85" in decisive.reason
    assert decide(times(base, [0.3 * c for c in base])).channels_last  # 3x faster: an easy call
    one_round_short = [0.85 * c for c in base[:4]] + [0.95 * base[4]]
    assert decide(times(base, one_round_short)) == LayoutChoice(False, False, decide(
        times(base, one_round_short)).reason)
    assert not decide(times(base, [0.92 * c for c in base])).channels_last  # 8 % faster: not decisive
    assert not decide(times(base, [2.8 * c for c in base])).channels_last
    # unknown load (no /proc/stat): decided on the rounds alone
    assert decide(times(base, [0.85 * c for c in base], load=None)).channels_last


def test_a_busy_or_noisy_timing_keeps_contiguous_provisionally() -> None:
    # the busy first start: channels_last 1187 ms, contiguous 1343 ms, with other work on the machine
    busy = decide(times([1343.0, 1350.0, 1340.0, 1345.0, 1349.0], [1187.0, 1190.0, 1185.0, 1188.0, 1192.0],
                        load=0.6))
    assert busy.provisional and not busy.channels_last and "60%" in busy.reason
    # quiet machine, but rounds all over the place: 10 ms to 30 ms
    noisy = decide(times([30.0, 10.0, 20.0, 25.0, 12.0], [8.0, 8.5, 17.0, 20.0, 9.0]))
    assert noisy.provisional and not noisy.channels_last and "spread" in noisy.reason
    assert times([30.0, 10.0], [8.0, 8.0]).spread == pytest.approx(2.0)
    # the thresholds are the module's: at the limit still firm, past it provisional
    assert not decide(times([10.0, 12.5], [8.0, 8.0], load=MAX_OTHERS_LOAD)).provisional
    assert decide(times([10.0, 12.6], [8.0, 8.0])).provisional
    assert MARGIN == 0.9 and ROUNDS == 5


def test_the_entry_keeps_the_evidence() -> None:
    e = layout_entry("m", times([0.020, 0.021, 0.019, 0.020, 0.022], [0.017, 0.0175, 0.016, 0.017, 0.018], 0.05),
                     loadavg=0.4)
    assert e["channels_last"] is True and e["provisional"] is False and e["model"] == "m"
    assert e["ms"] == {"contiguous": 20.0, "channels_last": 17.0}
    assert e["rounds_ms"]["channels_last"] == [17.0, 17.5, 16.0, 17.0, 18.0]
    assert (e["others_load"], e["loadavg_per_core"], e["spread"]) == (0.05, 0.4, pytest.approx(0.158, abs=1e-3))
    json.dumps(e)  # as the cache writes it


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
