"""A short seeded schema-fuzzing run (the full one is `make fuzz`): no server error, every response as documented."""

from __future__ import annotations

from tests.fuzz import cases, fuzz


def test_a_short_seeded_fuzz_finds_nothing() -> None:
    code, output = fuzz(examples=8, seed=7)
    generated, passed = cases(output)
    assert code == 0, output[-4000:]
    assert generated >= 200 and passed == generated, output[-2000:]
