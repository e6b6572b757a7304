"""Conservative mode in the service, against the real Postgres: a task that names a baseline
arm gets the baseline (logged with propensity 1) whenever the policy's choice could break the
task's budget, and the budgets are a projection of the log: a restart from a checkpoint and a
rebuild from the log alone hold the same counts as the instance that decided."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.config import parse_config
from service.learning import LivePolicy
from service.llm.gateway import Gateway
from service.log.transaction import LearningLog
from service.pipeline import Decider, Learner
from tests.faults.harness import HashEmbedder
from tests.helpers import TASKS
from tests.test_priced_service import (
    BASE,
    PRICED,
    PRICES,
    ROWS,
    labels,
    outcomes_with_tokens,
    records,
)

pytestmark = pytest.mark.integration

DELTA = 0.1


def config(outcomes):
    tasks = {
        name: {**task, "baseline": "strong", "tolerance": DELTA} for name, task in TASKS.items()
    }
    arms = [
        {
            "name": arm,
            "provider": "replay",
            "model": arm,
            "outcomes": str(outcomes),
            "input_price_per_1m": inp,
            "output_price_per_1m": out,
        }
        for arm, (inp, out) in PRICES.items()
    ]
    return parse_config({"tasks": tasks, "arms": arms})


def open_log(engine, cfg, name: str) -> LearningLog:
    live = LivePolicy("correctness_ucb", PRICED, conservative=cfg.conservative())
    return LearningLog(engine, live, instance=name, checkpoint_every=10**6)


def test_the_baseline_is_played_when_the_budget_could_break_and_restarts_agree(engine, tmp_path):
    cfg = config(outcomes_with_tokens(tmp_path / "o.jsonl"))
    assert cfg.conservative()["sentiment"].baseline == "strong"
    a = open_log(engine, cfg, "a")
    decider = Decider(cfg, a, HashEmbedder(), Gateway(cfg), BASE)
    learner = Learner(a, BASE, pending_ttl_seconds=60)
    try:
        for start in range(0, 160, 20):
            decider.decide(records(ROWS[start : start + 20]))
            learner.learn(labels(ROWS[start : start + 20]))
            if start == 80:
                assert a.checkpoints.save() is True
    finally:
        decider.close()
    with engine.connect() as conn:
        forced = conn.execute(
            sa.text(
                "SELECT count(*) FROM decisions WHERE arm = 'strong' AND propensity = 1"
                " AND (probabilities->>'cheap')::float = 0"
            )
        ).scalar_one()
        plays = dict(
            conn.execute(sa.text("SELECT arm, count(*) FROM decisions GROUP BY arm")).all()
        )
    # ε = 0.2 explores the cheap arm on ~10 % of queries: early on the guard turns them back
    assert forced > 0
    assert plays["strong"] > plays.get("cheap", 0)
    state = a.live.guard.to_dict()
    assert sum(sum(p.values()) for p in state["plays"].values()) == 160

    restarted = open_log(engine, cfg, "b")
    restarted.restore()  # the checkpoint at 100, then the log after it
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM policy_checkpoints"))
    rebuilt = open_log(engine, cfg, "c")
    rebuilt.restore()  # the whole log
    for other in (restarted, rebuilt):
        assert other.live.guard.to_dict() == state
    for log_ in (a, restarted, rebuilt):
        log_.close()
