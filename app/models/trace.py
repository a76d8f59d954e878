"""Traced forwards: one TorchScript graph per input signature, run in one call that releases the GIL.

Called eagerly, a network dispatches hundreds of small ops from Python per forward and takes the GIL back after each.
In the server the event loop and the decode thread are Python threads too: whenever one of them holds the GIL, the
worker waits at its next op. Beside a Python thread that only spins, the tiny SD UNet's guided forward of 16 rows
took 1.59 s eager (11.1 ms alone) and 61 ms traced (8.3 ms alone): benchmarks/studies/text_pipeline.py.

torch.jit.trace records the ops once per signature: each input's device, dtype, rank and shape past the batch. The
batch size stays free, since diffusers' networks read it from the tensors; their Python branches on it
(ResnetBlock2D's and Upsample2D's `.contiguous()` for large batches) change no value. A graph shares the network's
parameters and keeps no inputs. It runs in TorchScript's plain interpreter (no fusion, no re-specialisation), so it
computes what the eager call computes, op for op. Each new trace is checked against the eager call twice: on the
inputs it was traced with, and on one more row of other values (floating-point inputs halved plus noise), so that
a value or batch size the trace froze shows. A trace that fails or differs is logged, and its signature runs eagerly
from then on; one that runs out of memory is not kept, and raises as the eager call would.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

import torch

from app.models.memory import is_out_of_memory

log = logging.getLogger(__name__)
Call = Callable[..., torch.Tensor]  # call(net, *tensors, **named tensors) -> tensor
Signature = tuple[object, ...]
SIGNATURES_KEPT = 64  # sizes a model is asked for; past it the graphs are dropped and traced again on demand
# One trace at a time in the process: tracing sets process-wide state (the warning filters, torch's module map).
_TRACING = threading.Lock()


class _Bound(torch.nn.Module):
    """call(net, *args, **named) as a module of positional tensors (what torch.jit.trace takes)."""

    def __init__(self, net: torch.nn.Module, call: Call, n_args: int, names: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.call, self.n_args, self.names = net, call, n_args, names

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        return self.call(self.net, *values[:self.n_args], **dict(zip(self.names, values[self.n_args:])))


def signature(args: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]) -> Signature:
    """What a graph is traced for: each input's name, device, dtype, rank and shape past the batch."""
    return tuple((k, v.device, v.dtype, tuple(v.shape[1:]), v.dim())
                 for k, v in [*enumerate(args), *named.items()])


class Traced:
    """call(net, *args, **named) through a graph traced for the inputs' signature; eager where tracing failed.
    Every input is a tensor whose first dimension is the batch."""

    def __init__(self, net: torch.nn.Module, call: Call, name: str = "") -> None:
        self.net, self.call, self.name = net, call, name
        self._graphs: dict[Signature, torch.jit.ScriptModule | None] = {}

    @property
    def signatures(self) -> int:
        return len(self._graphs)

    def __call__(self, *args: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        key = signature(args, named)
        if key not in self._graphs:
            self._trace(key, args, named)
        graph = self._graphs.get(key)
        if graph is None:
            return self.call(self.net, *args, **named)
        with torch.jit.optimized_execution(False):
            return graph(*args, *named.values())

    def _trace(self, key: Signature, args: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]) -> None:
        with _TRACING:
            if key in self._graphs:
                return
            if len(self._graphs) >= SIGNATURES_KEPT:
                self._graphs.clear()
            graph: torch.jit.ScriptModule | None = None
            inputs = (*args, *named.values())
            try:
                bound = _Bound(self.net, self.call, len(args), tuple(named))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    # torch.jit.trace warns that TorchScript is deprecated (the fallback below is eager)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    graph = torch.jit.trace(bound, inputs, check_trace=False, _store_inputs=False)
                if not (_agrees(graph, bound, inputs) and _agrees(graph, bound, _other_values(inputs))):
                    log.warning("%s: the traced forward differs from the eager one for inputs %s; running those "
                                "eagerly", self.name, _shapes(args, named))
                    graph = None
            except Exception as e:
                if is_out_of_memory(e):
                    raise  # not kept: a smaller batch may trace
                log.warning("%s: cannot trace the forward for inputs %s (%s: %s); running those eagerly", self.name,
                            _shapes(args, named), type(e).__name__, e)
                graph = None
            self._graphs[key] = graph


def _other_values(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs with one more row (the first again), floating-point values halved plus fixed noise."""
    g = torch.Generator().manual_seed(0)
    out = []
    for v in inputs:
        v = torch.cat([v, v[:1]])
        if v.is_floating_point():
            v = v * 0.5 + 0.1 * torch.randn(v.shape, generator=g).to(v.device, v.dtype)
        out.append(v)
    return tuple(out)


def _agrees(graph: torch.jit.ScriptModule, bound: _Bound, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the graph computes what the eager call does on these inputs (compared in float32, within the
    precision of their dtype: a frozen value is far off, while kernels may round differently)."""
    eager = bound(*inputs).float()
    with torch.jit.optimized_execution(False):
        traced = graph(*inputs).float()
    half = inputs[0].dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (2e-2, 2e-3) if half else (1e-4, 1e-5)
    return traced.shape == eager.shape and torch.allclose(traced, eager, rtol=rtol,
                                                          atol=atol * float(eager.abs().max()))


def _shapes(args: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                     for k, v in [*enumerate(args), *named.items()])
