"""Priced decisions in the service, against the real Postgres: a policy that learns correctness
chooses at the λ in force with each arm's cost estimated before the call (from the decision
log), stores that λ on the decision, learns correctness and cost from the log row alone (so a
restart and a replay of the log reach the same state), and a configured policy other than the
stored one is rebuilt from the log, with a log line saying so."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from service.config import parse_config
from service.decision import bytes_to_vector
from service.events import LabelEvent, QueryEvent
from service.llm.gateway import Gateway
from service.pipeline import Decider, Learner, QueryRecord, RewardSettings
from service.pricing import CHARS_PER_TOKEN, ArmPrice, arm_prices
from tests.faults.harness import HashEmbedder, fresh_policy, policy_difference, rebuild_policy
from tests.helpers import ARMS, TASKS, demo_rows, open_learning_log, write_outcomes

pytestmark = pytest.mark.integration

BASE = RewardSettings(lam=0.1, cost_unit=0.001)
PRICED = {"alpha": 0.0, "epsilon": 0.2, "seed": 0}
PRICES = {"cheap": (0.1, 0.4), "strong": (3.0, 6.0)}  # $ per 1M input / output tokens
TOKENS = {"cheap": (1, 9), "strong": (20, 60)}  # each arm's output tokens range
ROWS = demo_rows(160)


def outcomes_with_tokens(path: Path) -> Path:
    """The replay arms' outcomes, each call with output tokens drawn from its arm's range."""
    write_outcomes(path, ROWS, ARMS)
    rng = random.Random(1)
    lines = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for arm, outcome in row["arms"].items():
            outcome["input_tokens"] = len(row["text"]) // 4
            outcome["output_tokens"] = rng.randint(*TOKENS[arm])
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(outcomes: Path, priced: bool = True):
    return parse_config(
        {
            "tasks": TASKS,
            "arms": [
                {
                    "name": arm,
                    "provider": "replay",
                    "model": arm,
                    "outcomes": str(outcomes),
                    **(
                        {
                            "input_price_per_1m": PRICES[arm][0],
                            "output_price_per_1m": PRICES[arm][1],
                        }
                        if priced
                        else {}
                    ),
                }
                for arm, (inp, out) in PRICES.items()
            ],
        }
    )


def records(rows: list[dict]) -> list[QueryRecord]:
    return [
        QueryRecord(QueryEvent(query_id=r["query_id"], text=r["text"], task=r["task"]))
        for r in rows
    ]


def labels(rows: list[dict]) -> list[LabelEvent]:
    return [LabelEvent(query_id=r["query_id"], label=r["label"]) for r in rows]


def serve(engine, config, rows, policy="correctness_ucb", params=PRICED, rewards=BASE, **kw):
    """Decide ``rows`` in batches of 20, labelling each batch once the next is decided."""
    learning_log = open_learning_log(engine, policy, params, **kw)
    learning_log.restore()
    decider = Decider(config, learning_log, HashEmbedder(), Gateway(config), rewards)
    learner = Learner(learning_log, rewards, pending_ttl_seconds=60)
    for start in range(0, len(rows), 20):
        decider.decide(records(rows[start : start + 20]))
        if start:
            learner.learn(labels(rows[start - 20 : start]))
    learner.learn(labels(rows[-20:]))
    decider.close()
    return learning_log


def decided(engine, after: int) -> list[tuple]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT arm, probabilities, decision_lambda, estimated_cost_usd FROM decisions"
                    " WHERE decision_seq > :after ORDER BY decision_seq"
                ),
                {"after": after},
            )
        )


def test_one_learned_state_prices_each_lambda_and_stores_it(engine, tmp_path):
    config = config_for(outcomes_with_tokens(tmp_path / "outcomes.jsonl"))
    learning_log = serve(engine, config, ROWS[:120], checkpoint_every=10**6)
    live = learning_log.live
    learned = (live.policy.n_updates, live.watermark)
    assert learned[0] == 120
    assert {r[2] for r in decided(engine, 0)} == {BASE.lam}  # every decision: its λ stored

    chosen = {}
    for lam in (0.0, 20.0):  # the same learned state, chosen from at two λ
        mark = live.decision_watermark
        decider = Decider(
            config, learning_log, HashEmbedder(), Gateway(config), RewardSettings(lam, 0.001)
        )
        decider.decide(records(ROWS[120 + int(lam) : 140 + int(lam)]))
        decider.close()
        rows = decided(engine, mark)
        assert len(rows) == 20 and {r[2] for r in rows} == {lam}
        assert all(r[3] is not None and r[3] > 0 for r in rows)  # the chosen arm's estimate
        chosen[lam] = [max(r[1], key=r[1].get) for r in rows]  # the greedy arm of each
    assert (live.policy.n_updates, live.watermark) == learned  # nothing was relearned
    assert chosen[0.0].count("strong") >= 18, chosen[0.0]  # right 90 % of the time, vs 60 %
    assert chosen[20.0] == ["cheap"] * 20  # strong is ~100× dearer


def test_cost_estimates_come_from_the_log_and_survive_a_restart(engine, tmp_path):
    config = config_for(outcomes_with_tokens(tmp_path / "outcomes.jsonl"))
    learning_log = serve(engine, config, ROWS[:100], checkpoint_every=30)
    live = learning_log.live
    with engine.connect() as conn:
        means = dict(
            conn.execute(
                sa.text(
                    "SELECT arm, avg(output_tokens) FROM decisions WHERE status <> 'llm_error'"
                    " AND fallback_arm IS NULL GROUP BY arm"
                )
            ).all()
        )
    assert set(means) == set(ARMS)
    assert live.costs.mean_output_tokens() == pytest.approx({a: float(m) for a, m in means.items()})
    pricing = live.pricing(BASE, arm_prices(config.arms), 100, 400)
    for arm, (inp, out) in PRICES.items():
        expected = ArmPrice(inp, out).cost(400 / CHARS_PER_TOKEN, float(means[arm]))
        assert pricing.est_cost[arm] == pytest.approx(expected)
    assert pricing.lam == BASE.lam

    # a restart (the newest checkpoint, then the log after it) and a replay of the whole log
    # reach the same correctness state and cost estimates as the instance that learned it
    restarted = open_learning_log(engine, "correctness_ucb", PRICED)
    restarted.restore()
    assert restarted.live.policy.n_updates == live.policy.n_updates == 100
    assert policy_difference(restarted.live.policy, live.policy) == 0.0
    assert restarted.live.policy.mean_costs() == live.policy.mean_costs()
    replayed = rebuild_policy(engine, "correctness_ucb", PRICED)
    assert policy_difference(replayed, live.policy) < 1e-9  # arms met in another order
    assert restarted.live.costs.to_dict() == live.costs.to_dict()


def fed_from_the_log(engine) -> tuple[object, int]:
    """A fresh correctness_ucb taught every reward of the log straight from its columns."""
    policy = fresh_policy("correctness_ucb", PRICED)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT arm, context, correct, cost_usd, status, fallback_arm FROM decisions"
                " WHERE reward_seq IS NOT NULL ORDER BY reward_seq"
            )
        ).all()
    for arm, context, correct, cost, status, fallback in rows:
        failed = status == "llm_error" or fallback is not None
        policy.learn(
            arm,
            bytes_to_vector(context),
            0.0 if failed else float(correct),
            None if failed else cost,
        )
    return policy, len(rows)


def test_a_policy_configured_anew_is_rebuilt_from_the_log(engine, tmp_path, caplog):
    config = config_for(write_outcomes(tmp_path / "outcomes.jsonl", ROWS, ARMS), priced=False)
    old = serve(
        engine, config, ROWS[:100], "linucb", {"alpha": 0.1, "seed": 0}, checkpoint_every=30
    )
    assert old.live.policy.kind == "linucb" and old.checkpoints.save()
    old.close()  # stopped: the checkpoint writer's role goes to the next start

    caplog.set_level(logging.INFO, logger="service.log.transaction")
    now = open_learning_log(engine, "correctness_ucb", PRICED, checkpoint_every=10**6)
    now.restore()
    expected, n_rewards = fed_from_the_log(engine)
    assert n_rewards == 100
    assert now.live.policy.kind == "correctness_ucb"
    assert now.live.policy.n_updates == n_rewards == now.live.watermark
    assert policy_difference(now.live.policy, expected) < 1e-9
    assert now.live.policy.mean_costs() == expected.mean_costs()
    assert "is not the stored one (linucb): rebuilding it from the 100 rewards" in caplog.text

    # stored as such, it is the configured one at the next start: restored, not rebuilt
    assert now.checkpoints.save()
    caplog.clear()
    again = open_learning_log(engine, "correctness_ucb", PRICED)
    again.restore()
    assert "rebuilding" not in caplog.text
    assert policy_difference(again.live.policy, now.live.policy) == 0.0
    x = np.ones(again.live.policy._input_dim)
    estimates = again.live.policy.estimates(list(ARMS), x)
    assert estimates == pytest.approx(expected.estimates(list(ARMS), x), abs=1e-9)
