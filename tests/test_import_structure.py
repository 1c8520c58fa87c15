"""The package's modules import in one direction: no import circle between r1engine's modules, whether the imports
are at module level or inside functions (a function-level import that only dodges a circle is still a circle), and
the modules that used to be in circles import first in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Modules that were in circles (models.policy <-> models.decode_step <-> models.checkpoint; ops.varlen_attention <->
# packing.attention) and the ones split out to break them.
FIRST_IMPORTS = [
    "r1engine.models.checkpoint",
    "r1engine.models.decode_step",
    "r1engine.models.policy",
    "r1engine.models.layers",
    "r1engine.models.kv_cache",
    "r1engine.ops.varlen_attention",
    "r1engine.packing.attention",
    "r1engine.packing",
    "r1engine.settings",
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "r1engine").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        mods["r1engine.kernels" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """module -> the r1engine modules it imports anywhere in its code except under `if TYPE_CHECKING:` (a
    package that is one of the importer's own ancestors is left out: importing a submodule of it is no circle)."""
    mods = _modules()

    def known(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    def imports(name: str, path: Path) -> set[str]:
        edges: set[str] = set()
        package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parent = package[: len(package) - (child.level - 1)]
                        base = ".".join([*parent, base] if base else parent)
                    targets = [base, *(f"{base}.{a.name}" for a in child.names)]
                for target in targets:
                    found = known(target)
                    if found is None:
                        continue
                    parts = found.split(".")
                    for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
                        mod = ".".join(parts[:i])
                        if mod in mods and mod != name and not name.startswith(mod + "."):
                            edges.add(mod)
                visit(child)

        visit(ast.parse(path.read_text()))
        return edges

    return {name: imports(name, path) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_analysis_sees_the_imports():
    graph = _import_graph()
    assert "r1engine.models.layers" in graph["r1engine.models.policy"]
    assert "r1engine.ops.varlen_attention" in graph["r1engine.packing.attention"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(_import_graph()) == []


@pytest.mark.parametrize("module", FIRST_IMPORTS)
def test_module_imports_first_in_a_fresh_interpreter(module):
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
