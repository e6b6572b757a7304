"""Label outcomes against the real Postgres: early, duplicate, conflicting, unknown, expired."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import sqlalchemy as sa

from service import storage
from service.events import LabelEvent, QueryEvent
from service.llm.gateway import Gateway
from service.log import decisions as decision_sql
from service.log import read_models
from service.pipeline import Decider, Learner, QueryRecord, RewardSettings
from tests.faults.harness import HashEmbedder
from tests.helpers import legacy_context, open_learning_log, replay_config, write_outcomes

pytestmark = pytest.mark.integration


def insert_decision(engine, query_id: str, prediction: str = "a", status: str = "ok") -> None:
    row = {
        "query_id": query_id,
        "task": "s",
        "text": "t",
        "options": ["a", "b"],
        "arm": "cheap",
        "propensity": 0.5,
        "probabilities": {"cheap": 0.5, "strong": 0.5},
        "policy": "linucb",
        "status": status,
        "prediction": prediction if status == "ok" else None,
        "cost_usd": 0.0005,
        "embedding_model": "m",
        "context": storage.vector_to_bytes(np.arange(4, dtype=np.float32)),
    }
    with engine.begin() as conn:
        assert decision_sql.insert_decisions(conn, [row]).keys() == {query_id}


@pytest.fixture
def learner(engine):
    learning_log = open_learning_log(
        engine, "linucb", {"seed": 0}, checkpoint_every=1000, context=legacy_context()
    )
    return Learner(learning_log, RewardSettings(lam=0.1, cost_unit=0.001), pending_ttl_seconds=1)


def decision(engine, query_id: str) -> dict:
    with engine.connect() as conn:
        return dict(
            conn.execute(sa.text("SELECT * FROM decisions WHERE query_id = :q"), {"q": query_id})
            .one()
            ._mapping
        )


def test_label_then_duplicate_then_conflict(engine, learner, caplog):
    insert_decision(engine, "q1")
    stats = learner.learn([LabelEvent(query_id="q1", label="A ")])
    assert (stats.applied, stats.duplicates) == (1, 0)
    row = decision(engine, "q1")
    assert row["correct"] is True and row["reward"] == pytest.approx(1 - 0.1 * 0.5)
    with caplog.at_level(logging.WARNING):
        stats = learner.learn(
            [LabelEvent(query_id="q1", label="a"), LabelEvent(query_id="q1", label="b")]
        )
    assert (stats.applied, stats.duplicates) == (0, 2)
    assert "conflicting label for q1: kept 'A ', ignored 'b'" in caplog.text
    row = decision(engine, "q1")
    assert row["label"] == "A " and row["duplicate_labels"] == 2
    assert learner.learning_log.live.policy.n_updates == 1
    with engine.connect() as conn:
        assert read_models.counters(conn)["duplicate_labels"] == 2


def test_failed_call_is_rewarded_as_wrong(engine, learner):
    insert_decision(engine, "q2", status="parse_error")
    learner.learn([LabelEvent(query_id="q2", label="a")])
    row = decision(engine, "q2")
    assert row["correct"] is False and row["reward"] == pytest.approx(-0.05)


def test_early_label_waits_then_applies_once_with_its_duplicates(engine, learner, tmp_path):
    """Labelled twice before its query: the label waits, then the real Decider applies it in
    the transaction that stores the decision, once, carrying its duplicate over."""
    query = {
        "query_id": "q3",
        "text": "A fine, warm film.",
        "task": "sentiment",
        "label": "positive",
    }
    outcomes = write_outcomes(  # an outcomes file holds ≥ 2 arms; only "cheap" is configured
        tmp_path / "o.jsonl", [query], {"cheap": (1.0, 0.0005), "unused": (1.0, 0)}
    )
    config = replay_config(outcomes, ["cheap"])  # always right: the label scores as correct
    decider = Decider(
        config, learner.learning_log, HashEmbedder(), Gateway(config), learner.rewards
    )

    early = LabelEvent(query_id="q3", label="positive")
    stats = learner.learn([early, early])
    assert (stats.pending, stats.pending_duplicates) == (1, 1)
    assert learner.learning_log.live.policy.n_updates == 0
    try:
        (event,) = decider.decide(
            [QueryRecord(QueryEvent(query_id="q3", text=query["text"], task="sentiment"))]
        ).new
    finally:
        decider.close()
    assert event.query_id == "q3"
    row = decision(engine, "q3")
    assert row["label"] == "positive" and row["duplicate_labels"] == 1 and row["correct"] is True
    assert (
        row["reward_seq"] is not None and row["reward_seq"] == learner.learning_log.live.watermark
    )
    assert learner.learning_log.live.policy.n_updates == 1
    assert learner.pending_count() == 0

    # the same label once more, now that its decision exists: one more duplicate, no update
    stats = learner.learn([early])
    assert (stats.applied, stats.duplicates) == (0, 1)
    assert decision(engine, "q3")["duplicate_labels"] == 2
    assert learner.learning_log.live.policy.n_updates == 1


def test_unknown_label_expires_after_the_ttl_with_a_log_line(engine, learner, caplog):
    learner.learn([LabelEvent(query_id="never", label="a")])
    assert learner.expire_pending() == 0  # younger than the TTL of 1 s
    time.sleep(1.2)
    with caplog.at_level(logging.WARNING):
        assert learner.expire_pending() == 1
    assert "dropped label for never: no decision within 1 s" in caplog.text
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pending_labels")).scalar_one() == 0
        assert read_models.counters(conn)["labels_expired"] == 1


def test_a_rejected_early_label_leaves_room_for_the_next(engine, learner, tmp_path, caplog):
    """Issue 25: an early label later rejected (outside the label set) is never the first
    label: a good label after it, early too, is applied when the decision arrives, in every
    order; a copy of a waiting label stays a duplicate, and two good ones keep the first."""
    queries = [
        {
            "query_id": q,
            "text": f"A fine, warm film ({q}).",
            "task": "sentiment",
            "label": "positive",
        }
        for q in ("apart", "batch", "score", "two", "late")
    ]
    outcomes = write_outcomes(tmp_path / "o.jsonl", queries, {"cheap": (1.0, 0.0), "x": (1.0, 0)})
    config = replay_config(outcomes, ["cheap"])
    decider = Decider(
        config, learner.learning_log, HashEmbedder(), Gateway(config), learner.rewards
    )

    def label(query_id: str, label: str | None = None, score: float | None = None) -> LabelEvent:
        return LabelEvent(query_id=query_id, label=label, score=score)

    learner.learn([label("apart", "banana")])  # in separate batches
    learner.learn([label("apart", "positive")])
    stats = learner.learn(  # in one batch, with a copy of each
        [label("batch", "banana"), label("batch", "positive"), label("batch", "Positive ")]
        + [label("batch", "banana"), label("score", "banana"), label("score", score=0.5)]
    )
    assert (stats.pending, stats.pending_duplicates) == (4, 2)
    learner.learn([label("two", "positive"), label("two", "negative")])
    learner.learn([label("two", "negative")])  # a copy of the second one waiting
    assert learner.pending_count() == 8
    try:
        with caplog.at_level(logging.WARNING):
            decider.decide(
                [
                    QueryRecord(
                        QueryEvent(query_id=q["query_id"], text=q["text"], task="sentiment")
                    )
                    for q in queries
                ]
            )
        # after its decision: rejected (to the DLQ), then a good one applied
        assert [i for i, _ in learner.learn([label("late", "banana")]).rejected] == [0]
        assert learner.learn([label("late", "positive")]).applied == 1
    finally:
        decider.close()
    got = {q: decision(engine, q) for q in ("apart", "batch", "score", "two", "late")}
    assert {q: (r["label"], r["score"], r["duplicate_labels"]) for q, r in got.items()} == {
        "apart": ("positive", None, 0),
        "batch": ("positive", None, 1),
        "score": (None, 0.5, 0),
        "two": ("positive", None, 2),
        "late": ("positive", None, 0),
    }
    assert all(r["reward_seq"] is not None for r in got.values())
    assert "conflicting label for two: kept 'positive', ignored 'negative'" in caplog.text
    assert learner.pending_count() == 0
    assert learner.learning_log.live.policy.n_updates == 5
    with engine.connect() as conn:
        rejected = conn.execute(sa.text("SELECT query_id FROM rejected_labels ORDER BY id"))
        assert rejected.scalars().all() == ["apart", "batch", "score"]
        counters = read_models.counters(conn)
    # rejected: 3 early, 1 late; duplicates: batch's 2 copies, two's copy and its 2nd label
    assert (counters["labels_rejected"], counters["duplicate_labels"]) == (4, 4)
