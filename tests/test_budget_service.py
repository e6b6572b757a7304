"""Budget mode in the service: λ follows the decisions' costs to meet a target, and a restart
restores it exactly (checkpointed pacer + the costs of the decisions made after it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from service.config import parse_config
from service.events import LabelEvent, QueryEvent
from service.llm.gateway import Gateway
from service.outcomes import read_outcomes
from service.pacing import BudgetPacer
from service.pipeline import Decider, Learner, QueryRecord
from service.reward import RewardSettings
from tests.helpers import open_learning_log

pytestmark = pytest.mark.integration

GSM8K = Path(__file__).parent / "policy" / "data" / "gsm8k_outcomes.jsonl"  # real GPT-4/Mixtral
RECORDS = read_outcomes(GSM8K)
GPT4, MIXTRAL = "gpt-4-1106-preview", "mixtral-8x7b-instruct"
MEAN_GPT4 = sum(r.cost(GPT4) for r in RECORDS) / len(RECORDS)
BASE = RewardSettings(lam=0.0, cost_unit=MEAN_GPT4)
TARGET = 0.4 * MEAN_GPT4


def pacer() -> BudgetPacer:
    return BudgetPacer(TARGET, BASE.cost_unit, lr=0.05, lam0=0.0)


def stream(engine, embedder, policy: str, params: dict):
    """Decide the gsm8k queries in batches of 20 in budget mode, labelling each batch once the
    next is decided; returns the learning log and the decisions' costs in decision order."""
    rows = [r.model_dump() for r in RECORDS]
    config = parse_config(
        {
            "tasks": {"gsm8k": {"kind": "classification", "labels": ["correct", "incorrect"]}},
            "arms": [
                {"name": a, "provider": "replay", "model": a, "outcomes": str(GSM8K)}
                for a in (GPT4, MIXTRAL)
            ],
        }
    )
    learning_log = open_learning_log(engine, policy, params, checkpoint_every=400, budget=pacer())
    decider = Decider(config, learning_log, embedder, Gateway(config), BASE)
    learner = Learner(learning_log, BASE, pending_ttl_seconds=60)
    for start in range(0, len(rows), 20):  # decide a batch, then label the previous one
        batch = rows[start : start + 20]
        decider.decide(
            [
                QueryRecord(QueryEvent(query_id=r["query_id"], text=r["text"], task=r["task"]))
                for r in batch
            ]
        )
        if start:
            learner.learn(
                [
                    LabelEvent(query_id=r["query_id"], label=r["label"])
                    for r in rows[start - 20 : start]
                ]
            )
    with engine.connect() as conn:
        costs = [
            c
            for (c,) in conn.execute(
                sa.text("SELECT cost_usd FROM decisions ORDER BY decision_seq")
            )
        ]
    return learning_log, costs


def second_half_mean(costs: list[float]) -> float:
    second_half = costs[len(costs) // 2 :]
    return sum(second_half) / len(second_half)


def test_a_priced_policy_meets_the_budget_within_ten_percent(engine, cached_embedder):
    """A policy that learns correctness prices every decision at the λ in force, so nothing it
    learned holds an arm back at a stale λ: the old band, ±10 % of the target."""
    learning_log, costs = stream(engine, cached_embedder, "correctness_ucb", {"seed": 3})
    assert learning_log.live.pacer.n_observed == len(costs) == len(RECORDS)
    with engine.connect() as conn:
        priced_at = conn.execute(
            sa.text("SELECT count(DISTINCT decision_lambda), count(decision_lambda) FROM decisions")
        ).one()
    assert priced_at[0] > 3 and priced_at[1] == len(costs)  # each decision at λ of its time
    mean = second_half_mean(costs)
    assert 0.9 * TARGET <= mean <= 1.1 * TARGET, mean / TARGET


def test_lambda_tracks_the_budget_and_survives_a_crash(engine, cached_embedder):
    learning_log, costs = stream(engine, cached_embedder, "linucb", {"seed": 3, "epsilon": 0.1})
    live = learning_log.live
    with engine.connect() as conn:
        lambdas = {
            lam
            for (lam,) in conn.execute(
                sa.text("SELECT DISTINCT reward_lambda FROM decisions WHERE reward IS NOT NULL")
            )
        }
    n = len(RECORDS)
    assert live.pacer.n_observed == n == len(costs)
    assert len(lambdas) > 3  # λ moved while rewards were being stored
    # a scalar-reward policy (LinUCB) learns each reward at the λ of its time: never over the
    # budget by more than the pacer's window allows; under it when λ sits at its floor of 0
    # and the rewards learned at higher λ still hold the costly arm back (more so on a
    # low-dimensional context, where many queries flip arm at the same λ)
    mean = second_half_mean(costs)
    assert 0.8 * TARGET <= mean <= 1.1 * TARGET, mean / TARGET

    # "crash": a new process restores the last checkpoint (up to 400 rewards old) and
    # re-observes the costs after its decision watermark
    recovering = open_learning_log(
        engine, "linucb", {"seed": 3, "epsilon": 0.1}, checkpoint_every=400, budget=pacer()
    )
    recovering.restore()
    recovered = recovering.live
    assert recovered.decision_watermark == live.decision_watermark
    assert recovered.pacer.lam == pytest.approx(live.pacer.lam, abs=1e-12)
    assert recovered.pacer.n_observed == n
    assert recovered.reward_settings(BASE).lam == pytest.approx(live.reward_settings(BASE).lam)

    # switching budget mode off on restart goes back to the fixed λ
    restarted = open_learning_log(engine, "linucb", {"seed": 3}, checkpoint_every=400)
    restarted.restore()
    fixed = restarted.live
    assert fixed.pacer is None and fixed.reward_settings(BASE) == BASE
