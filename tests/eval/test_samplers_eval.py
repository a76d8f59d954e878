"""The sampler table's results survive a run of one model (kept as JSON), and the doc says what holds."""

from __future__ import annotations

from pathlib import Path

from app.eval.samplers import SamplerEvalConfig, SamplerResults, write


def _results() -> SamplerResults:
    fid = {("unconditional", s, n): v for (s, n), v in {
        ("ddim", 10): 9.0, ("ddim", 20): 6.0, ("ddim", 50): 4.0, ("dpmsolver++", 10): 5.5, ("dpmsolver++", 20): 4.05,
        ("dpmsolver++", 50): 3.9, ("unipc", 10): 5.0, ("unipc", 20): 4.5, ("unipc", 50): 3.8}.items()}
    return SamplerResults("fashion-mnist", 500, (10, 20, 50), fid, (0.7, 0.1), 60.0, "python -m x", 7750)


def test_results_round_trip_through_json() -> None:
    r = _results()
    assert SamplerResults.from_json(r.to_json()) == r


def test_the_doc_names_the_target_and_the_fastest_match(tmp_path: Path) -> None:
    text = write([_results()], SamplerEvalConfig(steps=(10, 20, 50)), "", tmp_path / "q.md")
    assert "Weights after 7,750 optimiser steps. Made in 1 min by `python -m x`." in text
    assert "dpmsolver++ at S = 10 (5.50) is at least as good as ddim at S = 20 (6.00)" in text
    assert "Fewest steps within 2 % of ddim's S = 50 FID (4.00) on fashion-mnist: dpmsolver++ at S = 20 (4.05)" in text
