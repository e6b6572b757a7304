"""The shape of the import graph, read from the source with ``ast``: every ``import`` counts,
at module level or inside a function, so an import put off until a call still shows.

The serving code (``service/`` outside ``service/evaluation``, and ``consumers/``) does not
import the offline tools (the command line names the modules of their subcommands instead),
and no two modules of the packages import each other, directly or round a longer loop."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "consumers", "producers")
OFFLINE = "service.evaluation"
SERVING = ("service.", "consumers.")


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
    assert {"service.pipeline", "service.storage"} <= graph["consumers.runner"]
    assert "service.onnx_export" in graph["service.embedding"]  # imported inside a method
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_serving_does_not_import_the_offline_tools() -> None:
    def offline(name: str) -> bool:
        return name == OFFLINE or name.startswith(f"{OFFLINE}.")

    importers = {
        name
        for name, targets in import_graph().items()
        if name.startswith(SERVING) and not offline(name) and any(map(offline, targets))
    }
    assert importers == set(), sorted(importers)


def test_the_command_line_names_its_offline_subcommands_one_way() -> None:
    """``service.cli`` offers record, bench and evaluate by naming their module: a module of
    the offline tools, which does not lead back to the command line, so that counting the
    named modules as imports of ``service.cli`` still makes no cycle."""
    from service.cli import COMMAND_MODULES

    graph = import_graph()
    assert set(COMMAND_MODULES) <= {name for name in graph if name.startswith(f"{OFFLINE}.")}
    graph["service.cli"] |= set(COMMAND_MODULES)
    assert [c for c in cycles(graph) if "service.cli" in c] == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], [sorted(c) for c in found]


def test_the_core_does_not_import_the_edges_or_the_tools() -> None:
    """Arrows point into the core: nothing in ``service/`` imports ``consumers/`` (Kafka) or
    ``producers/``, but the command line, which offers every sub-command, and the offline
    tools (``--through-service`` runs the real service)."""
    edges = ("consumers", "producers")
    allowed = {"service.cli"}
    importers = {
        name
        for name, targets in import_graph().items()
        if name.startswith("service")
        and name not in allowed
        and not name.startswith(f"{OFFLINE}")
        and any(t.split(".")[0] in edges for t in targets)
    }
    assert importers == set(), sorted(importers)
