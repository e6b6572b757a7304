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


def head_revision() -> str:
    """The revision this code's migrations end at (where ``metallm migrate`` brings a schema)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()
    assert head is not None, "the migrations package has no revisions"
    return head


def current_revision(conn) -> str | None:
    """The revision the schema on ``conn``'s search path was migrated to (None: never)."""
    import sqlalchemy as sa

    if conn.execute(sa.text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def schema_problem(conn) -> str | None:
    """Why this code cannot use the schema on ``conn``'s search path (None: it can): never
    migrated, migrated to an older revision, or to one this code does not know."""
    import sqlalchemy as sa

    has_tables = conn.execute(sa.text("SELECT to_regclass('decisions')")).scalar() is not None
    current, head = current_revision(conn), head_revision()
    if not has_tables and current is None:
        return "the database has no metallm schema yet: run `metallm migrate`"
    if current == head:
        return None
    known = _known_revisions()
    if current is not None and current not in known:
        return (
            f"the database schema is at revision {current}, which this metallm does not know "
            f"(it needs {head}); a newer metallm migrated it: upgrade metallm"
        )
    return (
        f"the database schema is at revision {current or 'none'}, this metallm needs {head}: "
        "run `metallm migrate`"
    )


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("postgresql://"))
    return {rev.revision for rev in script.walk_revisions()}
