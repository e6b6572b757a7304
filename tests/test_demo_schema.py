"""The demo drops only what it made: never ``public``, never a schema it did not create, never
one holding anything it did not put there. Against the real Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from app.exits import EXIT_INPUT
from producers.demo_schema import SchemaRefused, prepare_demo_schema
from service.migrate import drop_schema, upgrade
from service.storage import make_engine
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.integration


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"t_demo_{uuid.uuid4().hex[:10]}"
    yield name
    drop_schema(DATABASE_URL, name)


def sql(statement: str, schema: str | None = None) -> list:
    engine = make_engine(DATABASE_URL, schema)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement))
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def oid(schema: str) -> int:
    return sql(f"SELECT oid FROM pg_namespace WHERE nspname = '{schema}'")[0][0]


def test_the_demo_refuses_public_before_starting_anything():
    public_before = sql("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace")
    out = subprocess.run(
        [sys.executable, "-m", "producers.demo", "--schema", "public", "--replay"],
        env={**os.environ, "DATABASE_URL": DATABASE_URL},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == EXIT_INPUT, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "demo: the demo never uses schema 'public' (it drops and recreates its schema on each "
        "run): choose another with --schema"
    )
    assert "Kafka (Tansu) at" not in out.stdout  # refused before the broker started
    assert sql("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace") == (
        public_before
    )


def test_a_schema_with_a_table_of_its_own_is_refused_and_kept(schema):
    sql(f'CREATE SCHEMA "{schema}"')
    sql(f'CREATE TABLE "{schema}".customers (id int)')
    sql(f'INSERT INTO "{schema}".customers VALUES (1)')
    with pytest.raises(
        SchemaRefused,
        match=r"exists and was not made by the demo \(it holds "
        r"table customers\)",
    ):
        prepare_demo_schema(DATABASE_URL, schema)
    assert sql(f'SELECT id FROM "{schema}".customers') == [(1,)]


def test_a_services_schema_is_not_the_demos(schema):
    upgrade(DATABASE_URL, schema)  # metallm's own tables, made by `metallm migrate`
    made = oid(schema)
    with pytest.raises(SchemaRefused, match="was not made by the demo"):
        prepare_demo_schema(DATABASE_URL, schema)
    assert oid(schema) == made and sql("SELECT to_regclass('decisions') IS NOT NULL", schema) == [
        (True,)
    ]


def test_a_previous_demos_schema_is_dropped_but_not_once_a_table_was_added(schema):
    assert prepare_demo_schema(DATABASE_URL, schema) == "created"
    first = oid(schema)
    assert prepare_demo_schema(DATABASE_URL, schema) == "recreated"
    second = oid(schema)
    assert second != first  # dropped and made again: a clean slate
    assert sql("SELECT to_regclass('decisions') IS NOT NULL", schema) == [(True,)]

    sql(f'CREATE TABLE "{schema}".notes (body text)')
    with pytest.raises(SchemaRefused, match="holds table notes, which the demo did not make"):
        prepare_demo_schema(DATABASE_URL, schema)
    assert sql(f'SELECT count(*) FROM "{schema}".notes') == [(0,)]
