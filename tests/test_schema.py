"""The tables ``service.storage`` declares are the tables the migrations make: Alembic's
autogenerate comparison of the metadata against a freshly migrated real Postgres schema finds
nothing to change (columns, types, nullability, server defaults, indexes, unique constraints)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service import storage

pytestmark = pytest.mark.integration


def differences(conn: sa.Connection, metadata: sa.MetaData) -> list[Any]:
    """What autogenerate would change to make the database match ``metadata``."""

    def ours(name: str | None, type_: str, parent: Any) -> bool:
        return not (type_ == "table" and name == "alembic_version")

    context = MigrationContext.configure(
        conn,
        opts={"compare_type": True, "compare_server_default": True, "include_name": ours},
    )
    return compare_metadata(context, metadata)


def test_the_declared_tables_are_the_migrated_ones(engine) -> None:
    with engine.connect() as conn:
        assert differences(conn, storage.metadata) == []


def test_the_comparison_sees_what_would_differ(engine) -> None:
    """A column made nullable, a default dropped and an index missing are each found."""
    altered = sa.MetaData()
    for table in storage.metadata.tables.values():
        table.to_metadata(altered)
    decisions = altered.tables["decisions"]
    decisions.c.text.nullable = True
    decisions.c.cost_usd.server_default = None
    decisions.indexes.discard(next(i for i in decisions.indexes if i.name == "decisions_arm_task"))
    with engine.connect() as conn:
        found = differences(conn, altered)
    # a difference is a tuple, or a list of the tuples changing one column
    kinds = {op[0] for d in found for op in (d if isinstance(d, list) else [d])}
    text = repr(found)
    assert {"modify_nullable", "modify_default", "remove_index"} <= kinds, found
    assert "'text'" in text and "'cost_usd'" in text and "decisions_arm_task" in text
