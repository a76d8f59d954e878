"""The stages around the stepping, per model: conditioning when a job is admitted, decoding when it finishes.

- condition: a job's class labels become per-row cond tensors as they are; its texts (prompts, and negative prompts
  when guided) go through the model's conditioner, the texts of all jobs admitted together in one call, whose LRU
  cache skips the encoder for texts seen before;
- decode: the final latents of the jobs finishing on one step, one codec call per sample shape.
Each returns the jobs it could not serve, with a message; the worker fails those jobs only.
"""

from __future__ import annotations

import logging
import time

import torch

from app.engine.jobs import SampleJob
from app.metrics import Metrics
from app.models import LoadedModel
from app.models.conditioning import take

log = logging.getLogger(__name__)


class Stages:
    def __init__(self, model: LoadedModel, metrics: Metrics) -> None:
        self.model = model
        name = model.name
        self._hits = metrics.prompt_cache.labels(name, "hit")
        self._misses = metrics.prompt_cache.labels(name, "miss")
        self._encode_seconds = metrics.encode_seconds.labels(name)
        self._decode_seconds = metrics.decode_seconds.labels(name)

    def condition(self, jobs: list[SampleJob]) -> dict[SampleJob, str]:
        """Set each new job's cond, and its uncond when guided."""
        todo = [j for j in jobs if j.cond is None]
        texts = [j for j in todo if j.texts is not None]
        for j in todo:
            if j.texts is None:
                j.cond = self.model.label_cond(j.class_labels, j.n)
                j.uncond = self.model.label_cond(None, j.n) if j.guided else None
        if not texts:
            return {}
        conditioner = self.model.conditioner
        try:
            if conditioner is None:
                raise ValueError(f"model {self.model.name!r} has no text encoder")
            encoded = conditioner.encode([t for j in texts for t in [*(j.texts or []), *(j.negative_texts or [])]])
        except Exception as e:
            log.error("encoding prompts failed on model %s (%s: %s)", self.model.name, type(e).__name__, e,
                      exc_info=e)
            message = f"encoding the prompts failed on model {self.model.name!r} ({type(e).__name__}: {e})"
            return dict.fromkeys(texts, message)
        self._hits.inc(encoded.hits)
        self._misses.inc(encoded.misses)
        if encoded.misses:
            self._encode_seconds.observe(encoded.seconds)
        k = 0
        for j in texts:
            j.cond, k = take(encoded.cond, list(range(k, k + j.n))), k + j.n
            if j.negative_texts is not None:
                j.uncond, k = take(encoded.cond, list(range(k, k + j.n))), k + j.n
        return {}

    def decode(self, jobs: list[SampleJob]) -> dict[SampleJob, str]:
        """Set each job's images: its final samples decoded, together with the other jobs of the same shape."""
        codec, failed = self.model.codec, dict[SampleJob, str]()
        if not jobs or codec is None:
            return {}
        for shape in dict.fromkeys(tuple(j.out.shape[1:]) for j in jobs):
            group = [j for j in jobs if tuple(j.out.shape[1:]) == shape]
            started = time.perf_counter()
            try:
                images = codec.decode(torch.cat([j.out for j in group]))
            except Exception as e:
                log.error("decoding failed on model %s (%s: %s)", self.model.name, type(e).__name__, e, exc_info=e)
                failed |= dict.fromkeys(group, f"decoding the latents failed on model {self.model.name!r} "
                                               f"({type(e).__name__}: {e})")
                continue
            self._decode_seconds.observe(time.perf_counter() - started)
            for j, part in zip(group, torch.split(images, [j.n for j in group])):
                j.images = part
        return failed
