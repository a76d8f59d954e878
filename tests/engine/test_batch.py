"""The running batch's coefficient table: what step_coefficients gives at each step, bit for bit."""

from __future__ import annotations

import pytest
import torch

from app.engine.batch import COEFFICIENTS, coefficient_table
from app.sampling import step_coefficients
from app.sampling.step import StepCoefficients


@pytest.mark.parametrize("eta,large", [(0.0, False), (0.5, False), (1.0, True)])
def test_the_table_holds_each_steps_coefficients_bit_for_bit(eta: float, large: bool) -> None:
    g = torch.Generator().manual_seed(0)
    width, steps = 7, torch.tensor([7, 4, 1])
    alpha = torch.sort(torch.rand(3, width + 1, generator=g, dtype=torch.float64), dim=1).values
    alpha[:, -1] = 1.0  # the clean end
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    for r, n in enumerate(steps.tolist()):  # zero past each row's own levels, as the batch pads them
        a[r, n + 1:], s[r, n + 1:] = 0, 0
    eta_t, large_t = torch.full((3,), eta, dtype=torch.float64), torch.full((3,), large)
    table = coefficient_table(a, s, steps, eta_t, large_t)
    assert table.shape == (3, COEFFICIENTS, width)
    for r, n in enumerate(steps.tolist()):
        for k in range(n):
            one = step_coefficients(a[r, k:k + 1], s[r, k:k + 1], a[r, k + 1:k + 2], s[r, k + 1:k + 2],
                                    eta_t[r:r + 1], large_t[r:r + 1])
            want = torch.cat([getattr(one, f) for f in StepCoefficients.__dataclass_fields__])
            assert torch.equal(table[r, :, k], want), (r, k)
        assert not table[r, :, n:].any() and torch.isfinite(table).all()
