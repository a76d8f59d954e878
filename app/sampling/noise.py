"""The seed contract: image i of a request with seed s draws everything from
torch.Generator("cpu").manual_seed(s + i) -- first x_T, then one noise tensor per step when
eta > 0 or variance is "large", in step order. Each image is reproducible on its own,
whatever batch it ran in.
"""

from __future__ import annotations

import torch


def sample_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image: seeds seed, seed + 1, ..., seed + n - 1."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def draw(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One draw of shape (1, *shape) from each generator, stacked to [n, *shape] (float32, CPU)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


def is_stochastic(eta: float, large: bool) -> bool:
    """Whether a generation run draws noise at each step (and so needs the per-sample generators)."""
    return eta > 0 or large
