"""Conditioners: a prompt (or a class) -> the per-row tensors a pipeline's denoiser takes as cond.

A Cond maps a keyword of the denoiser's forward to a tensor whose first dimension is the rows; rows of any requests
of one model stack along it. Text is encoded as diffusers' pipelines encode it (tokenised to the tokenizer's
model_max_length, truncated and padded; Stable Diffusion 1.x/2.x: CLIP's last hidden state; SD3: both CLIP encoders'
penultimate hidden states side by side, zero-padded to the transformer's joint width, then T5's 256 tokens, zeros
where the folder has no T5, and the two pooled projections), with an LRU cache of encodings keyed by text.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Cond = dict[str, torch.Tensor]
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length


@dataclass(frozen=True)
class Encoded:
    """Encodings [n, ...] of n texts; misses: the distinct texts encoded, hits: the others (cached, or repeated),
    and the seconds spent encoding."""

    cond: Cond
    hits: int
    misses: int
    seconds: float


def take(cond: Cond, rows: torch.Tensor | list[int]) -> Cond:
    """The rows of a Cond."""
    idx = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.long)
    return {k: v.index_select(0, idx.to(v.device)) for k, v in cond.items()}


def cat(*conds: Cond) -> Cond:
    """Conds stacked along their rows (all with the same keys)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class TextConditioner:
    """CLIP text encoders (and SD3's optional T5) with their tokenizers, in the server's dtype."""

    def __init__(self, style: Literal["sd", "sd3"], encoders: list[tuple[Any, torch.nn.Module]], *,
                 device: torch.device, joint_dim: int | None = None, t5: tuple[Any, torch.nn.Module] | None = None,
                 cache_size: int = 256) -> None:
        self.style, self.encoders, self.t5, self.device = style, encoders, t5, device
        self.joint_dim = joint_dim
        self.token_limit = int(encoders[0][0].model_max_length)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Cond] = OrderedDict()
        self._truncated: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Lock()
        # a fast (Rust) tokenizer keeps its padding and truncation as state that each call sets: the routes'
        # truncated() and the worker's padded encode must not interleave, or an unpadded encoding (7 tokens, not 77)
        # reaches the cache and every later batch with that text fails to concatenate
        self._tokenizing = threading.Lock()

    def truncated(self, text: str) -> bool:
        """Whether the text is longer than the first tokenizer's limit (the part past it is dropped, as diffusers
        drops it); the last cache_size texts' answers are kept, so that a repeated prompt is not tokenized again."""
        with self._lock:
            if text in self._truncated:
                self._truncated.move_to_end(text)
                return self._truncated[text]
        with self._tokenizing:
            cut = len(self.encoders[0][0](text).input_ids) > self.token_limit
        with self._lock:
            self._truncated[text] = cut
            if len(self._truncated) > self.cache_size:
                self._truncated.popitem(last=False)
        return cut

    def encode(self, texts: list[str]) -> Encoded:
        """Encodings of texts [n, ...]; the texts not cached are encoded in one forward of each encoder."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))  # each encoded once
        hits = len(texts) - len(missing)
        seconds = 0.0
        fresh: dict[str, Cond] = {}
        if missing:
            started = time.perf_counter()
            out = self._forward(missing)
            seconds = time.perf_counter() - started
            fresh = {t: take(out, [i]) for i, t in enumerate(missing)}
        with self._lock:
            for t, c in fresh.items():
                self._cache[t] = c
            rows = [fresh.get(t) or self._cache[t] for t in texts]
            for t in texts:
                if t in self._cache:
                    self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return Encoded(cat(*rows), hits, len(texts) - hits, seconds)

    def _ids(self, tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
        with self._tokenizing:
            ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self.device)

    def _forward(self, texts: list[str]) -> Cond:
        with torch.inference_mode():
            if self.style == "sd":
                tokenizer, encoder = self.encoders[0]
                hidden = encoder(self._ids(tokenizer, texts, self.token_limit))[0]
                return {"encoder_hidden_states": hidden}
            hidden, pooled = [], []
            for tokenizer, encoder in self.encoders:
                out = encoder(self._ids(tokenizer, texts, self.token_limit), output_hidden_states=True)
                pooled.append(out[0])
                hidden.append(out.hidden_states[-2])
            clip = torch.cat(hidden, dim=-1)
            assert self.joint_dim is not None
            t5 = self._t5(texts, clip.dtype)
            clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
            return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                    "pooled_projections": torch.cat(pooled, dim=-1)}

    def _t5(self, texts: list[str], dtype: torch.dtype) -> torch.Tensor:
        """T5's embeddings, or zeros of their shape where the folder has no T5 (as StableDiffusion3Pipeline)."""
        assert self.joint_dim is not None
        if self.t5 is None:
            return torch.zeros((len(texts), T5_TOKENS, self.joint_dim), device=self.device, dtype=dtype)
        tokenizer, encoder = self.t5
        with self._tokenizing:
            ids = tokenizer(texts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return encoder(ids)[0].to(dtype)
