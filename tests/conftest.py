"""Fixtures for the real services: a Postgres schema of the test's own and a Tansu broker."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from evaluation.embed_cache import CachedEmbedder, EmbeddingCache
from service.model_files import model_fingerprint
from service.settings import isolated_stream_names

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATABASE_URL = os.environ.get(
    "METALLM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs the CLI in-process gets its logging set up on the test's captured
    stderr; that stream is closed after the test, and every later log line would then print a
    "Logging error" traceback (slow enough to lose races in the fault tests)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    from producers.local_broker import LocalBroker

    with LocalBroker() as b:
        yield b.bootstrap


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema with metallm's migrations applied, dropped afterwards."""
    from service.migrate import drop_schema, upgrade

    schema = f"t_{uuid.uuid4().hex[:12]}"
    upgrade(DATABASE_URL, schema)
    yield schema
    drop_schema(DATABASE_URL, schema)


@pytest.fixture
def engine(pg_schema: str) -> Iterator[sa.Engine]:
    from service.storage import make_engine

    e = make_engine(DATABASE_URL, pg_schema)
    yield e
    e.dispose()


@pytest.fixture(scope="session")
def embedder():
    from service.embedding import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def embedding_cache_path(pytestconfig, tmp_path_factory) -> Path:
    """A cache file in pytest's cache folder: the model runs once per text, ever (a fresh
    temporary one under ``-p no:cacheprovider``)."""
    store = getattr(pytestconfig, "cache", None)
    if store is None:
        return tmp_path_factory.mktemp("embeddings") / "embeddings.sqlite"
    return store.mkdir("metallm-evaluation") / "embeddings.sqlite"


@pytest.fixture(scope="session")
def cached_embedder(embedder, embedding_cache_path) -> CachedEmbedder:
    """The real MiniLM behind the cache, under the key ``CachedEmbedder.for_model()`` uses,
    so a CLI run given ``--embedding-cache`` finds these vectors without loading the model."""
    from service.embedding import DEFAULT_MODEL_NAME
    from service.model_files import default_model_path

    key = f"{DEFAULT_MODEL_NAME}@{model_fingerprint(default_model_path())}"
    cache = EmbeddingCache(embedding_cache_path)
    return CachedEmbedder(cache, key, DEFAULT_MODEL_NAME, embed_fn=embedder.embed)


@pytest.fixture
def topics(broker: str) -> Iterator[dict[str, str]]:
    """Fresh topic and group names for one test; the topics are deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    names = isolated_stream_names(f"t-{tag}")
    yield names
    from consumers.kafka_io import delete_topics

    delete_topics(broker, [t for k, t in names.items() if k.endswith("_topic")])


def wait_for(
    condition: Callable[[], object],
    timeout: float = 60.0,
    interval: float = 0.2,
    message: str = "condition",
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")
