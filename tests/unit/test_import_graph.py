"""The shape of the import graph, read from the source with ``ast``: every ``import`` counts,
at module level or inside a function, so an import put off until a call still shows.

The floors, top to bottom, each importing only the floors below it:

* ``app`` — the application: lifecycle, signals and the command line;
* ``consumers`` and ``door`` — the edge: Kafka, and the HTTP door, side by side (neither
  imports the other);
* ``service`` — the core (context, policies, llm, learning) with storage at its bottom.

The tools stand beside them — ``evaluation`` (record, bench, off-policy estimates) and
``producers`` (publishers, the demo) — and use the floors; no floor imports a tool, except the
command line, which offers every sub-command and tells their failures. No two modules import
each other, directly or round a longer loop."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "consumers", "door", "service", "evaluation", "producers")
#: each floor and what it may import of the packages (besides itself)
FLOORS = {
    "app": {"consumers", "door", "service"},
    "consumers": {"service"},
    "door": {"service"},
    "service": set(),
}
TOOLS = {"evaluation", "producers"}
#: the modules of a floor that may import the tools: the command line, which offers their
#: sub-commands and tells their failures
OFFERS_THE_TOOLS = {"app.cli", "app.exits"}


def module_files() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path) -> Iterator[str]:
    """The dotted names an ``import`` of the module names: ``from a import b`` gives ``a``
    and ``a.b`` (``b`` may be a module or a name in ``a``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of the packages it imports."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(name, path):
            while imported and imported not in files:  # a name in a module: the module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_at_every_level() -> None:
    graph = import_graph()
    assert {"service.pipeline", "service.storage"} <= graph["app.application"]
    assert "service.onnx_export" in graph["service.embedding"]  # imported inside a method
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], [sorted(c) for c in found]


def test_each_floor_imports_only_the_floors_below_it() -> None:
    wrong = set()
    for name, targets in import_graph().items():
        floor = name.split(".")[0]
        if floor not in FLOORS:
            continue
        allowed = FLOORS[floor] | {floor}
        if name in OFFERS_THE_TOOLS:
            allowed |= TOOLS
        wrong |= {(name, t) for t in targets if t.split(".")[0] not in allowed}
    assert wrong == set(), sorted(wrong)


def test_the_tools_stand_beside_the_floors() -> None:
    """The tools use the floors (the demo and ``--through-service`` run the real
    application); the floors below the command line import none of them."""
    graph = import_graph()
    users = {
        t.split(".")[0] for name, ts in graph.items() if name.split(".")[0] in TOOLS for t in ts
    }
    assert {"service", "app"} <= users
    importers = {
        name
        for name, targets in graph.items()
        if name.split(".")[0] in FLOORS
        and name not in OFFERS_THE_TOOLS
        and any(t.split(".")[0] in TOOLS for t in targets)
    }
    assert importers == set(), sorted(importers)
