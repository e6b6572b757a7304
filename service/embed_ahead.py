"""Embedding ahead of need: the next batch is embedded while this one waits for its LLMs.

:class:`EmbedAhead` wraps an embedder. ``submit(texts)`` starts embedding them on a background
thread and returns at once; ``embed(texts)`` returns their vectors, waiting for a submission
that covers them and embedding on the spot any it does not. It is a cache in front of a pure
function: which texts were submitted, and when, changes how soon a vector is ready, not what
is decided, stored or committed (nor the vector, except that ``onnx-int8`` quantises
activations per batch, so its vectors vary slightly with the texts batched together).
Submissions hold no Kafka or database state; a batch that is rewound or dropped just leaves
its vectors in the cache (the last ``max_cached`` texts, for its retry).

    ahead = EmbedAhead(Embedder())
    ahead.submit(next_texts)             # returns at once; torch/ONNX Runtime release the GIL
    vectors = ahead.embed(these_texts)   # ready, or embedded now
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np


class TextEmbedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class EmbedAhead:
    def __init__(self, embedder: TextEmbedder, max_cached: int = 4096) -> None:
        self.embedder = embedder
        self.name = embedder.name
        self.dim = embedder.dim
        self.max_cached = max_cached
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="metallm-embed-ahead")
        self._pending: dict[str, tuple[Future[np.ndarray], int]] = {}  # text → (job, its row)
        self._ready: OrderedDict[str, np.ndarray] = OrderedDict()
        self.submitted = 0  # texts embedded in the background
        self.inline = 0  # texts embedded on the spot (not submitted before)

    def submit(self, texts: Sequence[str]) -> None:
        """Start embedding the texts not ready or on their way yet; returns at once."""
        self._collect_finished()
        todo = [t for t in dict.fromkeys(texts) if t not in self._ready and t not in self._pending]
        if not todo:
            return
        job = self._executor.submit(self.embedder.embed, todo)
        for row, text in enumerate(todo):
            self._pending[text] = (job, row)
        self.submitted += len(todo)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors of ``texts`` as rows of a (len(texts), dim) float32 array."""
        texts = list(texts)
        for text in texts:
            if text in self._pending:
                self._collect(self._pending[text][0])  # raises what the embedder raised
        missing = [t for t in dict.fromkeys(texts) if t not in self._ready]
        if missing:
            self.inline += len(missing)
            self._keep(missing, self.embedder.embed(missing))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self._ready[text]
        self._trim()
        return out

    def _collect(self, job: Future[np.ndarray]) -> None:
        done = [(t, row) for t, (j, row) in self._pending.items() if j is job]
        try:
            vectors = job.result()
        finally:  # a failed job is forgotten: its texts are embedded again on demand
            for text, _ in done:
                del self._pending[text]
        self._keep([t for t, _ in done], vectors[[row for _, row in done]])

    def _collect_finished(self) -> None:
        """Move finished jobs into the cache (also those nobody asked for: a dropped batch)."""
        for job in {j for j, _ in self._pending.values() if j.done()}:
            with contextlib.suppress(Exception):  # asked for again, it is embedded on the spot
                self._collect(job)

    def _keep(self, texts: list[str], vectors: np.ndarray) -> None:
        for text, vector in zip(texts, vectors, strict=True):
            self._ready[text] = vector
            self._ready.move_to_end(text)

    def _trim(self) -> None:
        while len(self._ready) > self.max_cached:
            self._ready.popitem(last=False)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
