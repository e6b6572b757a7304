"""Fixtures for the fault-injection suite (``pytest -m faults``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import HashEmbedder


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()


@pytest.fixture
def own_broker() -> Iterator:
    """A broker of this test's own (to SIGSTOP without pausing anybody else's)."""
    from producers.local_broker import LocalBroker

    with LocalBroker() as broker:
        yield broker
