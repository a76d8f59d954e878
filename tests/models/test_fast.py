"""Each fast path gives the plain path's results within a stated tolerance (never timed here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.models import load_model
from app.models.fast import bf16_supported


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


def test_pick_layout_keeps_one_layout_and_the_results(tiny_store: Path,
                                                      inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    plain = load_model(tiny_store / "tiny-rgb")
    m = load_model(tiny_store / "tiny-rgb")
    chosen = m.forward.pick_layout(4, m.sample_shape, rounds=1)
    weight = m.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last if chosen else torch.contiguous_format)
    assert m.info()["channels_last"] is chosen
    torch.testing.assert_close(m.eps(*inputs), plain.eps(*inputs), rtol=0, atol=1e-5)
