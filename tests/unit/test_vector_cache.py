"""VectorCache: cached vectors are the ones embedded on the spot; the cache is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from producers.demo_data import demo_rows
from service.vector_cache import VectorCache

TEXTS = [r["text"] for r in demo_rows(40)]


class Recording:
    """A real embedder that records what it was asked, and can be made to fail."""

    def __init__(self, embedder) -> None:
        self.inner = embedder
        self.name = embedder.name
        self.dim = embedder.dim
        self.calls: list[list[str]] = []
        self.fail_next = False

    def embed(self, texts):
        self.calls.append(list(texts))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the embedder broke")
        return self.inner.embed(texts)


def test_cached_texts_are_not_embedded_again_and_match(embedder):
    rec = Recording(embedder)
    cache = VectorCache(rec)
    cache.embed(TEXTS[:10])
    got = cache.embed(TEXTS[5:15] + TEXTS[5:6])  # half cached, half not, one repeated
    assert np.allclose(got, embedder.embed(TEXTS[5:15] + TEXTS[5:6]), atol=1e-5)
    assert rec.calls == [TEXTS[:10], TEXTS[10:15]]
    assert (cache.hits, cache.misses) == (5, 15)
    assert cache.embed([]).shape == (0, embedder.dim)


def test_a_failed_embedding_caches_nothing_and_the_retry_embeds(embedder):
    rec = Recording(embedder)
    cache = VectorCache(rec)
    rec.fail_next = True
    with pytest.raises(RuntimeError, match="broke"):
        cache.embed(TEXTS[:8])
    got = cache.embed(TEXTS[:8])  # the retry of the batch
    assert np.allclose(got, embedder.embed(TEXTS[:8]), atol=1e-5)
    assert rec.calls == [TEXTS[:8], TEXTS[:8]]


def test_the_cache_is_bounded_and_keeps_the_most_recent(embedder):
    rec = Recording(embedder)
    cache = VectorCache(rec, max_cached=16)
    for i in range(0, 40, 8):
        cache.embed(TEXTS[i : i + 8])
    cache.embed(TEXTS[24:40])  # the last two batches: all still cached
    assert len(rec.calls) == 5
    cache.embed(TEXTS[16:24])  # the batch before them: evicted, embedded again
    assert rec.calls[-1] == TEXTS[16:24]


def test_a_batch_embedding_while_another_evicts_its_cached_texts(embedder):
    """The decider embeds a batch while the one before still embeds. A batch whose cached
    texts are evicted by the other batch while its new texts embed still gets every vector
    (found before embedding, not looked up again after), and both are counted right."""
    rec = Recording(embedder)
    cache = VectorCache(rec, max_cached=8)
    cache.embed(TEXTS[:4])  # cached: what the first batch will find
    entered, other_done = threading.Event(), threading.Event()
    embed = rec.embed

    def slow_for_the_first_batch(texts):
        if texts == TEXTS[30:32]:  # the first batch's new texts: wait for the other batch
            entered.set()
            assert other_done.wait(30)
        return embed(texts)

    rec.embed = slow_for_the_first_batch
    first = TEXTS[:4] + TEXTS[30:32]
    with ThreadPoolExecutor(1) as thread:
        got = thread.submit(cache.embed, first)
        assert entered.wait(30)
        cache.embed(TEXTS[10:20])  # evicts everything cached before it
        other_done.set()
        vectors = got.result(30)
    assert np.allclose(vectors, embedder.embed(first), atol=1e-5)
    assert (cache.hits, cache.misses) == (4, 4 + 2 + 10)
    # still bounded: the first batch's six texts, the latest stored, and two of the other's
    embedded = len(rec.calls)
    cache.embed(first)
    assert len(rec.calls) == embedded
    cache.embed(TEXTS[10:18])
    assert rec.calls[-1] == TEXTS[10:18]
