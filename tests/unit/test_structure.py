"""The package's shape, as DESIGN.md draws it: floors whose imports point one way (down), no
import circle, small files, and model code that knows nothing of processes."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
# top to bottom (the package itself first): a module may import its own floor and the floors below it
FLOORS = ("tensorpar", "__main__", "cli", "bench", "serve", "vllm", "runtime", "train", "planner", "loading", "plans", "models",
          "layers", "distributed", "partition", "dtypes", "process", "errors")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "tensorpar").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the tensorpar modules it imports anywhere in its text (lazy imports included)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names += [base] + [f"{base}.{a.name}" for a in node.names]
        targets = {resolve(n) for n in names if n.startswith("tensorpar")}
        edges[module] = {t for t in targets if t and t != module and t != "tensorpar" and not module.startswith(t + ".")}
    return edges


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_the_floors_and_never_in_a_circle():
    edges = _imports(_modules())
    rank = {f: i for i, f in enumerate(FLOORS)}
    unknown = {_floor(m) for m in edges} - set(rank)
    assert not unknown, f"modules outside every floor: {unknown} (add the floor to FLOORS and DESIGN.md)"
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                    if rank[_floor(b)] < rank[_floor(a)])
    assert upward == []
    assert _cycles(edges) == []


def test_model_code_imports_no_distributed_code():
    edges = _imports(_modules())
    assert sorted(f"{a} -> {b}" for a, targets in edges.items() if _floor(a) == "models"
                  for b in targets if _floor(b) == "distributed") == []


def test_no_source_file_is_longer_than_the_limit():
    long = {str(p.relative_to(SRC)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_sees_what_it_checks():
    edges = _imports(_modules())
    assert "tensorpar.distributed.collectives" in edges["tensorpar.layers.linear"]
    assert "tensorpar.runtime.scheduler" in edges["tensorpar.runtime.engine_core"]
    assert len(edges) > 100
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
