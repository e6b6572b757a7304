"""The arm_summary / hourly_stats views and the CLI that prints them, on the real Postgres."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service import storage
from service.log import decisions as decision_sql
from service.log import read_models
from tests.helpers import metallm_cli

pytestmark = pytest.mark.integration

ROWS = [  # arm, status, cost, correct (None: no label yet), reward
    ("cheap", "ok", 0.001, True, 0.9),
    ("cheap", "ok", 0.001, False, -0.1),
    ("cheap", "llm_error", 0.0, None, None),
    ("strong", "ok", 0.004, True, 0.6),
]


@pytest.fixture
def decided(engine):
    with engine.begin() as conn:
        for i, (arm, status, cost, correct, reward) in enumerate(ROWS):
            decision_sql.insert_decisions(
                conn,
                [
                    {
                        "query_id": f"q{i}",
                        "task": "s",
                        "text": "t",
                        "options": ["a", "b"],
                        "arm": arm,
                        "propensity": 0.8,
                        "probabilities": {"cheap": 0.8, "strong": 0.2},
                        "arm_scores": {"cheap": 1.25, "strong": 0.5},
                        "policy": "linucb",
                        "status": status,
                        "prediction": "a",
                        "cost_usd": cost,
                        "latency_ms": 100.0 * (i + 1),
                        "embedding_model": "m",
                        "context": storage.vector_to_bytes(np.zeros(2)),
                        "label": None if correct is None else "a",
                        "correct": correct,
                        "reward": reward,
                    }
                ],
            )
    return engine


def test_arm_summary_view(decided):
    with decided.connect() as conn:
        rows = {r["arm"]: r for r in read_models.stats_summary(conn)}
        hourly = read_models.hourly_stats(conn, 1)
    cheap, strong = rows["cheap"], rows["strong"]
    assert (cheap["decisions"], cheap["labeled"], cheap["failures"]) == (3, 2, 1)
    assert cheap["share"] == pytest.approx(0.75) and strong["share"] == pytest.approx(0.25)
    assert cheap["accuracy"] == pytest.approx(0.5) and strong["accuracy"] == pytest.approx(1.0)
    assert cheap["cost_usd"] == pytest.approx(0.002)
    assert cheap["mean_reward"] == pytest.approx(0.4)
    assert cheap["mean_latency_ms"] == pytest.approx(200.0)
    assert {(h["arm"], h["decisions"]) for h in hourly} == {("cheap", 3), ("strong", 1)}
    assert sum(h["share"] for h in hourly) == pytest.approx(1.0)


def test_stats_and_explain_commands(decided, pg_schema):
    out = metallm_cli(pg_schema, "stats", "--format", "json", "--hours", "0")
    assert out.returncode == 0, out.stderr
    summary = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["arm"], r["decisions"]) for r in summary] == [("cheap", 3), ("strong", 1)]

    table = metallm_cli(pg_schema, "stats").stdout
    assert "per arm (view arm_summary)" in table and "per hour" in table

    explained = metallm_cli(pg_schema, "decisions", "--explain", "q0")
    assert explained.returncode == 0, explained.stderr
    lines = explained.stdout.splitlines()
    cheap = next(line for line in lines if "cheap" in line and "chosen" in line)
    assert "1.25" in cheap and "80.0%" in cheap
    assert any("strong" in line and "0.5" in line and "20.0%" in line for line in lines)
    assert "label 'a': correct, reward 0.900" in " ".join(explained.stdout.split())

    missing = metallm_cli(pg_schema, "decisions", "--explain", "nope")
    assert missing.returncode == 1 and "no decision for query 'nope'" in missing.stderr


def test_a_scored_open_decision_in_stats_and_explain(decided, pg_schema):
    """An open task's decision scored 0.75: counted as labeled, its mean score shown where a
    classification shows accuracy; --explain shows its answer text and its score."""
    with decided.begin() as conn:
        decision_sql.insert_decisions(
            conn,
            [
                {
                    "query_id": "q-open",
                    "task": "chat",
                    "text": "Write a haiku about rain.",
                    "options": [],
                    "arm": "strong",
                    "propensity": 0.5,
                    "probabilities": {"cheap": 0.5, "strong": 0.5},
                    "policy": "linucb",
                    "status": "ok",
                    "prediction": None,
                    "raw_output": "Rain on the tin roof",
                    "cost_usd": 0.004,
                    "embedding_model": "m",
                    "context": storage.vector_to_bytes(np.zeros(2)),
                    "score": 0.75,
                    "reward": 0.35,
                }
            ],
        )
    with decided.connect() as conn:
        strong = next(r for r in read_models.stats_summary(conn) if r["arm"] == "strong")
    assert (strong["labeled"], strong["accuracy"], strong["mean_score"]) == (2, 1.0, 0.75)
    explained = " ".join(metallm_cli(pg_schema, "decisions", "--explain", "q-open").stdout.split())
    assert "answer 'Rain on the tin roof'" in explained
    assert "score 0.75, reward 0.350" in explained
