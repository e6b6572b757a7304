"""BudgetPacer: direction of steps, clipping, the dual-sum identity, state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.pacing import BudgetPacer


def test_lambda_moves_against_the_budget_error_and_is_clipped() -> None:
    pacer = BudgetPacer(target_cost_per_query=1.0, cost_unit=2.0, lr=0.5, lam0=0.1, lam_max=1.0)
    assert pacer.lam == 0.1
    assert pacer.observe(3.0) == pytest.approx(0.6)  # +0.5 * (3-1)/2
    assert pacer.observe(9.0) == 1.0  # clipped at lam_max
    for _ in range(10):
        pacer.observe(0.0)
    assert pacer.lam == 0.0  # never negative
    assert pacer.n_observed == 12 and pacer.mean_cost_usd == pytest.approx(1.0)


def test_window_mean_cost_follows_the_dual_identity() -> None:
    rng = np.random.default_rng(0)
    pacer = BudgetPacer(target_cost_per_query=0.3, cost_unit=1.0, lr=0.1, lam0=5.0)
    costs = rng.uniform(0.0, 1.0, size=500)
    for c in costs:
        pacer.observe(float(c))
    # no clipping happened (λ stayed positive), so Σ(cost − target) = unit·(λ_end − λ0)/lr
    assert pacer.lam > 0
    assert (costs - 0.3).sum() == pytest.approx((pacer.lam - 5.0) / 0.1, rel=1e-9)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        BudgetPacer(target_cost_per_query=1.0, cost_unit=0.0)
    with pytest.raises(ValueError):
        BudgetPacer(target_cost_per_query=1.0, cost_unit=1.0, lr=-1)
    pacer = BudgetPacer(target_cost_per_query=1.0, cost_unit=1.0)
    with pytest.raises(ValueError):
        pacer.observe(-0.1)
    with pytest.raises(ValueError):
        pacer.observe(math.nan)


def test_state_round_trip() -> None:
    pacer = BudgetPacer(target_cost_per_query=0.2, cost_unit=0.5, lr=0.3, lam0=0.7)
    for c in (0.1, 0.9, 0.4):
        pacer.observe(c)
    restored = BudgetPacer.from_dict(pacer.to_dict())
    assert restored == pacer
    assert restored.observe(0.3) == pacer.observe(0.3)
