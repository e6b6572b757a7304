"""Scored feedback against the real Postgres: a score in [0, 1] and an open task's checked label
are stored and learnt once (first feedback wins, a repeat is a duplicate), a label for an open
task without a check is rejected, and the policy of the instance that learnt them, of another
instance that followed them and of a fresh one rebuilt from the log are the same — for a
policy that learns the reward (LinUCB) and one that learns the score (correctness_ucb)."""

from __future__ import annotations

import numpy as np
import pytest

from service import storage
from service.events import LabelEvent
from service.log import decisions as decision_sql
from service.log.transaction import rewards_after
from service.pipeline import Learner
from service.reward import AnswerCheck, RewardSettings, TaskScoring
from tests.faults.harness import policy_difference
from tests.helpers import legacy_context, open_learning_log
from tests.test_labels import decision, insert_decision

pytestmark = pytest.mark.integration

SCORING = {"chat": TaskScoring(True), "capital": TaskScoring(True, AnswerCheck("contains"))}
REWARDS = RewardSettings(lam=0.1, cost_unit=0.001, tasks=SCORING)


def insert_open(engine, query_id: str, task: str, answer: str, arm: str = "cheap") -> None:
    row = {
        "query_id": query_id,
        "task": task,
        "text": "t",
        "options": [],
        "arm": arm,
        "propensity": 0.5,
        "probabilities": {"cheap": 0.5, "strong": 0.5},
        "policy": "linucb",
        "status": "ok",
        "prediction": None,
        "raw_output": answer,
        "cost_usd": 0.0005,
        "embedding_model": "m",
        "context": storage.vector_to_bytes(np.arange(4, dtype=np.float32) + len(query_id)),
    }
    with engine.begin() as conn:
        assert decision_sql.insert_decisions(conn, [row]).keys() == {query_id}


@pytest.mark.parametrize("policy", ["linucb", "correctness_ucb"])
def test_scores_and_checked_labels_are_learnt_once_and_the_log_rebuilds_the_policy(engine, policy):
    def instance(name: str):
        return open_learning_log(
            engine, policy, {"seed": 0}, context=legacy_context(), instance=name
        )

    insert_decision(engine, "s1")  # a classification decision, prediction "a"
    insert_open(engine, "o1", "chat", "A haiku.")
    insert_open(engine, "o2", "chat", "Another.", arm="strong")
    insert_open(engine, "c1", "capital", "It is  PARIS, of course.")
    insert_open(engine, "c2", "capital", "Lyon.", arm="strong")
    a, b = instance("a"), instance("b")
    learner = Learner(a, REWARDS, pending_ttl_seconds=3600)
    events = [
        LabelEvent(query_id="o1", score=0.25),
        LabelEvent(query_id="s1", label="a"),
        LabelEvent(query_id="c1", label="paris"),
        LabelEvent(query_id="c2", label="paris"),
        LabelEvent(query_id="o1", score=0.5),  # a second feedback: a duplicate, ignored
        LabelEvent(query_id="o2", label="good"),  # no check: rejected
        LabelEvent(query_id="s1", score=1.0),  # a score after a label: a duplicate
    ]
    stats = learner.learn(events)
    assert (stats.applied, stats.duplicates) == (4, 2)
    assert [(i, r.reason) for i, r in stats.rejected] == [
        (5, "task 'chat' is open-ended and has no check: send a score in [0, 1], not a label")
    ]
    o1, s1, c1, c2, o2 = (decision(engine, q) for q in ("o1", "s1", "c1", "c2", "o2"))
    assert (o1["label"], o1["score"], o1["correct"]) == (None, 0.25, None)
    assert o1["reward"] == pytest.approx(0.25 - 0.1 * 0.0005 / 0.001)
    assert o1["duplicate_labels"] == 1 and s1["duplicate_labels"] == 1
    assert (s1["label"], s1["score"], s1["correct"]) == ("a", None, True)
    assert (c1["label"], c1["score"], c1["correct"]) == ("paris", 1.0, True)
    assert (c2["score"], c2["correct"], c2["reward"]) == (0.0, False, pytest.approx(-0.05))
    assert o2["label"] is None and o2["reward_seq"] is None

    with engine.connect() as conn:
        learnt = {r.query_id: r.correctness() for r in rewards_after(conn, 0)}
    assert learnt == {"o1": 0.25, "s1": 1.0, "c1": 1.0, "c2": 0.0}
    b.catch_up()
    rebuilt = instance("c")
    rebuilt.restore()  # no checkpoint: every reward of the log, in reward_seq order
    for other in (b, rebuilt):
        assert other.live.policy.n_updates == a.live.policy.n_updates == 4
        assert policy_difference(a.live.policy, other.live.policy) < 1e-9
    for live in (a, b, rebuilt):
        live.close()
