"""Run the Alembic migrations that ship inside the ``migrations`` package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config(database_url: str, schema: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["schema"] = schema
    return config


def upgrade(database_url: str, schema: str | None = None, revision: str = "head") -> None:
    """Bring the database schema up to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(database_url, schema), revision)


def downgrade(database_url: str, schema: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url, schema), revision)


def drop_schema(database_url: str, schema: str) -> None:
    """Drop a schema of metallm's tables and everything in it, if it exists (the demo's, or
    one a test or a benchmark made for itself with :func:`upgrade`)."""
    import sqlalchemy as sa

    from service.storage import make_engine

    engine = make_engine(database_url, schema)  # (which checks the schema's name)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()
