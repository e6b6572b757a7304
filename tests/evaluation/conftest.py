"""Fixtures for the evaluation tests: an embedding cache that survives between runs, and the
gsm8k outcomes (the copy in tests/policy/data) with their real MiniLM embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.evaluation.embed_cache import CachedEmbedder, EmbeddingCache, model_fingerprint
from service.outcomes import read_outcomes

GSM8K = Path(__file__).resolve().parents[1] / "policy" / "data" / "gsm8k_outcomes.jsonl"


@pytest.fixture(scope="session")
def embedding_cache_path(pytestconfig) -> Path:
    """A cache file in pytest's cache folder: the model runs once per text, ever."""
    return pytestconfig.cache.mkdir("metallm-evaluation") / "embeddings.sqlite"


@pytest.fixture(scope="session")
def cached_embedder(embedder, embedding_cache_path) -> CachedEmbedder:
    """The real MiniLM behind the cache, under the key ``CachedEmbedder.for_model()`` uses,
    so a CLI run given ``--embedding-cache`` finds these vectors without loading the model."""
    from service.embedding import DEFAULT_MODEL_NAME, default_model_path

    key = f"{DEFAULT_MODEL_NAME}@{model_fingerprint(default_model_path())}"
    cache = EmbeddingCache(embedding_cache_path)
    return CachedEmbedder(cache, key, DEFAULT_MODEL_NAME, embed_fn=embedder.embed)


@pytest.fixture(scope="session")
def gsm8k_problem(cached_embedder):
    from service.evaluation.bench import Problem

    records = read_outcomes(GSM8K)
    return Problem.from_records(records, cached_embedder.embed([r.text for r in records]))
