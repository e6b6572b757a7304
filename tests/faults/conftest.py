"""Fixtures for the fault-injection suite (``pytest -m faults``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import HashEmbedder, PrivatePostgres


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()


@pytest.fixture
def own_broker() -> Iterator:
    """A broker of this test's own (to SIGSTOP without pausing anybody else's)."""
    from producers.local_broker import LocalBroker

    with LocalBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def _private_postgres_server() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres().init()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def private_pg(_private_postgres_server: PrivatePostgres) -> Iterator[PrivatePostgres]:
    """A Postgres server of the fault tests' own, to stop, crash and restart (initdb costs
    seconds, so one is shared by the tests, each in a schema or table of its own); it is given
    back running."""
    pg = _private_postgres_server
    if not pg.running():
        pg.start()
    yield pg
    if not pg.running():
        pg.start()
