"""Query embeddings cached on disk, per text and per model, so benchmark sweeps skip the model.

The cache is one SQLite file (default ``~/.cache/metallm/embeddings.sqlite``, or
``METALLM_EMBEDDING_CACHE``). A vector is stored under ``(model key, sha256(text))``; the model
key is the model's name plus a fingerprint of its files (names, sizes and contents), so editing
or replacing the model, or changing a text by one character, is a cache miss.

:class:`CachedEmbedder` has the :class:`~service.embedding.Embedder` interface (``name``,
``dim``, ``embed``) and loads the model only when a text is missing, so the service can be
given one too.

    >>> import tempfile, numpy as np
    >>> calls = []
    >>> def fake(texts):
    ...     calls.append(list(texts))
    ...     return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)
    >>> cache = EmbeddingCache(Path(tempfile.mkdtemp()) / "e.sqlite")
    >>> emb = CachedEmbedder(cache, model_key="toy@1", name="toy", embed_fn=fake)
    >>> emb.embed(["ab", "abc"]).tolist(), emb.embed(["abc", "x"]).tolist()
    ([[2.0, 1.0], [3.0, 1.0]], [[3.0, 1.0], [1.0, 1.0]])
    >>> calls                                   # "abc" came from the cache the second time
    [['ab', 'abc'], ['x']]
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from service.model_files import model_fingerprint


def default_cache_path() -> Path:
    env = os.environ.get("METALLM_EMBEDDING_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "metallm" / "embeddings.sqlite"


def text_key(text: str) -> str:
    """sha256 of the exact UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """A SQLite table of float32 vectors keyed by (model key, text hash). Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS embeddings ("
                " model TEXT NOT NULL, text_sha TEXT NOT NULL, dim INTEGER NOT NULL,"
                " vector BLOB NOT NULL, PRIMARY KEY (model, text_sha))"
            )

    def get_many(self, model_key: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors of ``texts`` under ``model_key``, by text hash (misses are absent)."""
        keys = list({text_key(t) for t in texts})
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT text_sha, vector FROM embeddings WHERE model = ? "
                    f"AND text_sha IN ({marks})",
                    [model_key, *chunk],
                )
                for sha, blob in rows:
                    found[sha] = np.frombuffer(blob, dtype="<f4")
        return found

    def put_many(self, model_key: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype="<f4")
        rows = [
            (model_key, text_key(t), int(v.shape[0]), v.tobytes())
            for t, v in zip(texts, vectors, strict=True)
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)

    def count(self, model_key: str | None = None) -> int:
        with self._lock:
            if model_key is None:
                return self._db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            return self._db.execute(
                "SELECT count(*) FROM embeddings WHERE model = ?", [model_key]
            ).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEmbedder:
    """An embedder that reads through an :class:`EmbeddingCache`.

    Give ``embed_fn`` (texts → float32 array) with its ``model_key``, or use
    :meth:`for_model` to wrap a sentence-transformers model folder (the default one when
    ``model`` is None); the model is only loaded on the first cache miss.
    """

    def __init__(
        self,
        cache: EmbeddingCache,
        model_key: str,
        name: str,
        embed_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
        loader: Callable[[], Callable[[Sequence[str]], np.ndarray]] | None = None,
        dim: int | None = None,
    ) -> None:
        if embed_fn is None and loader is None:
            raise ValueError("give embed_fn or loader")
        self.cache = cache
        self.model_key = model_key
        self.name = name
        self._embed_fn = embed_fn
        self._loader = loader
        self._dim = dim
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_model(
        cls,
        model: str | Path | None = None,
        cache: EmbeddingCache | None = None,
        batch_size: int | None = None,
    ) -> CachedEmbedder:
        """Cache in front of :class:`~service.embedding.Embedder` (``model`` and
        ``batch_size`` as its arguments: by default the backend's own batch size)."""
        from service.embedding import DEFAULT_MODEL_NAME
        from service.model_files import default_model_path

        path = Path(model) if model else default_model_path()
        name = DEFAULT_MODEL_NAME if model is None else str(model)
        key = f"{name}@{model_fingerprint(path)}"

        def load() -> Callable[[Sequence[str]], np.ndarray]:
            from service.embedding import Embedder

            embedder = Embedder(model, batch_size=batch_size)
            return embedder.embed

        return cls(cache or EmbeddingCache(default_cache_path()), key, name, loader=load)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Rows of float32 vectors for ``texts``, computing (and storing) only the misses."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        found = self.cache.get_many(self.model_key, texts)
        missing = list(dict.fromkeys(t for t in texts if text_key(t) not in found))
        if missing:
            if self._embed_fn is None:
                assert self._loader is not None
                self._embed_fn = self._loader()
            vectors = np.asarray(self._embed_fn(missing), dtype=np.float32)
            self.cache.put_many(self.model_key, missing, vectors)
            for text, vector in zip(missing, vectors, strict=True):
                found[text_key(text)] = vector
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        out = np.stack([found[text_key(t)] for t in texts]).astype(np.float32)
        self._dim = out.shape[1]
        return out
