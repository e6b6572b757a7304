"""The learning core's pure modules — the live policy (a projection of the learning log), the
label join, scoring and the typed rows — reach neither the database nor Kafka: not
``service.storage``, nor any module of the packages that imports SQLAlchemy, psycopg or
kafka, at any depth (read with ``ast``, as ``test_import_graph`` reads the imports)."""

from __future__ import annotations

from tests.unit.test_import_graph import import_graph, imported_names, module_files

PURE = ("service.learning", "service.log.join", "service.log.rows", "service.reward")
EDGES = ("sqlalchemy", "psycopg", "kafka")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_the_pure_modules_reach_neither_storage_nor_a_driver() -> None:
    graph, files = import_graph(), module_files()
    for pure in PURE:
        modules = reachable(graph, pure)
        assert "service.storage" not in modules, pure
        drivers = {
            (name, imported)
            for name in modules
            for imported in imported_names(name, files[name])
            if imported.split(".")[0] in EDGES
        }
        assert drivers == set(), (pure, sorted(drivers))


def test_the_check_sees_a_driver_imported_further_down() -> None:
    graph = import_graph()
    assert "service.storage" in reachable(graph, "service.log.transaction")
