"""Imports point one way, api -> engine -> startup/models -> sampling, with no circle; the API reaches the sampling
math only through the engine; benchmarks import nothing from the tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each layer may import only the layers after it in this order (app.config, app.metrics, app.images, app.logs are
# shared leaves any layer may use)
ORDER = ["app.api", "app.engine", "app.startup", "app.models", "app.sampling"]


def imports(path: Path) -> set[str]:
    """The app.* / tests.* / benchmarks.* modules a file imports, those under `if TYPE_CHECKING:` included."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("app", "tests", "benchmarks")}


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


def _circle(graph: dict[str, set[str]]) -> None:
    """Raise AssertionError naming the first import circle of graph (module -> the modules it imports)."""
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


def test_no_import_circle_between_app_modules() -> None:
    """Type-checking imports count too: a module that needs another's type for its own annotations while the other
    imports it is a circle all the same (issue 24 found client <-> tasks)."""
    files = (ROOT / "app").rglob("*.py")
    _circle({module(p): {d for d in imports(p) if d.startswith("app")} for p in files})


def test_no_import_circle_between_benchmark_modules() -> None:
    files = (ROOT / "benchmarks").rglob("*.py")
    _circle({module(p): {d for d in imports(p) if d.startswith("benchmarks")} for p in files})


def test_benchmarks_import_nothing_from_tests() -> None:
    found = [f"{p.relative_to(ROOT)}: {d}" for p in (ROOT / "benchmarks").rglob("*.py") for d in imports(p)
             if d.startswith("tests")]
    assert not found, found
