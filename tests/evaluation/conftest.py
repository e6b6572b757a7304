"""Fixtures for the evaluation tests: an embedding cache that survives between runs, and the
gsm8k outcomes (the copy in tests/policy/data) with their real MiniLM embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.outcomes import read_outcomes

GSM8K = Path(__file__).resolve().parents[1] / "policy" / "data" / "gsm8k_outcomes.jsonl"


@pytest.fixture(scope="session")
def gsm8k_problem(cached_embedder):
    from evaluation.bench import Problem

    records = read_outcomes(GSM8K)
    return Problem.from_records(records, cached_embedder.embed([r.text for r in records]))
