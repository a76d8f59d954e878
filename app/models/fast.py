"""Fast paths for the eps-network forward, each a setting, each checked against the plain path.

- channels_last memory format;
- reduced precision (bfloat16 / float16 weights and inputs; the sampler math stays float32);
- torch.compile for fixed batch buckets, compiled at warm-up within a time budget (batches are
  padded up to the next compiled bucket; sizes not compiled in time run eagerly, never stall).
  On CUDA mode="reduce-overhead" records a CUDA graph per bucket.
The CUDA path (pinned host buffers, non-blocking copies, CUDA graphs) is written but untested here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DModel

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 pays off on CUDA with bf16 support and on CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


class Forward:
    """unet(x, t).sample with the chosen fast paths; call it with float32 x on any device."""

    def __init__(self, unet: UNet2DModel, device: torch.device, dtype: torch.dtype, *,
                 channels_last: bool = False) -> None:
        self.unet, self.device, self.dtype = unet, device, dtype
        self.channels_last = False
        self.use_channels_last(channels_last)
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.buckets: tuple[int, ...] = ()

    def use_channels_last(self, on: bool) -> None:
        self.unet = self.unet.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.channels_last = on

    def time_layouts(self, batch: int, sample_shape: tuple[int, int, int], rounds: int = 5,
                     min_seconds: float = 0.05) -> dict[bool, list[float]]:
        """Seconds per forward at this batch size in each layout (channels_last: False, True), one value per round.

        The rounds alternate which layout goes first (A B, B A, A B, ...), so that a drift in the machine's speed
        falls on both alike. In a round each layout gets an untimed call (the first after a switch pays for new
        allocations), then timed calls until min_seconds have passed. Run it in a process of its own
        (app.startup.layout, which says why)."""
        x, t = torch.randn(batch, *sample_shape), torch.full((batch,), 500)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):
                self.use_channels_last(on)
                self._synced(x, t)  # untimed; done before the clock starts
                calls, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < min_seconds or not calls:
                    self._synced(x, t)
                    calls += 1
                times[on].append(elapsed / calls)
        return times

    def _synced(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self(x, t)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _eager(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=class_labels).sample

    def _labels(self, b: int, class_labels: torch.Tensor | None) -> torch.Tensor | None:
        """A conditional UNet's labels on the device; without any, the null label (its last class row)."""
        n = self.unet.config.num_class_embeds
        if n is None:
            return None
        if class_labels is None:
            class_labels = torch.full((b,), int(n) - 1, dtype=torch.long)
        return class_labels.to(self.device, torch.long, non_blocking=True)

    def compile(self, max_batch_size: int, budget_seconds: float, sample_shape: tuple[int, int, int],
                buckets: list[int] | None = None) -> list[int]:
        """Compile and warm one graph per bucket up to max_batch_size, largest first, within the budget."""
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        fn = torch.compile(self._eager, dynamic=False, mode=mode)
        wanted = buckets or [b for b in DEFAULT_BUCKETS if b < max_batch_size] + [max_batch_size]
        done: list[int] = []
        deadline = time.monotonic() + budget_seconds
        for b in sorted(wanted, reverse=True):
            if time.monotonic() >= deadline:
                log.warning("compile budget spent; batch sizes %s stay eager", sorted(set(wanted) - set(done)))
                break
            started = time.monotonic()
            x = torch.zeros(b, *sample_shape, device=self.device, dtype=self.dtype)
            with torch.inference_mode():
                for _ in range(2 if self.device.type == "cuda" else 1):
                    fn(self._layout(x), torch.full((b,), 500, device=self.device), self._labels(b, None))
            done.append(b)
            log.info("compiled batch %d in %.1f s", b, time.monotonic() - started)
        self.compiled, self.buckets = fn, tuple(sorted(done))
        return list(self.buckets)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] (any dtype/device), t [B], class_labels [B] (conditional models) -> float32 output on
        self.device."""
        b = x.shape[0]
        x = self._layout(x.to(self.device, self.dtype, non_blocking=True))
        t = t.to(self.device, non_blocking=True)
        y = self._labels(b, class_labels)
        with torch.inference_mode():
            bucket = next((s for s in self.buckets if s >= b), None)
            if self.compiled is None or bucket is None:
                return self._eager(x, t, y).float()
            if bucket > b:  # pad to the compiled size; the extra rows are dropped
                x = torch.cat([x, x.new_zeros(bucket - b, *x.shape[1:])])
                t = torch.cat([t, t.new_full((bucket - b,), float(t[0]))])
                y = None if y is None else torch.cat([y, y.new_full((bucket - b,), int(y[0]))])
            return self.compiled(self._layout(x), t, y)[:b].float()
