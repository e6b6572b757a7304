"""The on-disk embedding cache: hits, misses, and invalidation when the text or model changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from evaluation.embed_cache import CachedEmbedder, EmbeddingCache, text_key
from service.model_files import default_model_path, model_fingerprint


class Counting:
    """A deterministic stand-in model that records what it was asked to embed."""

    def __init__(self, salt: float = 0.0) -> None:
        self.salt = salt
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen.extend(texts)
        return np.array([[len(t), sum(map(ord, t)) % 97, self.salt] for t in texts], np.float32)


def test_hits_and_misses_persist_across_instances(tmp_path: Path) -> None:
    model = Counting()
    path = tmp_path / "cache.sqlite"
    first = CachedEmbedder(EmbeddingCache(path), "m@1", "m", embed_fn=model)
    a = first.embed(["one", "two", "one"])
    assert model.seen == ["one", "two"]  # duplicates embedded once
    assert (first.hits, first.misses) == (1, 2)
    again = CachedEmbedder(EmbeddingCache(path), "m@1", "m", embed_fn=model)
    b = again.embed(["two", "one"])
    assert model.seen == ["one", "two"]  # nothing recomputed by a new process on the same file
    np.testing.assert_array_equal(b, a[[1, 0]])
    assert again.embed([]).shape[0] == 0


def test_changed_text_is_a_miss(tmp_path: Path) -> None:
    model = Counting()
    emb = CachedEmbedder(EmbeddingCache(tmp_path / "c.sqlite"), "m@1", "m", embed_fn=model)
    emb.embed(["The film was great."])
    emb.embed(["The film was great!", "the film was great."])  # one character, case
    assert model.seen == ["The film was great.", "The film was great!", "the film was great."]
    assert text_key("a") != text_key("a ")


def test_changed_model_is_a_miss(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    old, new = Counting(0.0), Counting(1.0)
    v_old = CachedEmbedder(cache, "m@aaaa", "m", embed_fn=old).embed(["hello"])
    v_new = CachedEmbedder(cache, "m@bbbb", "m", embed_fn=new).embed(["hello"])
    assert new.seen == ["hello"] and v_new[0, 2] == 1.0 and v_old[0, 2] == 0.0
    assert cache.count("m@aaaa") == cache.count("m@bbbb") == 1


def test_fingerprint_follows_the_model_files(tmp_path: Path) -> None:
    """The key of a real model folder: same content → same key wherever it lives; any edited,
    added or resized file → a new key, so the old vectors are never served for it."""
    original = default_model_path()
    copy = tmp_path / "model"
    copy.mkdir()
    for f in original.rglob("*"):
        if f.is_file():
            target = copy / f.relative_to(original)
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.stat().st_size > 1 << 20:
                target.symlink_to(f)  # the weights: same bytes, no copy
            else:
                shutil.copy(f, target)
    base = model_fingerprint(original)
    assert model_fingerprint(copy) == base
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    edited = model_fingerprint(copy)
    assert edited != base
    (copy / "extra.txt").write_text("x")
    assert model_fingerprint(copy) not in (base, edited)

    cache = EmbeddingCache(tmp_path / "c.sqlite")
    before = CachedEmbedder.for_model(original, cache)
    after = CachedEmbedder.for_model(copy, cache)
    assert before.model_key != after.model_key
    cache.put_many(before.model_key, ["hi"], np.ones((1, 3), np.float32))
    assert cache.get_many(before.model_key, ["hi"]) and not cache.get_many(after.model_key, ["hi"])


def test_real_model_through_the_cache_equals_the_embedder(embedder, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    texts = ["Is the sky blue?", "Book a table for two at 8."]
    cached = CachedEmbedder.for_model(None, cache)
    np.testing.assert_allclose(cached.embed(texts), embedder.embed(texts), atol=1e-6)
    assert cached.misses == 2 and cached.name == embedder.name and cached.dim == embedder.dim
    np.testing.assert_array_equal(cached.embed(texts[::-1]), cached.embed(texts)[::-1])
    assert cached.hits == 4
