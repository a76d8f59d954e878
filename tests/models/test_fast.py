"""Each fast path gives the plain path's results within a stated tolerance (never timed here)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch

from app.models import ModelStoreError, load_model
from app.models.fast import Forward, bf16_supported
from app.startup.layout import faster_layouts


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 8, 8, generator=g), torch.tensor([0, 10, 250, 600, 999])


def test_channels_last_matches_plain(tiny_store: Path, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    plain = load_model(tiny_store / "tiny-rgb")
    fast = load_model(tiny_store / "tiny-rgb", channels_last=True)
    torch.testing.assert_close(fast.eps(*inputs), plain.eps(*inputs), rtol=0, atol=1e-5)


def test_bfloat16_is_close_to_float32(tiny_store: Path, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """bf16 keeps 8 mantissa bits: relative L2 error of the output within 2e-2."""
    plain = load_model(tiny_store / "tiny-rgb")
    for kw in ({"dtype": "bfloat16"}, {"dtype": "bfloat16", "channels_last": True}):
        out = load_model(tiny_store / "tiny-rgb", **kw).eps(*inputs)
        ref = plain.eps(*inputs)
        assert out.dtype == torch.float32
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2, kw


def test_auto_dtype_follows_the_hardware(tiny_store: Path) -> None:
    m = load_model(tiny_store / "tiny", dtype="auto")
    assert m.dtype == (torch.bfloat16 if bf16_supported(torch.device("cpu")) else torch.float32)


def test_compiled_buckets_match_eager(tiny_store: Path, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """torch.compile (inductor) for one bucket of 8 (one compile keeps the test short): a batch of 5 is
    padded to 8 and must equal eager within 1e-4; a batch of 9, above every bucket, runs eagerly."""
    plain = load_model(tiny_store / "tiny-rgb")
    fast = load_model(tiny_store / "tiny-rgb")
    assert fast.forward.compile(8, budget_seconds=600, sample_shape=fast.sample_shape, buckets=[8]) == [8]
    torch.testing.assert_close(fast.eps(*inputs), plain.eps(*inputs), rtol=0, atol=1e-4)
    big = torch.randn(9, 3, 8, 8)
    torch.testing.assert_close(fast.eps(big, torch.full((9,), 3)), plain.eps(big, torch.full((9,), 3)))


def test_compile_budget_zero_stays_eager(tiny_store: Path, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    m = load_model(tiny_store / "tiny-rgb")
    assert m.forward.compile(8, budget_seconds=0, sample_shape=m.sample_shape) == []
    torch.testing.assert_close(m.eps(*inputs), load_model(tiny_store / "tiny-rgb").eps(*inputs))


def test_time_layouts_times_both_and_keeps_the_results(tiny_store: Path,
                                                        inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    plain = load_model(tiny_store / "tiny-rgb")
    m = load_model(tiny_store / "tiny-rgb")
    rounds = m.forward.time_layouts(4, m.sample_shape, rounds=3, min_seconds=0.01)
    assert set(rounds) == {False, True} and all(len(r) == 3 and all(0 < s < 1 for s in r) for r in rounds.values())
    for on in (False, True):
        m.forward.use_channels_last(on)
        assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last if on else torch.contiguous_format)
        torch.testing.assert_close(m.eps(*inputs), plain.eps(*inputs), rtol=0, atol=1e-5)


def test_faster_layout_is_timed_in_another_process(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice comes back from a spawned process; this process never runs a forward for it."""
    forwards: list[int] = []
    monkeypatch.setattr(Forward, "__call__", lambda self, x, t: forwards.append(len(x)))
    chosen = faster_layouts([tiny_store / "tiny-rgb", tiny_store / "tiny"], device=torch.device("cpu"),
                            dtype="float32", batch=4, rounds=1)
    assert len(chosen) == 2 and all(isinstance(c, bool) for c in chosen)
    assert forwards == []


def _layouts_in_a_daemon(folder: Path, answers: Any) -> None:
    """In a daemonic process, which may not start children: faster_layouts must fall back, not fail."""
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("app.startup.layout").addHandler(handler)
    try:
        answers.put((faster_layouts([folder], device=torch.device("cpu"), dtype="float32", batch=2, rounds=1),
                     warnings))
    except BaseException as e:
        answers.put((f"raised {e!r}", warnings))


def test_faster_layout_falls_back_where_no_process_can_start(tiny_store: Path) -> None:
    spawn = mp.get_context("spawn")
    answers = spawn.Queue()
    proc = spawn.Process(target=_layouts_in_a_daemon, args=(tiny_store / "tiny", answers), daemon=True)
    proc.start()
    chosen, warnings = answers.get(timeout=300)
    proc.join(30)
    assert chosen == [False]
    assert any("timing the memory layouts failed" in w for w in warnings), warnings


def test_faster_layout_reports_a_broken_model(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="missing folder"):
        faster_layouts([tmp_path / "nope"], device=torch.device("cpu"), dtype="float32", batch=4, rounds=1)
