"""Traced forwards (app.models.trace): the same numbers as the eager call at every batch size, the network's own
parameters, and eager calls where a signature cannot be traced or traces wrong."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from app.models import load_model
from app.models.trace import Traced


def _inputs(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.sample_shape), generator=g)
    t = torch.rand(batch, generator=g) * 999
    null = model.parts.null_cond
    if "class_labels" in null:
        return x, t, {"class_labels": torch.randint(0, 4, (batch,), generator=g)}
    return x, t, {k: v.expand(batch, *v.shape[1:]) + 0.1 * torch.randn((batch, *v.shape[1:]), generator=g)
                  for k, v in null.items()}


@pytest.mark.parametrize("name", ["sd", "sd-v", "sd3", "dit"])
def test_a_traced_denoiser_equals_the_eager_one_at_every_batch_size(pipeline_store: Path, name: str) -> None:
    traced = load_model(pipeline_store / name)
    eager = load_model(pipeline_store / name, trace=False)
    assert traced.parts.denoiser.traced is not None and eager.parts.denoiser.traced is None
    assert traced.info()["trace"] and not eager.info()["trace"]
    for batch in (3, 1, 8, 5):  # traced at the first; the batch size is free
        x, t, cond = _inputs(traced, batch, batch)
        assert torch.equal(traced.eps(x, t, cond), eager.eps(x, t, cond))
    assert traced.parts.denoiser.traced.signatures == 1
    big = load_model(pipeline_store / name, dtype="float32")  # a new size is a new signature
    if name != "dit":
        x, t, cond = _inputs(big, 2, 0)
        x = torch.randn(2, x.shape[1], x.shape[2] * 2, x.shape[3])
        assert torch.equal(big.eps(x, t, cond), eager.eps(x, t, cond))


def test_the_graphs_use_the_networks_own_parameters(pipeline_store: Path) -> None:
    model = load_model(pipeline_store / "sd")
    x, t, cond = _inputs(model, 2, 0)
    model.eps(x, t, cond)
    traced = model.parts.denoiser.traced
    graph = next(g for g in traced._graphs.values() if g is not None)
    own = {p.data_ptr() for p in model.unet.parameters()}
    assert {p.data_ptr() for p in graph.parameters()} == own
    with torch.no_grad():  # so a change to the network is a change to the graph
        next(model.unet.parameters()).add_(1.0)
    eager = load_model(pipeline_store / "sd", trace=False)
    with torch.no_grad():
        next(eager.unet.parameters()).add_(1.0)
    assert torch.equal(model.eps(x, t, cond), eager.eps(x, t, cond))


def test_the_vae_decoder_runs_traced_and_decodes_as_the_eager_one(pipeline_store: Path) -> None:
    traced, eager = load_model(pipeline_store / "sd").codec, load_model(pipeline_store / "sd", trace=False).codec
    assert traced is not None and eager is not None
    for batch in (2, 3):
        z = torch.randn(batch, traced.channels, 8, 8, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(traced.decode(z), eager.decode(z))
    assert traced._decode.signatures == 1


class _Noisy(torch.nn.Module):
    """A network whose output is not a function of its inputs: a trace of it cannot match the eager call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class _Frozen(torch.nn.Module):
    """A network whose Python number the trace freezes: right on the inputs it was traced with, wrong elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float(x.sum()))


class _Opaque(torch.nn.Module):
    """A network that answers a Python number, which torch.jit.trace refuses."""

    def forward(self, x: torch.Tensor) -> float:
        return float(x.sum())


@pytest.mark.parametrize("net", [_Noisy(), _Frozen()], ids=["random", "frozen"])
def test_a_signature_that_traces_wrong_runs_eagerly_with_a_warning(caplog: pytest.LogCaptureFixture,
                                                                   net: torch.nn.Module) -> None:
    traced = Traced(net, lambda net, x: net(x), "model odd")
    with caplog.at_level(logging.WARNING, logger="app.models.trace"):
        out = traced(torch.ones(4, 3))
    assert out.shape == (4, 3) and list(traced._graphs.values()) == [None]
    assert "model odd: the traced forward differs from the eager one for inputs 0 [4, 3] float32" in caplog.text
    caplog.clear()
    again = traced(2 * torch.ones(2, 3))  # eager: the frozen network's sum is this input's
    assert again.shape == (2, 3) and (not isinstance(net, _Frozen) or torch.equal(again, torch.full((2, 3), 12.0)))
    assert caplog.text == ""  # the same signature: eager, without a second warning


def test_a_signature_that_cannot_be_traced_runs_eagerly_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    traced = Traced(_Opaque(), lambda net, x: net(x), "model opaque")
    with caplog.at_level(logging.WARNING, logger="app.models.trace"):
        assert float(traced(torch.ones(4, 3))) == 12.0
    assert "model opaque: cannot trace the forward for inputs 0 [4, 3] float32" in caplog.text
    assert list(traced._graphs.values()) == [None]


class _ShortOfMemory(torch.nn.Module):
    """A network that runs out of memory on its first call, as a first trace at a large batch may on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 2 * x


def test_a_trace_that_runs_out_of_memory_raises_and_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    traced = Traced(_ShortOfMemory(), lambda net, x: net(x), "model short")
    with pytest.raises(RuntimeError, match="out of memory"):
        traced(torch.ones(4, 3))
    assert traced.signatures == 0  # nothing kept: the next call traces again
    with caplog.at_level(logging.WARNING, logger="app.models.trace"):
        assert torch.equal(traced(torch.ones(2, 3)), 2 * torch.ones(2, 3))
    assert caplog.text == "" and next(iter(traced._graphs.values())) is not None


def test_a_graph_keeps_no_inputs_alive() -> None:
    import gc
    import weakref

    traced = Traced(torch.nn.Linear(3, 3), lambda net, x: net(x), "model linear")
    x = torch.ones(4, 3)
    ref = weakref.ref(x)
    traced(x)
    assert next(iter(traced._graphs.values())) is not None
    del x
    gc.collect()
    assert ref() is None


def test_warm_up_traces_the_denoiser_and_the_vae_decoder_at_the_default_size(pipeline_store: Path) -> None:
    from app.config import Settings
    from app.startup import warm_up

    model = load_model(pipeline_store / "sd")
    assert model.parts is not None and model.codec is not None
    assert model.parts.denoiser.traced.signatures == 0 and model.codec._decode.signatures == 0
    warm_up(model, Settings(max_batch_size=4, threads=0), budget_from=0.0)
    assert model.parts.denoiser.traced.signatures == 1 and model.codec._decode.signatures == 1
    assert all(g is not None for g in model.parts.denoiser.traced._graphs.values())
