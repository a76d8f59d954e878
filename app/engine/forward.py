"""One step's forward over the active batch: the engine's only call into a model, model.eps(x, t, cond).

Rows of each sample shape (latent size) run as one forward; a guided sample adds its unconditional row to the same
forward, and its prediction is combined in prediction space (sampling.guide) before the update.
"""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F

from app.engine.batch import ActiveBatch
from app.models import LoadedModel
from app.models.conditioning import Cond, cat, take
from app.sampling import guide


def predict(model: LoadedModel, batch: ActiveBatch, x: torch.Tensor, t: torch.Tensor,
            idx: torch.Tensor | None) -> torch.Tensor:
    """The predictions [B, width] of rows idx (x flattened as the batch keeps it): one forward per sample
    shape, each row viewed in its own shape."""
    cond, uncond, guided, w = batch.conditioning(idx)
    groups = batch.rows_by_shape(idx)
    if len(groups) == 1:
        return _predict_shape(model, groups[0][0], x, t, cond, uncond, guided, w)
    out = torch.zeros_like(x)
    for shape, sel in groups:
        assert sel is not None
        part = _predict_shape(model, shape, x.index_select(0, sel), t.index_select(0, sel), take(cond, sel),
                              take(uncond, sel), guided.index_select(0, sel), w.index_select(0, sel))
        out = out.index_copy(0, sel.to(out.device), part.to(out.dtype))
    return out


def _predict_shape(model: LoadedModel, shape: tuple[int, ...], x: torch.Tensor, t: torch.Tensor, cond: Cond,
                   uncond: Cond, guided: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One forward over rows of one shape; a guided sample adds its unconditional row to the same forward, and
    its prediction is uncond + w (cond - uncond)."""
    width, numel = x.shape[1], prod(shape)
    xs = x[:, :numel].reshape(-1, *shape)
    if not bool(guided.any()):
        out = model.eps(xs, t, cond)
    else:
        g = guided.nonzero().squeeze(1)
        both = cat(cond, take(uncond, g))
        full = model.eps(torch.cat([xs, xs.index_select(0, g)]), torch.cat([t, t.index_select(0, g)]), both)
        c, u = full[:len(xs)], full[len(xs):]
        gd = g.to(c.device)
        out = c.index_copy(0, gd, guide(c.index_select(0, gd), u, w.index_select(0, g)))
    out = out.flatten(1)
    return out if numel == width else F.pad(out, (0, width - numel))
