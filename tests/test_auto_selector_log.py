"""The ``auto`` selector in the service, against the real Postgres: every outcome of the log is
scored off-policy with its decision's logged propensity and λ (as the bench scores them), so
two instances following one log, a restart from a checkpoint and a rebuild from the log alone
all reach the same scores and select the same candidate."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.llm.gateway import Gateway
from service.pipeline import Decider, Learner
from tests.faults.harness import HashEmbedder
from tests.helpers import demo_rows, open_learning_log, replay_config, write_outcomes
from tests.test_priced_service import BASE, labels, records

pytestmark = pytest.mark.integration

#: switching quickly, so that a short stream sees a switch (the context does not help here,
#: and at α 2 the linear candidates keep exploring what the arm means soon know is worse)
AUTO = {"seed": 0, "min_scored": 40, "z": 1.0, "epsilon": 0.1, "alpha": 2.0}
ARMS = {"good": (0.9, 0.0002), "bad": (0.3, 0.0001)}
ROWS = demo_rows(240)


def scored(learning_log) -> tuple:
    """What the selector holds of its scoring: the serving candidate, switches, scores."""
    policy = learning_log.live.policy
    scores = [(s.name, s.n, round(s.value, 12), round(s.gain_lower, 12)) for s in policy.scores()]
    return policy.serving, policy.switches, scores


def test_auto_scores_the_log_and_every_instance_and_restart_selects_the_same(engine, tmp_path):
    config = replay_config(write_outcomes(tmp_path / "o.jsonl", ROWS, ARMS), list(ARMS))
    a = open_learning_log(engine, "auto", AUTO, instance="a", checkpoint_every=10**6)
    b = open_learning_log(engine, "auto", AUTO, instance="b", checkpoint_every=10**6)
    decider = Decider(config, a, HashEmbedder(), Gateway(config), BASE)
    learner = Learner(a, BASE, pending_ttl_seconds=60)
    try:
        for start in range(0, len(ROWS), 40):
            decider.decide(records(ROWS[start : start + 40]))
            learner.learn(labels(ROWS[start : start + 40]))
            if start == 120:
                assert a.checkpoints.save() is True  # a checkpoint mid-stream
    finally:
        decider.close()
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT count(*), count(decision_lambda) FROM decisions")
        ).one()
    assert tuple(stored) == (240, 240)  # every decision priced: its λ stored beside p

    b.catch_up()  # a second instance, following the same log
    restarted = open_learning_log(engine, "auto", AUTO, instance="c", checkpoint_every=10**6)
    restarted.restore()  # the mid-stream checkpoint, then the rewards after it
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM policy_checkpoints"))
    rebuilt = open_learning_log(engine, "auto", AUTO, instance="d", checkpoint_every=10**6)
    rebuilt.restore()  # no checkpoint: the whole log replayed

    serving, switches, scores = scored(a)
    assert a.live.policy.n_scored == 240  # every outcome scored (none is without a propensity)
    assert switches and switches[0].old == "correctness_ucb"
    assert serving != "correctness_ucb"
    for other in (b, restarted, rebuilt):
        assert other.live.watermark == 240
        assert scored(other) == (serving, switches, scores)
    for log_ in (a, b, restarted, rebuilt):
        log_.close()
