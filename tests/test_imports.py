"""The import graph of ``lorafleet`` has no cycles and no upward edges.

Every ``import`` counts, wherever it is written: at the top of a module or inside a
function (a function-level import that closes a cycle only hides it until the function
runs). Imports under ``if TYPE_CHECKING:`` never run and do not count.

``components/`` and ``pipelines/`` install as ``lorafleet.components`` and
``lorafleet.pipelines`` (pyproject.toml), so they are read under those names.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's sources live in the checkout.
SOURCES = {
    "lorafleet": ROOT / "lorafleet",
    "lorafleet.components": ROOT / "components",
    "lorafleet.pipelines": ROOT / "pipelines",
}

# A layer may import only from the layers listed for it (and itself); anything not listed
# here (the CLI, commands, stages, components, pipelines) sits on top and may import all.
LOWER_LAYERS = {
    # The spec checks data locations and object stores with the storage layer's parser.
    "lorafleet.fleet": {"lorafleet.errors", "lorafleet.storage", "lorafleet.tasks"},
    # The metric library, the safety rules and the shipped task files know no other layer.
    "lorafleet.tasks": {"lorafleet.errors"},
    "lorafleet.storage": {"lorafleet.errors", "lorafleet.io"},
    "lorafleet.engine": {"lorafleet.errors", "lorafleet.fleet"},
    "lorafleet.evaluate": {
        "lorafleet.errors",
        "lorafleet.fleet",
        "lorafleet.engine",
        "lorafleet.batches",
        "lorafleet.chat",
        "lorafleet.records",
        "lorafleet.io",
        "lorafleet.llm",
        "lorafleet.tasks",
    },
}


def _module_names() -> dict[str, Path]:
    """Every module's dotted name -> its file."""
    names = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            names[".".join((package, *rel))] = path
    return names


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (skipping ``if TYPE_CHECKING:`` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, known: set[str]) -> set[str]:
    """The lorafleet modules an import statement loads (``from pkg import mod`` included)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = module.split(".")[: -node.level]
            base = ".".join([*parent, base] if base else parent)
        candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
    return {name for name in candidates if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the lorafleet modules it imports at run time."""
    modules = _module_names()
    known = set(modules)
    return {
        name: set().union(
            *(_targets(n, name, known) for n in _runtime_imports(ast.parse(path.read_text())))
        )
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> str | None:
    return next(
        (lay for lay in LOWER_LAYERS if module == lay or module.startswith(lay + ".")), None
    )


def test_the_checker_sees_a_cycle_through_a_function_level_import() -> None:
    # The checker itself: a cycle closed inside a function, and one only under TYPE_CHECKING.
    a = ast.parse("import lorafleet.b\n")
    b = ast.parse("def f():\n    from lorafleet import a\n")
    c = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lorafleet.a\n")
    known = {"lorafleet.a", "lorafleet.b", "lorafleet.c"}
    graph = {
        name: set().union(*(_targets(n, name, known) for n in _runtime_imports(tree)))
        for name, tree in (("lorafleet.a", a), ("lorafleet.b", b), ("lorafleet.c", c))
    }
    assert graph == {
        "lorafleet.a": {"lorafleet.b"},
        "lorafleet.b": {"lorafleet.a"},
        "lorafleet.c": set(),
    }
    assert cycles(graph) == [["lorafleet.a", "lorafleet.b"]]


def test_lorafleet_has_no_import_cycles() -> None:
    graph = import_graph()
    assert "lorafleet.fleet.loader" in graph and "lorafleet.pipelines.fleet_pipeline" in graph
    assert cycles(graph) == []


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_never_import_higher_ones(layer: str) -> None:
    graph = import_graph()
    members = [m for m in graph if _layer(m) == layer]
    assert members, f"no module in layer {layer}"
    allowed = LOWER_LAYERS[layer]
    upward = sorted(
        f"{m} -> {t}"
        for m in members
        for t in graph[m]
        if _layer(t) != layer and not any(t == a or t.startswith(a + ".") for a in allowed)
    )
    assert upward == []
