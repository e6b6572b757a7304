"""EmbedAhead: vectors embedded in the background are the ones embedded on the spot."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from producers.demo_data import demo_rows
from service.embed_ahead import EmbedAhead

TEXTS = [r["text"] for r in demo_rows(40)]


class Recording:
    """A real embedder that records what it was asked, and can be held or made to fail."""

    def __init__(self, embedder) -> None:
        self.inner = embedder
        self.name = embedder.name
        self.dim = embedder.dim
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def embed(self, texts):
        self.gate.wait(30)
        self.calls.append(list(texts))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the embedder broke")
        return self.inner.embed(texts)


def test_submitted_texts_are_embedded_once_in_the_background(embedder):
    rec = Recording(embedder)
    ahead = EmbedAhead(rec)
    try:
        rec.gate.clear()
        ahead.submit(TEXTS[:20])
        ahead.submit(TEXTS[:20])  # already on its way: not submitted twice
        assert rec.calls == []  # submit returned while the embedder was held
        rec.gate.set()
        got = ahead.embed(TEXTS[5:20])
        assert np.allclose(got, embedder.embed(TEXTS[5:20]), atol=1e-5)
        assert rec.calls == [TEXTS[:20]]
        assert (ahead.submitted, ahead.inline) == (20, 0)
    finally:
        ahead.close()


def test_texts_not_submitted_are_embedded_on_the_spot(embedder):
    rec = Recording(embedder)
    ahead = EmbedAhead(rec)
    try:
        ahead.submit(TEXTS[:10])
        got = ahead.embed(TEXTS[5:15] + TEXTS[5:6])  # half submitted, half not, one repeated
        assert np.allclose(got, embedder.embed(TEXTS[5:15] + TEXTS[5:6]), atol=1e-5)
        assert rec.calls[-1] == TEXTS[10:15]
        assert ahead.inline == 5
        assert ahead.embed([]).shape == (0, embedder.dim)
    finally:
        ahead.close()


def test_a_failed_background_job_fails_its_batch_once_then_embeds_again(embedder):
    rec = Recording(embedder)
    ahead = EmbedAhead(rec)
    try:
        rec.fail_next = True
        ahead.submit(TEXTS[:8])
        with pytest.raises(RuntimeError, match="broke"):
            ahead.embed(TEXTS[:8])
        got = ahead.embed(TEXTS[:8])  # the retry of the batch
        assert np.allclose(got, embedder.embed(TEXTS[:8]), atol=1e-5)
    finally:
        ahead.close()


def test_the_cache_is_bounded(embedder):
    ahead = EmbedAhead(embedder, max_cached=16)
    try:
        for i in range(0, 40, 8):
            ahead.submit(TEXTS[i : i + 8])
            ahead.embed(TEXTS[i : i + 8])
        assert len(ahead._ready) <= 16
        assert not ahead._pending
    finally:
        ahead.close()
