"""Alembic migrations: the only way metallm's schema is created or changed (`metallm migrate`)."""
