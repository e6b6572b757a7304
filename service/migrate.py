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
