"""Shared fixtures: the gsm8k outcomes copy and its MiniLM embeddings (computed once a session).

Embeddings come through the embedding cache shared with the evaluation tests
(``cached_embedder`` in tests/conftest.py), so a clean checkout computes them once.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def gsm8k_embeddings(gsm8k_records, cached_embedder) -> np.ndarray:
    """The real MiniLM embeddings of the gsm8k texts, through the shared embedding cache."""
    return cached_embedder.embed([r.text for r in gsm8k_records])
