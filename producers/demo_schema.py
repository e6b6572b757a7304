"""The demo's Postgres schema: the demo drops only what it made itself.

Each demo run starts from a clean slate: it drops the schema a previous run made and makes it
again. A schema is the demo's when the demo created it: it marks it with a comment listing
what was in it once migrated. It drops a schema only when that mark is there and the schema
holds nothing besides what the mark lists; it refuses ``public``, Postgres's own schemas, a
schema it did not make (a service's, one of the user's) and one where something was added
since (a user's table).

    >>> parse_mark("metallm demo schema; made with: table decisions, view arm_summary")
    ['table decisions', 'view arm_summary']
    >>> parse_mark("the team's schema") is None
    True
"""

from __future__ import annotations

import re

import sqlalchemy as sa

from service.migrate import drop_schema, upgrade
from service.storage import make_engine

MARK = "metallm demo schema; made with: "
#: The schema names the demo takes: plain lower-case identifiers, never quoted.
PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: Schemas the demo never uses, whatever they hold.
RESERVED = ("public", "information_schema")

#: Every object of a schema a user could have made, as "kind name".
OBJECTS = sa.text(
    """
    SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
             WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table'
             WHEN 'S' THEN 'sequence' ELSE 'type' END || ' ' || c.relname
      FROM pg_class c
     WHERE c.relnamespace = CAST(:schema AS regnamespace)
       AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'c')
    UNION ALL
    SELECT 'function ' || p.proname FROM pg_proc p
     WHERE p.pronamespace = CAST(:schema AS regnamespace)
    UNION ALL
    SELECT 'type ' || t.typname FROM pg_type t
     WHERE t.typnamespace = CAST(:schema AS regnamespace) AND t.typtype IN ('d', 'e', 'r', 'm')
    """
)


class SchemaRefused(RuntimeError):
    """The demo will not drop this schema; the message says why and what to do."""


def parse_mark(comment: str | None) -> list[str] | None:
    """The objects a demo's mark lists, or None if ``comment`` is not a demo's mark."""
    if comment is None or not comment.startswith(MARK):
        return None
    return [item for item in comment.removeprefix(MARK).split(", ") if item]


def prepare_demo_schema(database_url: str, schema: str) -> str:
    """Make ``schema`` afresh for a demo run, migrated and marked; returns what was done
    ("created" or "recreated"), or raises :class:`SchemaRefused` with nothing changed."""
    if not PLAIN_NAME.fullmatch(schema):
        raise SchemaRefused(f"not a plain schema name: {schema!r}")
    if schema in RESERVED or schema.startswith("pg_"):
        raise SchemaRefused(
            f"the demo never uses schema {schema!r} (it drops and recreates its schema on each "
            "run): choose another with --schema"
        )
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace "
                    "WHERE nspname = :schema"
                ),
                {"schema": schema},
            ).one_or_none()
            held = set(conn.execute(OBJECTS, {"schema": schema}).scalars()) if found else set()
    finally:
        engine.dispose()
    if found is not None:
        listed = parse_mark(found[0])
        drop_it_yourself = (
            f'choose another --schema, or drop it yourself (DROP SCHEMA "{schema}" CASCADE)'
        )
        if listed is None:
            raise SchemaRefused(
                f"schema {schema!r} exists and was not made by the demo (it holds "
                f"{_some(held) or 'nothing'}): {drop_it_yourself}"
            )
        foreign = held - set(listed)
        if foreign:
            raise SchemaRefused(
                f"schema {schema!r} holds {_some(foreign)}, which the demo did not make: "
                f"{drop_it_yourself}"
            )
        drop_schema(database_url, schema)
    upgrade(database_url, schema)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            made = sorted(conn.execute(OBJECTS, {"schema": schema}).scalars())
            comment = MARK + ", ".join(made)
            conn.exec_driver_sql(f'COMMENT ON SCHEMA "{schema}" IS {_literal(comment)}')
    finally:
        engine.dispose()
    return "recreated" if found is not None else "created"


def _some(objects: set[str], shown: int = 3) -> str:
    names = sorted(objects)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (COMMENT takes no bind parameters)."""
    return "'" + text.replace("'", "''") + "'"
