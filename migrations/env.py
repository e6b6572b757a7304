"""Alembic environment: runs migrations on the engine metallm builds from its settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from service.storage import make_engine

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    schema = config.attributes.get("schema")
    engine = make_engine(url, schema=schema)
    with engine.connect() as connection:
        if schema:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            connection.commit()
        context.configure(connection=connection, version_table_schema=schema)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `metallm migrate`")
run_migrations_online()
