"""A failed call gives the policy a failure reward at decision time, in the decision's own
transaction; its label, early or late, is stored without a second policy update. Real
Postgres, real embedder, and a real failure: an OpenAI-compatible arm whose port refuses
connections."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from service.config import parse_config
from service.events import LabelEvent, QueryEvent
from service.llm.gateway import Gateway
from service.pipeline import Decider, Learner, QueryRecord, RewardSettings
from tests.helpers import TASKS, demo_rows, open_learning_log, write_outcomes

pytestmark = pytest.mark.integration

REWARDS = RewardSettings(lam=0.1, cost_unit=0.001)


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def make_config(outcomes, fallback: bool):
    down = {
        "name": "down",
        "provider": "openai",
        "model": "m",
        "base_url": refused_url(),
        "max_retries": 1,
        "retry_backoff_seconds": 0.01,
        "retry_backoff_max_seconds": 0.02,
        "breaker_failures": 3,
        "breaker_cooldown_seconds": 600,
    }
    arms = [down]
    if fallback:
        down["fallback"] = "backup"
        arms.append(
            {"name": "backup", "provider": "replay", "model": "backup", "outcomes": str(outcomes)}
        )
    return parse_config({"tasks": TASKS, "arms": arms})


def rows_by_id(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT * FROM decisions"))
        return {r.query_id: dict(r._mapping) for r in result}


def records(rows) -> list[QueryRecord]:
    return [
        QueryRecord(QueryEvent(query_id=r["query_id"], text=r["text"], task=r["task"]))
        for r in rows
    ]


def test_failed_arm_is_rewarded_at_decision_time_and_labels_count_once(engine, embedder, tmp_path):
    data = demo_rows(16)
    outcomes = write_outcomes(  # an outcomes file holds ≥ 2 arms; only "backup" is used
        tmp_path / "o.jsonl", data, {"backup": (1.0, 0.0002), "unused": (0.5, 0.0)}
    )
    config = make_config(outcomes, fallback=True)
    learning_log = open_learning_log(engine, "linucb", {"alpha": 1.0, "epsilon": 1.0, "seed": 3})
    live = learning_log.live
    decider = Decider(config, learning_log, embedder, Gateway(config), REWARDS)
    learner = Learner(learning_log, REWARDS, pending_ttl_seconds=3600)
    try:
        early = data[0]
        learner.learn([LabelEvent(query_id=early["query_id"], label=early["label"])])
        decider.decide(records(data[:12]))
        first = rows_by_id(engine)
        failed = {q for q, r in first.items() if r["arm"] == "down"}
        assert 3 <= len(failed) < 12  # uniform choice between two arms (ε = 1)
        for qid, row in first.items():
            if row["arm"] == "down":  # refused → retried once → the fallback answered
                # the retry is refused without a request when the circuit (3 failed calls)
                # opened during its backoff, as in the test without a fallback below
                assert row["fallback_arm"] == "backup" and row["attempts"] in (2, 3)
                assert row["status"] == "ok" and row["prediction"] is not None
                assert "connection failed" in row["error"]
                assert row["reward_seq"] is not None and row["reward"] == 0.0
                assert row["cost_usd"] == pytest.approx(0.0002)  # what the fallback cost
            else:
                assert row["fallback_arm"] is None and row["attempts"] == 1
                assert row["error"] is None
                assert (row["reward_seq"] is None) == (qid != early["query_id"])
        assert live.policy.n_updates == len(failed) + (early["query_id"] not in failed)
        assert first[early["query_id"]]["label"] == early["label"]  # stored either way

        # the circuit opened after 3 failed calls: "down" is no longer a candidate
        assert decider.gateway.breakers["down"].state == "open"
        decider.decide(records(data[12:]))
        later = [r for q, r in rows_by_id(engine).items() if q not in first]
        assert len(later) == 4
        assert all(r["arm"] == "backup" and r["probabilities"] == {"backup": 1.0} for r in later)

        # every label arrives (the early one again: a duplicate); each decision counts once
        seqs_before = {q: r["reward_seq"] for q, r in rows_by_id(engine).items()}
        stats = learner.learn([LabelEvent(query_id=r["query_id"], label=r["label"]) for r in data])
        assert (stats.applied, stats.duplicates) == (15, 1)
        final = rows_by_id(engine)
        assert live.policy.n_updates == 16
        assert len({r["reward_seq"] for r in final.values()}) == 16
        for qid in failed:
            assert final[qid]["reward_seq"] == seqs_before[qid]  # not re-rewarded
            assert final[qid]["reward"] == 0.0
        truth = {r["query_id"]: r["label"] for r in data}
        for qid, row in final.items():
            assert row["label"] == truth[qid]
            assert row["correct"] == (row["prediction"] == truth[qid])
        # the policy equals the replay of the stored rewards
        restored = open_learning_log(engine, "linucb", {"alpha": 1.0, "epsilon": 1.0, "seed": 3})
        assert restored.restore() == 16
        assert restored.live.policy.n_updates == 16
    finally:
        decider.close()


def test_without_fallback_the_decision_is_an_llm_error_with_a_failure_reward(
    engine, embedder, tmp_path
):
    data = demo_rows(5)
    config = make_config(None, fallback=False)
    learning_log = open_learning_log(engine, "linucb", {"seed": 0})
    live = learning_log.live
    decider = Decider(config, learning_log, embedder, Gateway(config), REWARDS)
    learner = Learner(learning_log, REWARDS, pending_ttl_seconds=3600)
    try:
        events = decider.decide(records(data)).new
    finally:
        decider.close()
    assert [e.status for e in events] == ["llm_error"] * 5
    rows = rows_by_id(engine)
    for row in rows.values():
        assert row["status"] == "llm_error" and row["prediction"] is None
        # retried once, unless the circuit (3 failed calls) opened during its backoff
        assert row["attempts"] in (1, 2) and row["fallback_arm"] is None
        assert row["cost_usd"] == 0.0 and row["reward"] == 0.0
        assert row["reward_seq"] is not None and row["label"] is None
    assert live.policy.n_updates == 5
    stats = learner.learn([LabelEvent(query_id=r["query_id"], label=r["label"]) for r in data])
    assert stats.applied == 5 and not stats.rewards  # stored, not applied again
    assert live.policy.n_updates == 5
    for row in rows_by_id(engine).values():
        assert row["label"] is not None and row["correct"] is False
