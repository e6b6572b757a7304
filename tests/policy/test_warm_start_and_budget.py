"""Warm start (full information), update_many, and budget mode on the real gsm8k replay."""

from __future__ import annotations

import numpy as np
import pytest

from service.pacing import BudgetPacer
from service.policy import EpsGreedy, LinUCB
from service.policy.warm_start import replay, warm_start
from service.reward import reward

GPT4, MIXTRAL = "gpt-4-1106-preview", "mixtral-8x7b-instruct"


def test_update_many_equals_successive_updates() -> None:
    rng = np.random.default_rng(0)
    for n in (3, 40):  # Woodbury branch and re-inversion branch (d = 16)
        X, r = rng.normal(size=(n, 16)), rng.normal(size=n)
        one, many = LinUCB(), LinUCB()
        one.update("a", X[0], 0.5)
        many.update("a", X[0], 0.5)
        for x, y in zip(X, r, strict=True):
            one.update("a", x, y)
        many.update_many("a", X, r)
        for name in ("A", "A_inv", "b", "theta"):
            np.testing.assert_allclose(
                getattr(many.stats, name), getattr(one.stats, name), atol=1e-9
            )
        assert many.n_updates == one.n_updates == n + 1


def test_warm_start_is_full_information(gsm8k_records) -> None:
    records = gsm8k_records[:60]
    contexts = np.random.default_rng(1).normal(size=(60, 5))
    lam, unit = 0.3, 1e-3
    policy = LinUCB()
    assert warm_start(policy, records, contexts, lam=lam, cost_unit=unit) == 120
    reference = LinUCB()
    for record, x in zip(records, contexts, strict=True):
        for arm in record.arms:
            reference.update(arm, x, reward(record.correct(arm), record.cost(arm), lam, unit))
    assert sorted(policy.arms) == [GPT4, MIXTRAL]
    for arm in policy.arms:
        np.testing.assert_allclose(policy.estimate(arm), reference.estimate(arm), atol=1e-9)
        assert policy.stats.counts[policy.stats.index[arm]] == 60
    # generic policies go through update_many's loop
    greedy = EpsGreedy(seed=0)
    assert warm_start(greedy, records, contexts, lam=lam, cost_unit=unit) == 120
    assert greedy.n_updates == 120
    with pytest.raises(ValueError):
        warm_start(policy, records, contexts[:10], lam=lam, cost_unit=unit)


def test_budget_mode_meets_the_target_mean_cost(gsm8k_records, gsm8k_embeddings) -> None:
    records, X = gsm8k_records, gsm8k_embeddings
    mean_gpt4 = float(np.mean([r.cost(GPT4) for r in records]))
    target = 0.4 * mean_gpt4
    half = len(records) // 2

    pacer = BudgetPacer(target_cost_per_query=target, cost_unit=mean_gpt4, lr=0.05)
    result = replay(LinUCB(seed=0), records, X, cost_unit=mean_gpt4, pacer=pacer)
    realised = float(np.mean(result.cost_usd[half:]))
    assert realised == pytest.approx(target, rel=0.10)
    assert max(result.lams) > 0.1  # λ really had to move

    # The same router with a fixed λ = 0 spends far more: the pacer is what meets the target.
    free = replay(LinUCB(seed=0), records, X, lam=0.0, cost_unit=mean_gpt4)
    assert float(np.mean(free.cost_usd[half:])) > 1.5 * target
