"""Traced forwards: one TorchScript graph per input signature, run in one call that releases the GIL.

Called eagerly, a network dispatches hundreds of small ops from Python per forward and takes the GIL back after each.
In the server the event loop and the decode thread are Python threads too: whenever one of them holds the GIL, the
worker waits at its next op. A Python thread spinning beside the tiny SD UNet made its eager forward 140x slower
here, and its traced forward 4.7x (7.2 ms alone; benchmarks/studies/text_pipeline.py measures the server).

torch.jit.trace records the ops once per signature: the devices, the dtypes and the shapes past the batch. The batch
size stays free, since diffusers' networks read it from the tensors. Their one Python branch on it, Upsample2D's
`.contiguous()` for 64 rows or more, changes no value. The graphs share the network's parameters. They run in
TorchScript's plain interpreter (no fusion, no re-specialisation), so they compute what the eager call computes, op
for op. Each new trace is checked against the eager call on the inputs it was traced with. A trace that fails or
differs is logged, and its signature runs eagerly from then on.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
Call = Callable[..., torch.Tensor]  # call(net, *tensors, **named tensors) -> tensor
Signature = tuple[object, ...]
SIGNATURES_KEPT = 64  # sizes a model is asked for; past it the graphs are dropped and traced again on demand


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
        self._lock = threading.Lock()

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
        with self._lock:
            if key in self._graphs:
                return
            if len(self._graphs) >= SIGNATURES_KEPT:
                self._graphs.clear()
            graph: torch.jit.ScriptModule | None = None
            inputs = (*args, *named.values())
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    # torch.jit.trace warns that TorchScript is deprecated (the fallback below is eager)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    bound = _Bound(self.net, self.call, len(args), tuple(named))
                    graph = torch.jit.trace(bound, inputs, check_trace=False)
                if not all(_agrees(graph, bound, inputs, scale) for scale in (1.0, 0.5)):
                    log.warning("%s: the traced forward differs from the eager one for inputs %s; running those "
                                "eagerly", self.name, _shapes(args, named))
                    graph = None
            except Exception as e:
                log.warning("%s: cannot trace the forward for inputs %s (%s: %s); running those eagerly", self.name,
                            _shapes(args, named), type(e).__name__, e)
                graph = None
            self._graphs[key] = graph


def _agrees(graph: torch.jit.ScriptModule, bound: _Bound, inputs: tuple[torch.Tensor, ...], scale: float) -> bool:
    """Whether the graph computes what the eager call does on the inputs with their floating-point values scaled
    (0.5: other values than those it was traced on, so that a value the trace froze shows)."""
    inputs = tuple(v * scale if v.is_floating_point() else v for v in inputs)
    eager = bound(*inputs)
    with torch.jit.optimized_execution(False):
        traced = graph(*inputs)
    return torch.allclose(traced, eager, rtol=1e-4, atol=1e-5 * float(eager.abs().max()))


def _shapes(args: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                     for k, v in [*enumerate(args), *named.items()])
