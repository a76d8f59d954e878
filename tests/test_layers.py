"""Imports point one way, api -> engine -> startup/models -> sampling, with no circle; the API reaches the sampling
math only through the engine; benchmarks import nothing from the tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each layer may import only the layers after it in this order (app.config, app.metrics, app.images, app.logs are
# shared leaves any layer may use)
ORDER = ["app.api", "app.engine", "app.startup", "app.models", "app.sampling"]


def imports(path: Path, runtime: bool = False) -> set[str]:
    """The app.* / tests.* modules a file imports; runtime: leave out those under `if TYPE_CHECKING:`, which
    annotate and never run (they count for the layers, not for circles)."""
    tree = ast.parse(path.read_text())
    if runtime:
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("app", "tests")}


def module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int | None:
    return next((i for i, prefix in enumerate(ORDER) if name == prefix or name.startswith(prefix + ".")), None)


def test_no_layer_imports_a_layer_above_it() -> None:
    wrong = []
    for path in (ROOT / "app").rglob("*.py"):
        here = layer(module(path))
        for dep in imports(path):
            there = layer(dep)
            if here is not None and there is not None and there < here:
                wrong.append(f"{module(path)} imports {dep}")
            if module(path).startswith("app.api") and dep.startswith("app.sampling"):
                wrong.append(f"{module(path)} imports {dep} (the API reaches the math only through the engine)")
    assert not wrong, wrong


def test_no_import_circle_between_app_modules() -> None:
    files = (ROOT / "app").rglob("*.py")
    graph = {module(p): {d for d in imports(p, runtime=True) if d.startswith("app")} for p in files}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            dep = dep if dep in graph else dep.rsplit(".", 1)[0]  # `from app.x import name`: the module app.x
            if state.get(dep) == 1 and dep != node:
                raise AssertionError(f"import circle: {' -> '.join([*trail, node, dep])}")
            if dep in graph and state.get(dep) is None:
                visit(dep, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if state.get(name) is None:
            visit(name, [])


def test_benchmarks_import_nothing_from_tests() -> None:
    found = [f"{p.relative_to(ROOT)}: {d}" for p in (ROOT / "benchmarks").rglob("*.py") for d in imports(p)
             if d.startswith("tests")]
    assert not found, found
