"""A cache of text → vector in front of an embedder, so a retried batch is not embedded again.

It is a cache in front of a pure function: hits and misses change how soon a vector is ready,
never the vector (except that ``onnx-int8`` quantises activations per batch, so its vectors
vary slightly with the texts batched together). Threads may share it: the decider embeds the
next batch while the one before it is still embedding.

>>> class Lengths:
...     name, dim, seen = "lengths", 1, []
...     def embed(self, texts):
...         self.seen.extend(texts)
...         return np.array([[len(t)] for t in texts], dtype=np.float32)
>>> cache = VectorCache(Lengths(), max_cached=2)
>>> cache.embed(["ab", "abc", "ab"]).ravel().tolist()
[2.0, 3.0, 2.0]
>>> cache.embed(["abc", "a"]).ravel().tolist(), cache.embedder.seen
([3.0, 1.0], ['ab', 'abc', 'a'])
>>> cache.hits, cache.misses
(1, 3)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TextEmbedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class VectorCache:
    def __init__(self, embedder: TextEmbedder, max_cached: int = 4096) -> None:
        self.embedder = embedder
        self.name = embedder.name
        self.dim = embedder.dim
        self.max_cached = max_cached
        self._ready: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # held for the bookkeeping, not while embedding
        self.hits = 0  # texts found in the cache
        self.misses = 0  # texts embedded (each once per call, however often it is repeated)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors of ``texts`` as rows of a (len(texts), dim) float32 array."""
        texts = list(texts)
        unique = dict.fromkeys(texts)
        with self._lock:
            found = {t: self._ready[t] for t in unique if t in self._ready}
            self.hits += len(found)
            missing = [t for t in unique if t not in found]
            self.misses += len(missing)
        if missing:  # (another thread may embed the same text meanwhile: the same vector)
            found.update(zip(missing, self.embedder.embed(missing), strict=True))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = found[text]
        with self._lock:
            for text in unique:
                self._ready[text] = found[text]
                self._ready.move_to_end(text)
            while len(self._ready) > self.max_cached:
                self._ready.popitem(last=False)
        return out
