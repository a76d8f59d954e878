"""The text conditioner under threads: the routes ask truncated() on the event loop while the worker encodes, and a
fast tokenizer keeps its padding as state that each call sets. Interleaved, an unpadded encoding reached the prompt
cache, and every later batch with that prompt failed to concatenate (found by profiling the served text bench)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.models import load_model


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_encodings_stay_padded_while_another_thread_checks_truncation(pipeline_store: Path, name: str) -> None:
    conditioner = load_model(pipeline_store / name).conditioner
    assert conditioner is not None
    stop, checked = threading.Event(), [0]

    def check() -> None:
        while not stop.is_set():
            assert not conditioner.truncated(f"a photo of a dog {checked[0]}")  # new texts: each is tokenized
            checked[0] += 1

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    try:
        lengths = set()
        for i in range(300):
            conditioner._cache.clear()  # encode afresh each time: what a new prompt costs
            lengths.add(conditioner.encode([f"a photo of a cat {i}", ""]).cond["encoder_hidden_states"].shape[1])
    finally:
        stop.set()
        checker.join(10)
    assert checked[0] > 0
    assert lengths == {conditioner.token_limit + (256 if name == "sd3" else 0)}  # sd3: T5's 256 zero rows


def test_truncation_answers_are_kept_for_repeated_prompts(pipeline_store: Path) -> None:
    conditioner = load_model(pipeline_store / "sd", prompt_cache_size=3).conditioner
    assert conditioner is not None
    long = " ".join(["cat"] * (conditioner.token_limit + 5))
    calls = [0]
    tokenizer = conditioner.encoders[0][0]
    real = type(tokenizer).__call__

    class Counting(type(tokenizer)):  # type: ignore[misc]
        def __call__(self, *a, **k):
            calls[0] += 1
            return real(self, *a, **k)

    tokenizer.__class__ = Counting
    assert conditioner.truncated(long) and not conditioner.truncated("a cat")
    assert calls[0] == 2
    assert conditioner.truncated(long) and not conditioner.truncated("a cat")
    assert calls[0] == 2  # kept
    for i in range(3):
        conditioner.truncated(f"a dog {i}")
    assert len(conditioner._truncated) == 3 and calls[0] == 5  # bounded by the cache size, oldest out
    assert conditioner.truncated(long) and calls[0] == 6
