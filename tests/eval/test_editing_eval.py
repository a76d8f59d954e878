"""The editing measurement's report: its tables replace what lies between docs/editing.md's markers, and nothing
else (the sampling it runs is the engine's, checked in tests/engine/test_editing.py)."""

from __future__ import annotations

from pathlib import Path

from app.eval.editing import END, PAIRS, START, EditEvalConfig, EditResults, results_markdown, write_results
from app.train.data import CLASSES


def test_results_fill_the_marked_block(tmp_path: Path) -> None:
    cfg = EditEvalConfig(n=2, strengths=(0.5, 1.0))
    metrics = {"success": 0.9, "mse": 0.01, "feature_distance": 2.0}
    r = EditResults(edit={f"{CLASSES[s]}->{CLASSES[t]}@{x:g}": metrics for s, t in PAIRS for x in (0.5, 1.0)}
                    | {f"all@{x:g}": metrics for x in (0.5, 1.0)},
                    img2img={f"{x:g}": {"mse": 0.1, "feature_distance": 3.0, "kept_class": 0.5} for x in (0.5, 1.0)})
    block = results_markdown(r, cfg, "python -m app.eval.editing --n 2", "img/a.png", "img/b.png")
    assert "| 0.5 | 25 | 90% | 0.0100 | 2.00 |" in block and "Sneaker → Sandal" in block
    assert "yes, from strength 0.5" in block
    doc = tmp_path / "editing.md"
    doc.write_text(f"# prose\n\n{START}\nold\n{END}\n\nmore prose\n")
    write_results(doc, block)
    text = doc.read_text()
    assert "old" not in text and block in text and text.startswith("# prose") and text.endswith("more prose\n")
