"""The package reads one way, bottom up: no import cycle (function-level imports included), and the core never imports the application layer."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_lowrank

ROOT = Path(hf_lowrank.__file__).parent
# The application layer (recipes, reports, the CLI): it imports the core, never the other way.
APPLICATION = {"options", "recipe", "recipe_build", "results", "report", "plots", "cli", "data", "speed", "metrics"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """hf_lowrank modules ``name`` imports anywhere in its file (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            # `from . import optim` imports a module; `from . import __version__` the package itself
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # Every edge counts, to the package facades too: `from . import optim` is an edge to
    # hf_lowrank.optim, `from . import __version__` one to hf_lowrank (which imports config).
    return {n: imports_of(n, p, known) for n, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def layer_of(name: str) -> str:
    return "application" if name.split(".")[1:2] and name.split(".")[1] in APPLICATION else "core"


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_never_imports_the_application_layer():
    bad = sorted(
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if a != "hf_lowrank" and layer_of(a) == "core" and layer_of(b) == "application"
    )
    assert not bad, bad


def test_the_checker_sees_function_level_imports(tmp_path):
    """The walk must not miss an import hidden in a function body (a circle the old config had)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from .model import LowRankModel\n    return LowRankModel\n")
    assert imports_of("hf_lowrank.config", path, {"hf_lowrank.model", "hf_lowrank.config"}) == {"hf_lowrank.model"}
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
